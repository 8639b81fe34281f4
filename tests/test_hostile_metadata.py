"""Untrusted metadata is validated before use (issue 13 part 3): config fields, safetensors headers and indexes,
GGUF headers and quantization configs. Each case goes through the CLI and must give one `error:` line naming the
file and the field (or tensor), quickly and without a traceback."""

import json
import struct
import time

import pytest

from quantkit.cli import main
from quantkit.gguf.convert import write_gguf
from quantkit.model.checkpoint import open_checkpoint
from quantkit.testing import make_random_checkpoint


def run_cli(capsys, *args):
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_error(capsys, args, *needles):
    start = time.perf_counter()
    code, err = run_cli(capsys, *args)
    assert time.perf_counter() - start < 60, "rejecting bad metadata must not build huge tables"
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def ckpt(tmp_path):
    return make_random_checkpoint(tmp_path / "m", layout="hf-sharded", shards=2, seed=0)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- config.json / params.json fields ----

FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "head_dim", "max_position_embeddings", "sliding_window", "bos_token_id", "eos_token_id"]


@pytest.mark.parametrize("value", ["abc", 0, -3, 10**9, 2.5, True, [4]])
@pytest.mark.parametrize("field", FIELDS)
def test_config_integer_fields(capsys, ckpt, field, value):
    if field in ("bos_token_id", "eos_token_id") and value == 0:
        value = 10**6  # 0 is a valid token id; the id must also be below vocab_size
    _edit_json(ckpt / "config.json", **{field: value})
    if field == "eos_token_id" and isinstance(value, list):
        value = value[0]  # a list of EOS ids is valid (the first one is used)
        _edit_json(ckpt / "config.json", eos_token_id=[10**6])
        value = 10**6
    assert_error(capsys, ["inspect", str(ckpt)], "config.json", field, repr(value))


@pytest.mark.parametrize("field,value", [("rms_norm_eps", "x"), ("rms_norm_eps", 0), ("rms_norm_eps", 2.0),
                                         ("rope_theta", -1.0), ("rope_theta", "1e6"), ("rope_theta", [1])])
def test_config_float_fields(capsys, ckpt, field, value):
    _edit_json(ckpt / "config.json", **{field: value})
    assert_error(capsys, ["inspect", str(ckpt)], "config.json", field)


def test_heads_must_divide(capsys, ckpt):
    _edit_json(ckpt / "config.json", num_key_value_heads=3)
    assert_error(capsys, ["inspect", str(ckpt)], "num_key_value_heads = 3", "divisor")


def test_conflicting_rope_theta_spellings(capsys, ckpt):
    _edit_json(ckpt / "config.json", rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert_error(capsys, ["inspect", str(ckpt)], "rope_theta", "rope_parameters.rope_theta", "disagree")


def test_agreeing_rope_theta_spellings_are_fine(capsys, ckpt):
    _edit_json(ckpt / "config.json", rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    code, err = run_cli(capsys, "inspect", str(ckpt))
    assert code in (0, None), err


def test_params_json_names_its_own_field(capsys, tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "c", layout="consolidated", seed=0)
    _edit_json(ckpt / "params.json", n_layers=10**9)
    assert_error(capsys, ["inspect", str(ckpt)], "params.json", "n_layers = 1000000000")


# ---- safetensors headers and indexes ----

def _rewrite_header(path, edit):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


def _two_tensors(header):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return header[names[0]], header[names[1]]


@pytest.mark.parametrize("case,needle", [
    ("overlap", "overlaps"), ("reversed", "data_offsets"), ("missized", "needs"), ("gap", "gap"),
    ("dtype", "dtype"), ("shape", "shape"), ("metadata", "__metadata__")])
def test_safetensors_header_checked_strictly(capsys, ckpt, case, needle):
    shard = ckpt / "model-00001-of-00002.safetensors"

    def edit(header):
        a, b = _two_tensors(header)
        if case == "overlap":
            b["data_offsets"] = [b["data_offsets"][0] - 2, b["data_offsets"][1] - 2]
        elif case == "reversed":
            a["data_offsets"] = a["data_offsets"][::-1]
        elif case == "missized":
            a["shape"] = [a["shape"][0] + 1, *a["shape"][1:]]
        elif case == "gap":
            b["data_offsets"] = [b["data_offsets"][0] + 2, b["data_offsets"][1] + 2]
        elif case == "dtype":
            a["dtype"] = "Q4"
        elif case == "shape":
            a["shape"] = [-1, 4]
        else:
            header["__metadata__"] = {"format": 1}

    _rewrite_header(shard, edit)
    assert_error(capsys, ["inspect", str(ckpt)], str(shard), needle)


def test_duplicate_key_in_header(capsys, ckpt):
    shard = ckpt / "model-00001-of-00002.safetensors"
    blob = shard.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    text = blob[8:8 + n].decode().rstrip()
    first = text[1:text.index("}") + 1]  # the first entry, repeated
    raw = ("{" + first + "," + text[1:]).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])
    assert_error(capsys, ["inspect", str(ckpt)], str(shard), "twice")


def test_tensor_in_two_shards(capsys, ckpt):
    from safetensors.torch import load_file, save_file

    one, two = ckpt / "model-00001-of-00002.safetensors", ckpt / "model-00002-of-00002.safetensors"
    first = load_file(one)
    name = next(iter(first))
    save_file({**load_file(two), name: first[name]}, two)
    assert_error(capsys, ["inspect", str(ckpt)], name, "exactly one shard")


def test_index_naming_a_path_outside_the_model(capsys, ckpt):
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    assert_error(capsys, ["inspect", str(ckpt)], str(index), name, "same directory")


# ---- GGUF headers ----

@pytest.fixture(scope="module")
def gguf_blob(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    src = make_random_checkpoint(d / "src", layout="hf-single", hidden=64, intermediate=128, vocab=32000)
    return write_gguf(open_checkpoint(src), d / "good.gguf", "Q8_0", progress=False).read_bytes()


def _kv_value_pos(blob: bytes, key: str) -> int:
    raw = struct.pack("<Q", len(key)) + key.encode()
    return blob.index(raw) + len(raw) + 4  # past the key and its u32 type


@pytest.mark.parametrize("value,needle", [(0, "llama.block_count = 0"), (10**9, "llama.block_count = 1000000000")])
def test_gguf_block_count(capsys, tmp_path, gguf_blob, value, needle):
    blob = bytearray(gguf_blob)
    struct.pack_into("<I", blob, _kv_value_pos(gguf_blob, "llama.block_count"), value)
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    assert_error(capsys, ["inspect", str(path)], str(path), needle)


def test_gguf_tensors_sharing_one_offset(capsys, tmp_path, gguf_blob):
    blob = bytearray(gguf_blob)
    offsets = {}
    for name in ("blk.0.ffn_up.weight", "blk.0.ffn_down.weight"):
        key = struct.pack("<Q", len(name)) + name.encode()
        pos = gguf_blob.rindex(key) + len(key)
        n_dims = struct.unpack_from("<I", gguf_blob, pos)[0]
        offsets[name] = pos + 4 + 8 * n_dims + 4
    up = struct.unpack_from("<Q", gguf_blob, offsets["blk.0.ffn_up.weight"])[0]
    struct.pack_into("<Q", blob, offsets["blk.0.ffn_down.weight"], up)  # same shape and type: same byte count
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    assert_error(capsys, ["inspect", str(path)], str(path), "overlaps")


# ---- quantization configs ----

@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    from quantkit import api

    d = tmp_path_factory.mktemp("gptq")
    src = make_random_checkpoint(d / "src", layout="hf-single", hidden=64, intermediate=128, vocab=32000)
    return api.quantize(src, preset="w4a16-g32", method="rtn", formats=["gptq"], output=d / "out").paths["gptq"]


@pytest.fixture
def gptq(gptq_dir, tmp_path):
    import shutil

    return shutil.copytree(gptq_dir, tmp_path / "gptq")


def _edit_qc(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("key,value", [("bits", "4"), ("bits", 5), ("bits", True), ("group_size", -7),
                                       ("group_size", "32"), ("group_size", 2.5), ("sym", "yes")])
def test_gptq_settings(capsys, gptq, key, value):
    _edit_qc(gptq, **{key: value})
    assert_error(capsys, ["eval", str(gptq), "--text", str(gptq / "config.json")], key, repr(value))


def test_gptq_dynamic_rule_with_a_bad_regex(capsys, gptq):
    _edit_qc(gptq, dynamic={"+:model.layers.[": {"bits": 8}})
    assert_error(capsys, ["eval", str(gptq), "--text", str(gptq / "config.json")], "dynamic", "regex")


def test_quantize_config_json_disagreeing_with_config_json(capsys, gptq):
    separate = json.loads((gptq / "quantize_config.json").read_text())
    separate["group_size"] = 128
    (gptq / "quantize_config.json").write_text(json.dumps(separate))
    assert_error(capsys, ["inspect", str(gptq)], "quantize_config.json", "group_size", "agree")
