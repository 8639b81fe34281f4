"""Corrupt or hostile GGUF files give one clear FormatError, without large allocations."""

import random
import struct
import tracemalloc

import pytest

from quantkit.errors import FormatError, QuantkitError
from quantkit.formats.base import read_checkpoint
from quantkit.gguf.convert import write_gguf
from quantkit.gguf.reader import GGUFModel
from quantkit.model.checkpoint import open_checkpoint
from quantkit.testing import make_random_checkpoint

MAX_ALLOC = 16 * 1024 * 1024  # far below the gigabytes the corrupt fields claim


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    src = make_random_checkpoint(d / "src", layout="hf-single", hidden=64, intermediate=128, vocab=32000)
    return write_gguf(open_checkpoint(src), d / "good.gguf", "Q8_0", progress=False).read_bytes()


def _tensor_info_pos(blob: bytes, name: str) -> int:
    """Byte position just after the name of tensor `name` in the tensor-info table (its n_dims field)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = blob.rindex(key)
    return pos + len(key)


def _patched(blob: bytes, pos: int, fmt: str, value) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, pos, value)
    return bytes(b)


def _expect_error(tmp_path, blob: bytes, match: str):
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=match) as info:
            read_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert peak < MAX_ALLOC, f"{peak} bytes allocated while rejecting the file"


def test_good_file_reads(good, tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(good)
    assert len(read_checkpoint(path).names) == 2 * 9 + 3


def test_lying_tensor_count_huge(good, tmp_path):
    _expect_error(tmp_path, _patched(good, 8, "<Q", 1 << 40), "tensor_count")


def test_lying_tensor_count_off_by_one(good, tmp_path):
    n = struct.unpack_from("<Q", good, 8)[0]
    _expect_error(tmp_path, _patched(good, 8, "<Q", n + 1), "corrupt|truncated|unknown|dimensions|duplicate|offset")


def test_lying_kv_count(good, tmp_path):
    _expect_error(tmp_path, _patched(good, 16, "<Q", 1 << 50), "metadata_kv_count")


def test_offset_past_the_end(good, tmp_path):
    pos = _tensor_info_pos(good, "blk.1.ffn_up.weight") + 4 + 2 * 8 + 4
    _expect_error(tmp_path, _patched(good, pos, "<Q", 1 << 40), "blk.1.ffn_up.weight.*past the end")


def test_unknown_type_id(good, tmp_path):
    pos = _tensor_info_pos(good, "blk.0.attn_q.weight") + 4 + 2 * 8
    _expect_error(tmp_path, _patched(good, pos, "<I", 99), "blk.0.attn_q.weight.*unknown ggml type id 99")


def test_removed_type_id(good, tmp_path):
    pos = _tensor_info_pos(good, "blk.0.attn_q.weight") + 4 + 2 * 8
    _expect_error(tmp_path, _patched(good, pos, "<I", 4), "unknown ggml type id 4")


def test_too_many_dims(good, tmp_path):
    pos = _tensor_info_pos(good, "blk.0.attn_k.weight")
    _expect_error(tmp_path, _patched(good, pos, "<I", 70000), "dimensions")


def test_truncated_data(good, tmp_path):
    _expect_error(tmp_path, good[: len(good) - 1000], "truncated GGUF: tensor 'output.weight'")


def test_truncated_header(good, tmp_path):
    _expect_error(tmp_path, good[:5000], "truncated|corrupt")


def test_string_length_in_gigabytes(good, tmp_path):
    # the first KV's key length (right after the 24-byte header)
    _expect_error(tmp_path, _patched(good, 24, "<Q", 5 * 1024**3), "5368709120 bytes")


def test_string_value_length_in_gigabytes(good, tmp_path):
    key = b"general.architecture"
    pos = good.index(key) + len(key) + 4  # after the value type: the string value's length
    _expect_error(tmp_path, _patched(good, pos, "<Q", 3 * 1024**3), "general.architecture.*claims")


def test_array_count_in_billions(good, tmp_path):
    key = b"tokenizer.ggml.tokens"
    pos = good.index(key) + len(key) + 4 + 4  # after value type (ARRAY) and element type
    _expect_error(tmp_path, _patched(good, pos, "<Q", 4_000_000_000), "tokenizer.ggml.tokens.*4000000000 elements")


def test_not_gguf(tmp_path):
    _expect_error(tmp_path, b"GGML" + bytes(100), "not a GGUF file")
    _expect_error(tmp_path, b"GGUF", "not a GGUF file")


def test_bad_version(good, tmp_path):
    _expect_error(tmp_path, _patched(good, 4, "<I", 7), "version 7")


def test_random_header_corruption_only_raises_quantkit_errors(good, tmp_path):
    rng = random.Random(0)
    header_end = good.index(b"blk.0") + 64
    path = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(4, header_end)] = rng.randrange(256)
        path.write_bytes(bytes(b))
        try:
            GGUFModel(path)
            outcomes["ok"] += 1
        except QuantkitError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0
