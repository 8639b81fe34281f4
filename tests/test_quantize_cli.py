"""`quantkit quantize` end to end on small random checkpoints: real format writers, several formats in one run,
GGUF through the pipeline (RTN equals the per-tensor encoder; imatrix; GPTQ onto ggml grids), bad input."""

import json

import numpy as np
import pytest
import torch

from quantkit.cli import main as cli_main
from quantkit.formats.base import read_checkpoint
from quantkit.model.checkpoint import open_checkpoint
from quantkit.quant.rtn import quantize_rtn
from quantkit.quant.scheme import get_preset
from quantkit.tensors import GGMLTensor, QuantTensor
from quantkit.testing import make_random_checkpoint

SMALL = dict(hidden=64, intermediate=256, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("m") / "src", layers=2, **SMALL)


@pytest.fixture(scope="module")
def calib_txt(tmp_path_factory):
    from quantkit.calib import BUILTIN_DIR

    path = tmp_path_factory.mktemp("c") / "calib.txt"
    path.write_text((BUILTIN_DIR / "prose.txt").read_text()[:30_000])
    return path


def _quantize(args, capsys):
    cli_main(["quantize", *args, "--json", "--no-progress"])
    return json.loads(capsys.readouterr().out)


def test_rtn_to_gptq_and_awq_formats_in_one_run(src, tmp_path, capsys):
    out = tmp_path / "out"
    r = _quantize([str(src), "--preset", "w4a16-g32-asym", "--format", "gptq,awq", "-o", str(out)], capsys)
    assert {o["format"] for o in r["outputs"]} == {"gptq", "awq"}
    assert (out / "gptq" / "config.json").exists() and (out / "awq" / "config.json").exists()
    assert (out / "gptq" / "quant_log.jsonl").exists()
    ckpt = open_checkpoint(src)
    scheme = get_preset("w4a16-g32-asym")
    for fmt in ("gptq", "awq"):
        q = read_checkpoint(out / fmt)
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            t = q.get(name)
            ref = quantize_rtn(ckpt.get_tensor(name), scheme)
            assert isinstance(t, QuantTensor)
            assert torch.equal(t.dequantize(), ref.dequantize()), (fmt, name)
    assert r["resumed_from_layer"] == 0
    for o in r["outputs"]:  # each format reports its own planned size, and it is what was written (+ headers)
        assert o["planned_bpw"] < 16 and o["planned_bytes"] <= o["bytes"] < o["planned_bytes"] * 1.01, o
    # the GPTQ config's meta says nothing of damping for RTN weights (there was none)
    meta = json.loads((out / "gptq" / "quantize_config.json").read_text())["meta"]
    assert "damp_percent" not in meta and meta["quantizer"][0].startswith("quantkit:")


def test_gptq_config_records_the_solver_settings(src, calib_txt, tmp_path, capsys):
    """quantize_config.json's meta says how the weights were solved: the defaults (damp 0.1, group-aware order),
    or what the command line chose."""
    for extra, damp, aware in (([], 0.1, True), (["--damp", "0.02", "--no-group-aware"], 0.02, False)):
        out = tmp_path / f"g{damp}"
        _quantize([str(src), "--method", "gptq", "--preset", "w4a16-g32", "--calib", str(calib_txt),
                   "--calib-samples", "4", "--calib-seqlen", "32", *extra, "-o", str(out)], capsys)
        meta = json.loads((out / "quantize_config.json").read_text())["meta"]
        assert meta["damp_percent"] == damp and meta["act_group_aware"] is aware
        prov = json.loads((out / "quantkit.json").read_text())
        assert json.dumps(prov).count('"group_aware": ' + json.dumps(aware)) >= 1


def test_gguf_rtn_through_pipeline_equals_per_tensor_encoder(src, tmp_path, capsys):
    from quantkit.gguf.codec import encode
    from quantkit.gguf.mixes import tensor_types

    out = tmp_path / "m.gguf"
    _quantize([str(src), "--type", "Q4_K_M", "-o", str(out)], capsys)
    q = read_checkpoint(out)
    ckpt = open_checkpoint(src)
    types = tensor_types(ckpt.config, "Q4_K_M")
    for name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        t = q.get(name)
        assert isinstance(t, GGMLTensor) and t.type_name == types[name]
        ref = encode(ckpt.get_tensor(name), types[name])
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1),
                              np.asarray(ref.data).view(np.uint8).reshape(-1)), name


@pytest.mark.slow
def test_gguf_with_collected_imatrix_and_saved_imatrix(src, calib_txt, tmp_path, capsys):
    from quantkit.gguf.imatrix import read_imatrix

    out = tmp_path / "m.gguf"
    im = tmp_path / "m.imatrix.gguf"
    r = _quantize([str(src), "--type", "Q4_K_M", "--calib", str(calib_txt), "--calib-samples", "4",
                   "--calib-seqlen", "64", "--imatrix-out", str(im), "-o", str(out)], capsys)
    assert r["calibration"]["n_samples"] == 4
    imatrix = read_imatrix(im).to_canonical()
    assert len(imatrix) == 2 * 7 and imatrix["model.layers.1.mlp.down_proj.weight"].shape == (256,)
    # the saved imatrix reproduces the same file when given back with --imatrix
    out2 = tmp_path / "m2.gguf"
    _quantize([str(src), "--type", "Q4_K_M", "--imatrix", str(im), "-o", str(out2)], capsys)
    a, b = read_checkpoint(out), read_checkpoint(out2)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert np.array_equal(np.asarray(a.get(name).data), np.asarray(b.get(name).data)), name


@pytest.mark.slow
def test_gptq_onto_ggml_grid_beats_rtn(src, calib_txt, tmp_path, capsys):
    ckpt = open_checkpoint(src)
    outs = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"{method}.gguf"
        _quantize([str(src), "--type", "Q4_0", "--method", method, "--calib", str(calib_txt), "--calib-samples", "8",
                   "--calib-seqlen", "64", "-o", str(out)], capsys)
        outs[method] = read_checkpoint(out)
    errs = _logit_mse(ckpt, outs, calib_txt)
    assert errs["gptq"] < errs["rtn"], errs


def test_cli_bad_input(src, tmp_path, capsys):
    def run(*args):
        with pytest.raises(SystemExit) as e:
            cli_main(["quantize", *args])
        return e.value.code, capsys.readouterr().err

    code, err = run(str(src), "--preset", "w4a16-g999", "-o", str(tmp_path / "x"))
    assert code == 2 and "'w4a16-g999' is not one of" in err and "w4a16-g128" in err  # click.Choice of PRESETS
    code, err = run(str(src), "--preset", "w4a16-g128", "-o", str(tmp_path / "x"))
    assert code == 1 and "does not divide the input dimension 64" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = run(str(src), "--method", "gptq", "--preset", "w4a16-g32", "--calib", str(empty),
                    "-o", str(tmp_path / "x"))
    assert code == 1 and "contains no text" in err
    (tmp_path / "exists").mkdir()
    code, err = run(str(src), "--preset", "w4a16-g32", "-o", str(tmp_path / "exists"))
    assert code == 4 and "already exists" in err
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "exists"]


def test_dry_run_prints_the_plan(src, tmp_path, capsys):
    cli_main(["quantize", str(src), "--preset", "w4a16-g32", "--method", "gptq", "--dry-run",
              "-o", str(tmp_path / "x")])
    out = capsys.readouterr().out
    assert "quant size" in out and "model.layers.0.mlp.up_proj.weight" in out
    assert not (tmp_path / "x").exists()


def test_awq_method_to_awq_format(src, calib_txt, tmp_path, capsys):
    """AWQ through the pipeline: scales folded into the norms (written), linears read back as QuantTensors, and
    the quantized model is closer to the original on the calibration text than RTN with the same scheme."""
    ckpt = open_checkpoint(src)
    reads = {}
    for method in ("rtn", "awq"):
        out = tmp_path / method
        r = _quantize([str(src), "--method", method, "--preset", "w4a16-g32-asym", "--format", "awq", "--calib",
                       str(calib_txt), "--calib-samples", "8", "--calib-seqlen", "64", "-o", str(out)], capsys)
        assert r["scheme"]["method"] == method
        reads[method] = read_checkpoint(out)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(reads["awq"].get(norm).float(), ckpt.get_tensor(norm).float())  # scales folded
    errs = _logit_mse(ckpt, reads, calib_txt)
    assert errs["awq"] < errs["rtn"], errs


def _logit_mse(ckpt, reads: dict, calib_txt) -> dict:
    """Mean squared logit error against the original model on the calibration text, for each quantized
    checkpoint in `reads` (its decoder-layer tensors, dequantized, loaded into the reference model)."""
    from quantkit.calib import load_calibration
    from quantkit.model.reference import Transformer
    from quantkit.model.tokenizer import load_tokenizer

    tokens = load_calibration(str(calib_txt), load_tokenizer(ckpt.tokenizer_path), 8, 64, seed=0).tokens
    with torch.no_grad():
        want = Transformer.from_checkpoint(ckpt, torch.float32)(tokens)
    errs = {}
    for method, q in reads.items():
        model = Transformer.from_checkpoint(ckpt, torch.float32)
        state = model.state_dict()
        for name in state:
            if ".layers." in name:
                t = q.get(name)
                state[name] = t.dequantize() if isinstance(t, (QuantTensor, GGMLTensor)) else t.float()
        model.load_state_dict(state)
        with torch.no_grad():
            errs[method] = float((model(tokens) - want).pow(2).mean())
    return errs
