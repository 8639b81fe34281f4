"""GGUF writer/reader: metadata and tensors as llama.cpp's converter writes them, round trips, atomicity."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from quantkit.errors import FormatError
from quantkit.formats.base import detect_format, read_checkpoint
from quantkit.gguf.convert import write_gguf
from quantkit.gguf.mixes import tensor_types
from quantkit.gguf.reader import parse_gguf
from quantkit.gguf.writer import GGUFFileWriter
from quantkit.model import arch
from quantkit.model.checkpoint import open_checkpoint
from quantkit.testing import llamacpp_convert_script, make_random_checkpoint


@pytest.fixture(scope="module")
def nano(nano_path):
    return open_checkpoint(nano_path)


@pytest.fixture(scope="module")
def nano_f32(nano, tmp_path_factory):
    return write_gguf(nano, tmp_path_factory.mktemp("gguf") / "nano-F32.gguf", "F32", progress=False)


def _raw(f, info):
    return np.memmap(f.path, np.uint8, "r", info.offset, (info.nbytes,))


def test_f32_matches_llamacpp_converter_bytes_and_metadata(nano_path, nano_f32, tmp_path):
    script = llamacpp_convert_script()
    if script is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is absent")
    ref_path = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, str(script), str(nano_path), "--outtype", "f32", "--outfile", str(ref_path)],
                   check=True, capture_output=True)
    ref, ours = parse_gguf(ref_path), parse_gguf(nano_f32)
    assert set(ref.tensors) == set(ours.tensors)
    for name, info in ref.tensors.items():
        o = ours.tensors[name]
        assert (o.shape, o.type_name) == (info.shape, info.type_name), name
        assert np.array_equal(_raw(ref, info), _raw(ours, o)), f"{name}: tensor bytes differ from llama.cpp's"
    for key, value in ref.kv.items():
        if key in ("general.size_label",):
            continue
        assert ours.kv.get(key) == value, key
    assert ours.kv["general.quantized_by"] == "quantkit"
    assert ours.kv["tokenizer.ggml.unknown_token_id"] == 0


def test_metadata_values(nano_f32):
    kv = parse_gguf(nano_f32).kv
    assert kv["general.architecture"] == "llama"
    assert kv["llama.rope.freq_base"] == 1e6
    assert kv["llama.attention.head_count"] == 8 and kv["llama.attention.head_count_kv"] == 2
    assert kv["llama.context_length"] == 32768 and kv["llama.block_count"] == 6
    assert kv["general.file_type"] == 0 and kv["general.quantization_version"] == 2
    assert kv["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 6] and kv["tokenizer.ggml.token_type"][300] == 1
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.chat_template"].startswith("{{ bos_token }}")


def test_gguf_package_reads_our_file(nano_f32, nano):
    r = GGUFReader(nano_f32)
    t = {x.name: x for x in r.tensors}
    q = t["blk.0.attn_q.weight"]
    expect = arch.hf_to_interleaved(nano.get_tensor("model.layers.0.self_attn.q_proj.weight").float(), 8)
    assert np.array_equal(np.asarray(q.data), expect.numpy())
    assert t["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32


def test_f32_round_trip_is_exact_and_unpermuted(nano, nano_f32):
    q = read_checkpoint(nano_f32)
    assert q.format == "gguf" and detect_format(nano_f32).name == "gguf"
    assert q.config.num_key_value_heads == 2 and q.config.rope_theta == 1e6 and q.config.rms_norm_eps == 1e-5
    assert set(q.names) == set(nano.tensor_names())
    for name in q.names:
        assert torch.equal(q.get(name), nano.get_tensor(name).float()), name


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "BF16"])
def test_blocks_round_trip(nano, tmp_path, ftype):
    path = write_gguf(nano, tmp_path / f"n-{ftype}.gguf", ftype, pure=True, progress=False)
    q = read_checkpoint(path)
    types = tensor_types(nano.config, ftype, pure=True)
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        t = q.get(name)
        src = nano.get_tensor(name).float()
        if ftype == "BF16":
            assert torch.equal(t, src.to(torch.bfloat16))
            continue
        assert t.type_name == types[name]
        # our stored blocks (un-permuted to HF rows) are the gguf package's encoding of the HF rows
        expect = quantize(src.numpy(), GGMLQuantizationType[t.type_name])
        assert np.array_equal(t.data, expect), name
        np.testing.assert_array_equal(t.dequantize().numpy(), dequantize(expect, GGMLQuantizationType[t.type_name]))


def test_consolidated_source_gives_the_same_file(tmp_path):
    hf = make_random_checkpoint(tmp_path / "hf", layout="hf-single", hidden=64, intermediate=128, vocab=32000)
    cons = make_random_checkpoint(tmp_path / "cons", layout="consolidated", hidden=64, intermediate=128, vocab=32000)
    a = write_gguf(open_checkpoint(hf), tmp_path / "a.gguf", "F32", progress=False, name="x")
    b = write_gguf(open_checkpoint(cons), tmp_path / "b.gguf", "F32", progress=False, name="x")
    fa, fb = parse_gguf(a), parse_gguf(b)
    for name, info in fa.tensors.items():
        assert np.array_equal(_raw(fa, info), _raw(fb, fb.tensors[name])), name


def test_writer_is_atomic_and_checks_its_input(nano, tmp_path):
    out = tmp_path / "x.gguf"
    types = tensor_types(nano.config, "Q8_0")
    with pytest.raises(RuntimeError):
        with GGUFFileWriter(out, nano.config, types, ftype="Q8_0", progress=False) as w:
            w.add("model.norm.weight", nano.get_tensor("model.norm.weight"))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    w = GGUFFileWriter(out, nano.config, types, ftype="Q8_0", progress=False)
    with pytest.raises(FormatError, match="shape"):
        w.add("model.norm.weight", torch.zeros(3))
    with pytest.raises(FormatError, match="not in the GGUF plan"):
        w.add("model.layers.99.mlp.up_proj.weight", torch.zeros(3))
    with pytest.raises(FormatError, match="never written"):
        w.finish()
    assert list(tmp_path.iterdir()) == []


def test_out_of_order_adds_give_the_same_file(nano, tmp_path):
    types = tensor_types(nano.config, "Q8_0")
    paths = []
    for order in (list(types), list(reversed(types))):
        path = tmp_path / f"{len(paths)}.gguf"
        with GGUFFileWriter(path, nano.config, types, ftype="Q8_0", progress=False) as w:
            for name in order:
                w.add(name, nano.get_tensor(name))
            w.finish()
        paths.append(path.read_bytes())
    assert paths[0] == paths[1]


def test_refuses_existing_output_without_force(nano, nano_f32):
    from quantkit.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        write_gguf(nano, nano_f32, "F32", progress=False)
