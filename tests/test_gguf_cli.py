"""GGUF end to end: data-free conversion with an importance matrix is byte-identical to llama-quantize --imatrix;
`quantkit imatrix` writes a file llama-quantize accepts."""

import json
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner


from quantkit.cli import cli
from quantkit.ggml_types import type_size
from quantkit.gguf.convert import convert_to_gguf, write_gguf
from quantkit.gguf.imatrix import Imatrix, write_imatrix
from quantkit.gguf.reader import parse_gguf
from quantkit.model import arch
from quantkit.model.checkpoint import open_checkpoint
from tests.conftest import require_llamacpp


def _differing_blocks(a_path, b_path):
    a, b = parse_gguf(a_path), parse_gguf(b_path)
    assert set(a.tensors) == set(b.tensors)
    bad = total = 0
    for name, i in a.tensors.items():
        j = b.tensors[name]
        assert (i.type_name, i.shape) == (j.type_name, j.shape), name
        size = type_size(i.type_name)
        x = np.memmap(a.path, np.uint8, "r", i.offset, (i.nbytes,)).reshape(-1, size)
        y = np.memmap(b.path, np.uint8, "r", j.offset, (j.nbytes,)).reshape(-1, size)
        bad += int((x != y).any(1).sum())
        total += len(x)
    return bad, total


@pytest.fixture(scope="module")
def nano(nano_path):
    return open_checkpoint(nano_path)


@pytest.fixture(scope="module")
def synthetic_imatrix(nano, tmp_path_factory):
    """A deterministic imatrix with the shapes of mistral-nano's linears (positive, heavy-tailed like real ones)."""
    rng = np.random.default_rng(0)
    sums, counts = {}, {}
    for name, shape in nano.config.expected_shapes().items():
        if arch.is_quantizable_linear(name):
            sums[name] = (rng.lognormal(0.0, 1.5, size=shape[1]) * 1000).astype(np.float32)
            counts[name] = 1000
    path = tmp_path_factory.mktemp("imx") / "synthetic.imatrix.gguf"
    write_imatrix(path, Imatrix.from_canonical(sums, counts, datasets=["synthetic"], chunk_count=10, chunk_size=100))
    return path


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q4_0", "IQ4_XS", "IQ4_NL", "Q2_K_S", "IQ3_M", "IQ3_S", "IQ3_XS",
                                   "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"])
def test_imatrix_quantization_is_byte_identical_to_llama_quantize(nano, synthetic_imatrix, tmp_path, ftype):
    tool = require_llamacpp("llama-quantize")["llama-quantize"]
    f32 = write_gguf(nano, tmp_path / "f32.gguf", "F32", progress=False)
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([str(tool), "--imatrix", str(synthetic_imatrix), str(f32), str(theirs), ftype, "2"], check=True,
                   capture_output=True)
    summary = convert_to_gguf(nano.path, tmp_path / "ours.gguf", ftype, imatrix=synthetic_imatrix, progress=False)
    bad, total = _differing_blocks(theirs, summary["output"])
    assert bad == 0, f"{bad} of {total} blocks differ"
    kv = parse_gguf(summary["output"]).kv
    assert kv["quantize.imatrix.entries_count"] == 6 * 7 and kv["quantize.imatrix.chunks_count"] == 10


@pytest.mark.parametrize("ftype", ["Q4_K_M", "IQ4_XS", "IQ4_NL", pytest.param("Q6_K", marks=pytest.mark.slow),
                                   pytest.param("Q2_K", marks=pytest.mark.slow),
                                   pytest.param("Q3_K_M", marks=pytest.mark.slow),
                                   pytest.param("Q5_K_M", marks=pytest.mark.slow),
                                   pytest.param("Q4_0", marks=pytest.mark.slow),
                                   pytest.param("Q8_0", marks=pytest.mark.slow)])
def test_data_free_mix_is_byte_identical_to_llama_quantize(nano, tmp_path, ftype):
    tool = require_llamacpp("llama-quantize")["llama-quantize"]
    f32 = write_gguf(nano, tmp_path / "f32.gguf", "F32", progress=False)
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([str(tool), str(f32), str(theirs), ftype, "2"], check=True, capture_output=True)
    ours = write_gguf(nano, tmp_path / "ours.gguf", ftype, progress=False)
    bad, total = _differing_blocks(theirs, ours)
    assert bad == 0, f"{bad} of {total} blocks differ"


@pytest.mark.slow
def test_imatrix_command_writes_a_file_llama_quantize_uses(nano_path, tmp_path):
    tool = require_llamacpp("llama-quantize")["llama-quantize"]
    out = tmp_path / "nano.imatrix.gguf"
    res = CliRunner().invoke(cli, ["imatrix", str(nano_path), "--calib", "builtin", "--calib-samples", "4",
                                   "--calib-seqlen", "64", "-o", str(out), "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["entries"] == 42
    f32 = write_gguf(open_checkpoint(nano_path), tmp_path / "f32.gguf", "F32", progress=False)
    log = subprocess.run([str(tool), "--imatrix", str(out), str(f32), str(tmp_path / "q.gguf"), "Q4_K_M", "2"],
                         check=True, capture_output=True, text=True)
    assert "42 importance matrix entries" in log.stdout + log.stderr


def test_convert_command_gguf_bf16(nano_path, nano, tmp_path):
    import torch

    from quantkit.formats.base import read_checkpoint

    out = tmp_path / "nano-BF16.gguf"
    res = CliRunner().invoke(cli, ["convert", str(nano_path), "--format", "gguf", "--type", "BF16", "-o", str(out),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    q = read_checkpoint(out)
    kv = q.metadata["gguf"]
    assert kv["general.file_type"] == 32 and kv["general.quantized_by"] == "quantkit"
    for name in ("model.layers.3.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"):
        t = q.get(name)
        expect = nano.get_tensor(name)
        assert torch.equal(t, expect.float() if name.endswith("norm.weight") else expect), name
    again = CliRunner().invoke(cli, ["convert", str(nano_path), "--format", "gguf", "--type", "BF16", "-o", str(out)])
    assert again.exit_code != 0 and "already exists" in str(again.exception or again.output)


def test_convert_command_rejects_unknown_type(nano_path, tmp_path):
    res = CliRunner().invoke(cli, ["convert", str(nano_path), "--format", "gguf", "--type", "Q7_X",
                                   "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code != 0 and "Q7_X" in str(res.exception)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_quantize_command_gguf_goes_through_the_pipeline_to_the_same_bytes(nano_path, nano, tmp_path):
    """`quantkit quantize --format gguf --type Q4_K_M` (calibration pipeline -> GGUF writer, GGMLTensors in HF row
    order) gives the same blocks as the streaming converter."""
    out = tmp_path / "q.gguf"
    res = CliRunner().invoke(cli, ["quantize", str(nano_path), "--format", "gguf", "--type", "Q4_K_M", "-o", str(out),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    ref = write_gguf(nano, tmp_path / "ref.gguf", "Q4_K_M", progress=False)
    assert _differing_blocks(out, ref)[0] == 0
