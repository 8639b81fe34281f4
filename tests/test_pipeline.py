"""The layer-wise pipeline: RTN equality, one layer in memory, GPTQ through the pipeline, resume, bad input."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.calib import load_calibration
from quantkit.errors import CalibrationError, CheckpointError
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.reference import Transformer
from quantkit.formats.dump import DumpWriter, read_dump
from quantkit.errors import OutOfSpaceError
from quantkit.pipeline.layerwise import PipelineOptions, quantize_model
from quantkit.pipeline.plan import build_plan
from quantkit.quant.rtn import quantize_rtn
from quantkit.tensors import QuantTensor
from quantkit.testing import make_random_checkpoint

SMALL = dict(hidden=64, intermediate=128, heads=4, kv_heads=2)


def _ckpt(tmp_path, layers=2, name="src", **kw):
    return open_checkpoint(make_random_checkpoint(tmp_path / name, layers=layers, **{**SMALL, **kw}))


def _calib_file(tmp_path) -> Path:
    from quantkit.calib import BUILTIN_DIR

    path = tmp_path / "calib.txt"
    path.write_text((BUILTIN_DIR / "prose.txt").read_text()[:40_000])
    return path


def _tokens(ckpt, tmp_path, n=8, seqlen=64):
    from quantkit.model.tokenizer import load_tokenizer

    return load_calibration(str(_calib_file(tmp_path)), load_tokenizer(ckpt.tokenizer_path), n, seqlen, seed=0).tokens


def test_rtn_pipeline_equals_per_tensor_quantize_rtn(tmp_path):
    ckpt = _ckpt(tmp_path)
    plan = build_plan(ckpt.config, preset="w4a16-g32-asym", formats=["dump"], checkpoint=ckpt)
    result = quantize_model(ckpt, plan.targets(), [DumpWriter(tmp_path / "out")], progress=False)
    stored = read_dump(tmp_path / "out")
    assert [n for n, _ in stored] == [e.name for e in plan.entries]  # file order
    n_quant = 0
    for name, t in stored:
        src = ckpt.get_tensor(name)
        target = plan.targets()[name]
        if target is None:
            assert torch.equal(t, src), name
            continue
        ref = quantize_rtn(src, target)
        assert isinstance(t, QuantTensor)
        assert torch.equal(t.codes, ref.codes) and torch.equal(t.scales, ref.scales) and torch.equal(t.zeros, ref.zeros)
        n_quant += 1
    assert n_quant == 14 and len(result.log) == 14
    assert not (tmp_path / "out.partial").exists()


def test_only_one_layer_is_loaded_at_a_time(tmp_path, monkeypatch):
    """Tensors are read layer by layer, each once, in order: at most one layer's weights are resident."""
    ckpt = _ckpt(tmp_path, layers=4)
    tokens = _tokens(ckpt, tmp_path, n=4, seqlen=32)
    calls = []
    real = type(ckpt).get_tensor

    def spy(self, name):
        calls.append(name)
        return real(self, name)

    monkeypatch.setattr(type(ckpt), "get_tensor", spy)
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"], method="gptq", checkpoint=ckpt)
    quantize_model(ckpt, plan.targets(), [DumpWriter(tmp_path / "out")], tokens, PipelineOptions(method="gptq"),
                   progress=False)
    layer_of = [int(n.split(".")[2]) for n in calls if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)
    assert len(calls) == len(set(calls)) == len(ckpt.tensors)


def _logits(ckpt, tensors: dict, tokens):
    model = Transformer.from_checkpoint(ckpt, torch.float32)
    state = model.state_dict()
    for name, t in tensors.items():
        state[name] = t.dequantize() if isinstance(t, QuantTensor) else t.float()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(tokens)


def test_gptq_pipeline_beats_rtn_on_calibration_output(tmp_path):
    ckpt = _ckpt(tmp_path, layers=2)
    tokens = _tokens(ckpt, tmp_path, n=8, seqlen=64)
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"], method="gptq", checkpoint=ckpt)
    ref = _logits(ckpt, {}, tokens)
    errs = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        res = quantize_model(ckpt, plan.targets(), [DumpWriter(out)], tokens if method == "gptq" else None,
                             PipelineOptions(method=method), progress=False)
        logits = _logits(ckpt, dict(read_dump(out)), tokens)
        errs[method] = float((logits - ref).pow(2).mean())
        if method == "gptq":
            assert all("loss" in r and r["n_tokens"] == 8 * 64 for r in res.log)
    assert errs["gptq"] < 0.9 * errs["rtn"], errs


def test_group_aware_order_is_an_option_of_the_run_and_needs_no_group_index(tmp_path):
    """PipelineOptions.group_aware reaches GPTQ: the weights differ from the natural order's, and the groups stay
    contiguous (no g_idx, so no act-order flag in the output)."""
    ckpt = _ckpt(tmp_path, layers=2)
    tokens = _tokens(ckpt, tmp_path, n=8, seqlen=64)
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"], method="gptq", checkpoint=ckpt)
    out = {}
    for aware in (False, True):
        quantize_model(ckpt, plan.targets(), [DumpWriter(tmp_path / str(aware))], tokens,
                       PipelineOptions(method="gptq", group_aware=aware), progress=False)
        out[aware] = dict(read_dump(tmp_path / str(aware)))
    quantized = [n for n, t in out[True].items() if isinstance(t, QuantTensor)]
    assert quantized and not any(out[True][n].has_act_order for n in quantized)
    assert any(not torch.equal(out[True][n].codes, out[False][n].codes) for n in quantized)


def test_gptq_needs_calibration(tmp_path):
    ckpt = _ckpt(tmp_path)
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"], method="gptq")
    with pytest.raises(CalibrationError, match="needs calibration data"):
        quantize_model(ckpt, plan.targets(), [DumpWriter(tmp_path / "out")], None, PipelineOptions(method="gptq"))
    assert not (tmp_path / "out").exists()


def test_nan_weight_names_the_tensor_and_writes_nothing(tmp_path):
    src = make_random_checkpoint(tmp_path / "src", layers=2, shards=1, **SMALL)
    file = src / "model.safetensors"
    state = load_file(str(file))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(file), metadata={"format": "pt"})
    ckpt = open_checkpoint(src)
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"])
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: weight contains NaN or Inf"):
        quantize_model(ckpt, plan.targets(), [DumpWriter(tmp_path / "out")], progress=False)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_rank_deficient_hessian_recovers(tmp_path):
    """8 calibration tokens for 128 input features: H is singular; with a tiny damp the Cholesky fails and
    GPTQ raises the damping (or falls back to fp64) instead of failing."""
    ckpt = _ckpt(tmp_path)
    tokens = _tokens(ckpt, tmp_path, n=1, seqlen=8)
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"], method="gptq")
    with pytest.warns(UserWarning):
        res = quantize_model(ckpt, plan.targets(), [DumpWriter(tmp_path / "out")], tokens,
                             PipelineOptions(method="gptq", damp=1e-9), progress=False)
    down = [r for r in res.log if r["module"] == "mlp.down_proj"]
    assert down and all(r["damp"] > 1e-9 or r["damp_retries"] > 0 for r in down)
    assert (tmp_path / "out" / "dump.json").exists()


def test_each_hessian_is_freed_at_its_last_solve(tmp_path, monkeypatch):
    """A gptq,gguf-shaped run solves each group's linears for two target sets from one Hessian: the last solve of
    each group (and only it) frees the Hessian."""
    from quantkit.quant.gptq import GPTQ

    ckpt = _ckpt(tmp_path)
    tokens = _tokens(ckpt, tmp_path, n=2, seqlen=32)
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"], method="gptq")
    released = []
    real = GPTQ.release
    monkeypatch.setattr(GPTQ, "release", lambda self: released.append(self.name) or real(self))
    quantize_model(ckpt, plan.targets(), [DumpWriter(tmp_path / "out")], tokens, PipelineOptions(method="gptq"),
                   progress=False)
    groups = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert released == [f"model.layers.{i}.{g}" for i in range(ckpt.config.num_hidden_layers) for g in groups]


def test_out_of_disk_is_a_clear_error_and_nothing_is_half_written(tmp_path, monkeypatch):
    ckpt = _ckpt(tmp_path)
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"])
    import quantkit.formats.dump as dump

    real = dump.save_tensors

    def full_disk(path, *a, **kw):
        if ".out.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(dump, "save_tensors", full_disk)
    writer = DumpWriter(tmp_path / "out", max_shard_bytes=1)  # writes while the layers stream in
    with pytest.raises(OutOfSpaceError, match="out of disk space.*nothing was written"):
        quantize_model(ckpt, plan.targets(), [writer], work_dir=tmp_path / "work", progress=False)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


# ---- resume: kill a real run after layer k, re-run, compare bytes ----

RUNNER = textwrap.dedent("""
    import os, signal, sys
    from quantkit.pipeline import layerwise as pipeline
    kill_after = int(os.environ.get("KILL_AFTER_LAYER", "-1"))
    if kill_after >= 0:
        pipeline.LAYER_DONE_HOOKS.append(lambda i: os.kill(os.getpid(), signal.SIGKILL) if i == kill_after else None)
    from quantkit.cli import main
    main(sys.argv[1:])
""")


def _run_cli(args, kill_after=-1):
    env = dict(os.environ, KILL_AFTER_LAYER=str(kill_after))
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=env, timeout=600)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _comparable(d: Path) -> dict[str, bytes]:
    files = _files(d)
    files.pop("quant_log.jsonl")  # wall-clock timings
    files.pop("README.md", None)  # model card: creation date
    if "quantkit.json" in files:  # provenance record: creation time
        record = json.loads(files.pop("quantkit.json"))
        record.pop("created", None)
        files["quantkit.json"] = json.dumps(record, sort_keys=True).encode()
    return files


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["dump", "gptq"])
def test_killed_run_resumes_to_byte_identical_output(tmp_path, fmt):
    src = make_random_checkpoint(tmp_path / "src", layers=4, **SMALL)
    calib = _calib_file(tmp_path)
    common = ["quantize", str(src), "--method", "gptq", "--preset", "w4a16-g32", "--format", fmt, "--calib", str(calib),
              "--calib-samples", "4", "--calib-seqlen", "64", "--no-progress", "--json"]
    full = _run_cli(common + ["-o", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr

    killed = _run_cli(common + ["-o", str(tmp_path / "resumed")], kill_after=1)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed").exists()
    state = json.loads((tmp_path / "resumed.partial" / "state.json").read_text())
    assert state["completed_layers"] == 2

    resumed = _run_cli(common + ["-o", str(tmp_path / "resumed")])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_layer"] == 2
    assert "resuming from layer 2/4" in resumed.stderr
    a, b = _comparable(tmp_path / "full"), _comparable(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(k.endswith(".safetensors") for k in a)
    for name in a:
        assert a[name] == b[name], name
    assert not (tmp_path / "resumed.partial").exists()

    # a different argument does not reuse the checkpoints of another run
    _run_cli(common[:-1] + ["--seed", "1", "-o", str(tmp_path / "other")], kill_after=0)
    other = _run_cli(common + ["--seed", "2", "-o", str(tmp_path / "other")])
    assert other.returncode == 0 and json.loads(other.stdout)["resumed_from_layer"] == 0


# ---- one calibration, integer formats and GGUF ----

K_SHAPES = dict(hidden=256, intermediate=512, heads=4, kv_heads=2)  # k-quant blocks (256) fit every matrix


@pytest.mark.slow
def test_gptq_and_gguf_from_one_calibration(tmp_path):
    """--format gptq,gguf --type Q4_K_M: the gptq output is byte-identical to a gptq-only run (the GGUF tensors are
    a companion that never enters the forward), the GGUF file has the Q4_K_M mix, GPTQ-calibrated (its log rows
    say so), and a run killed after layer 1 resumes to byte-identical outputs."""
    from quantkit.gguf.reader import GGUFModel

    src = make_random_checkpoint(tmp_path / "src", layers=3, **K_SHAPES)
    calib = _calib_file(tmp_path)
    common = ["quantize", str(src), "--method", "gptq", "--preset", "w4a16-g128", "--calib", str(calib),
              "--calib-samples", "4", "--calib-seqlen", "64", "--no-progress", "--json"]
    mixed = common + ["--format", "gptq,gguf", "--type", "Q4_K_M"]
    for args, out in ((mixed, "full"), (common + ["--format", "gptq"], "gptq-only"),
                      (common + ["--format", "gguf", "--type", "Q4_K_M"], "gguf-only.gguf")):
        run = _run_cli(args + ["-o", str(tmp_path / out)])
        assert run.returncode == 0, run.stderr
    full = tmp_path / "full"
    weights = lambda d: {k: v for k, v in _files(d).items() if k.endswith(".safetensors")}  # noqa: E731
    assert weights(full / "gptq") == weights(tmp_path / "gptq-only") != {}
    ours, alone = GGUFModel(full / "model-Q4_K_M.gguf"), GGUFModel(tmp_path / "gguf-only.gguf")
    assert {n: i.type_name for n, i in ours.names.items()} == {n: i.type_name for n, i in alone.names.items()}
    assert "Q6_K" in {i.type_name for i in ours.names.values()}
    rows = [json.loads(line) for line in (full / "gptq" / "quant_log.jsonl").read_text().splitlines()]
    companion = [r for r in rows if r.get("output") == "gguf"]
    assert len(companion) == 3 * 7 + 1 and all(r["method"] == "gptq" for r in companion)  # 7 linears/layer + lm_head

    killed = _run_cli(mixed + ["-o", str(tmp_path / "resumed")], kill_after=1)
    assert killed.returncode == -signal.SIGKILL
    resumed = _run_cli(mixed + ["-o", str(tmp_path / "resumed")])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_layer"] == 2
    assert _comparable(tmp_path / "resumed" / "gptq") == _comparable(full / "gptq")
    gguf = "model-Q4_K_M.gguf"
    assert (tmp_path / "resumed" / gguf).read_bytes() == (full / gguf).read_bytes()


# ---- the dtype of GPTQ's calibration forward ----

def test_compute_dtype_auto_follows_the_checkpoint(tmp_path):
    from quantkit.pipeline.quantize import make_plan

    bf16 = _ckpt(tmp_path, name="bf16", dtype=torch.bfloat16)
    fp32 = _ckpt(tmp_path, name="fp32", dtype=torch.float32)
    plans = {name: make_plan(ckpt, method="gptq", preset="w4a16-g32", formats="dump", compute_dtype=choice)
             for name, ckpt, choice in (("bf16", bf16, "auto"), ("fp32", fp32, "auto"), ("forced", bf16, "float32"))}
    assert [p.compute_dtype for p in plans.values()] == ["bfloat16", "float32", "float32"]
    # the bf16 forward halves the activations the estimate counts
    assert plans["bf16"].memory["activation_bytes"] * 2 == plans["forced"].memory["activation_bytes"]
    with pytest.raises(Exception, match="expected auto, float32 or bfloat16"):
        make_plan(bf16, method="gptq", preset="w4a16-g32", formats="dump", compute_dtype="float16")


def test_bf16_forward_gptq_matches_fp32_quality(tmp_path):
    """GPTQ with the calibration forward and Hessian products in bf16 (as a bf16 model runs): the quantized model's
    error on the calibration text is within 5% of the fp32 forward's, and far below RTN's."""
    ckpt = _ckpt(tmp_path, layers=2, dtype=torch.bfloat16)
    tokens = _tokens(ckpt, tmp_path, n=8, seqlen=64)
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"], method="gptq", checkpoint=ckpt)
    ref = _logits(ckpt, {}, tokens)
    errs = {}
    for name, method, dtype in (("rtn", "rtn", "float32"), ("fp32", "gptq", "float32"), ("bf16", "gptq", "bfloat16")):
        out = tmp_path / name
        quantize_model(ckpt, plan.targets(), [DumpWriter(out)], tokens if method == "gptq" else None,
                       PipelineOptions(method=method, compute_dtype=dtype), progress=False)
        errs[name] = float((_logits(ckpt, dict(read_dump(out)), tokens) - ref).pow(2).mean())
    assert errs["bf16"] < 1.05 * errs["fp32"] and errs["bf16"] < 0.9 * errs["rtn"], errs
