"""vLLM (CPU build, its own venv from scripts/build_vllm.sh) as a verified client: `quantkit verify --client vllm`.

mistral-nano quantized by quantkit to GPTQ, AWQ and compressed-tensors is loaded by vLLM 0.32 and compared with
quantkit's reader on the built-in prompts (float16 in vLLM: KLD, same top token, |Δ log p| within
quantkit.eval.verify.VLLM_TOLERANCES). One `verify` call loads several outputs in one vLLM process; each load still
takes ~30 s on two cores, so the outputs are grouped into two calls: those that must pass, and those that must fail
(exit 3) — one corrupted the way a reader/client disagreement looks, two that vLLM's CPU build cannot load.
The subprocess plumbing (per-model errors, vLLM's root cause, timeouts ending vLLM's process group, the missing
venv) is tested with a fake venv, without vLLM.
"""

import json
import os
import shutil
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.api import quantize
from cli_helpers import run_captured
from quantkit.errors import EvalError
from quantkit.eval.vllm_client import missing_vllm, prompt_logprobs



def require_vllm():
    reason = missing_vllm()
    if reason is not None:
        pytest.skip(f"vLLM not installed: {reason}")


@pytest.fixture(scope="module")
def outputs(nano_path, tmp_path_factory):
    """RTN outputs of mistral-nano (the format, not the calibration, is under test): name -> directory."""
    require_vllm()
    root = tmp_path_factory.mktemp("vllm")
    quantize(nano_path, root / "sym", preset="w4a16-g128", formats="gptq,compressed-tensors")
    quantize(nano_path, root / "asym", preset="w4a16-g128-asym", formats="gptq,awq,compressed-tensors")
    quantize(nano_path, root / "w8", preset="w8a16", formats="compressed-tensors")
    found = {"gptq-w4-sym": root / "sym" / "gptq", "ct-w4-sym": root / "sym" / "compressed-tensors",
             "awq-w4-asym": root / "asym" / "awq", "ct-w4-asym": root / "asym" / "compressed-tensors",
             "gptq-w4-asym": root / "asym" / "gptq", "ct-w8": root / "w8"}
    # A reader/client disagreement: one layer's zero points of a symmetric (v1) GPTQ file set to 7 instead of 8.
    # quantkit reads the stored zeros ((q - 7)·s); vLLM's symmetric GPTQ kernels never read qzeros ((q - 8)·s).
    bad = root / "gptq-zeros"
    shutil.copytree(found["gptq-w4-sym"], bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.2.mlp.down_proj.qzeros"
    assert int(tensors[key][0, 0]) & 0xFFFFFFFF == 0x77777777  # v1: zero 8 stored as 7 in every nibble
    tensors[key] = torch.full_like(tensors[key], 0x66666666)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    found["gptq-zeros"] = bad
    return found


def verify_json(capsys, nano_path, *outs):
    code, out = run_captured(capsys, "verify", *map(str, outs), "--ref", str(nano_path), "--client", "vllm", "--json")
    data = json.loads(out.out)  # stdout is JSON only (vLLM's output goes to a log, library noise to stderr)
    return code, (data if isinstance(data, list) else [data]), out.err


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_loads_quantkit_outputs_and_agrees(outputs, nano_path, capsys):
    names = ["gptq-w4-sym", "awq-w4-asym", "ct-w4-sym", "ct-w4-asym"]
    code, results, err = verify_json(capsys, nano_path, *(outputs[n] for n in names))
    measured = {n: {k: r["client"].get(k) for k in ("status", "kld_mean", "same_top", "max_abs_dlogp", "load_s",
                                                   "kernels", "quantization")} for n, r in zip(names, results)}
    print(json.dumps(measured, indent=1))  # the numbers formats/*.md quotes (pytest -s)
    assert code == 0, err
    for name, r in zip(names, results):
        c = r["client"]
        assert c["name"] == "vllm" and c["status"] == "pass", (name, c)
        assert c["dtype"] == "float16" and c["positions"] == r["tokens"] - r["prompts"]
        assert c["kld_mean"] < 1e-4 and c["same_top"] >= 0.97 and c["max_abs_dlogp"] < 0.1, (name, c)
        assert any(k.startswith("CPUWNA16LinearKernel") for k in c["kernels"]), (name, c["kernels"])
        assert c["client_vs_source"]["same_top"] > 0.8  # 4-bit: close to the source, as quantkit's reader is
        assert 0 < r["quantkit_vs_source"]["kld_mean"] < 0.2


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_disagreement_and_unloadable_outputs_exit_3(outputs, nano_path, capsys):
    names = ["gptq-zeros", "ct-w8", "gptq-w4-asym"]
    code, results, err = verify_json(capsys, nano_path, *(outputs[n] for n in names))
    assert code == 3
    by_name = dict(zip(names, (r["client"] for r in results)))
    bad = by_name["gptq-zeros"]
    print(json.dumps({k: bad[k] for k in ("kld_mean", "same_top", "max_abs_dlogp")}))
    assert bad["status"] == "fail" and "kld_mean" in bad["failed_checks"] and bad["kld_mean"] > 1e-3, bad
    # vLLM 0.32's CPU build has 4-bit kernels only (CPUWNA16: uint4 / uint4b8), and its GPTQ config accepts only
    # symmetric schemes: such outputs did not run, which is a failure with vLLM's own reason, not a skip.
    for name, needle in (("ct-w8", "Failed to find a kernel"), ("gptq-w4-asym", "Unsupported quantization config")):
        c = by_name[name]
        assert c["status"] == "not_run" and "vLLM could not load it" in c["reason"] and needle in c["reason"], c
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "3 of 3 outputs failed verification" in lines[0] and "did not run" in lines[0]


# The subprocess plumbing, with a fake vLLM venv whose "python" runs FAKE_RUNNER (no vLLM needed).
FAKE_RUNNER = r"""
import json, os, subprocess, sys, time
args = sys.argv[2:]  # argv[1] is quantkit's vllm_runner.py
out = args[args.index("--out") + 1]
job = json.load(open(args[args.index("--job") + 1]))
mode = os.environ["FAKE_VLLM_MODE"]
if mode == "hang":  # a runner whose engine process outlives it unless the whole group is ended
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open(os.environ["FAKE_VLLM_PIDFILE"], "w").write(str(child.pid))
    time.sleep(300)
models = []
for i, m in enumerate(job["models"]):
    print(f"[quantkit-vllm-runner] model {i}: {m['path']}", flush=True)
    print("(Worker pid=7) INFO 12-06 16:00:00 [cpu.py:1] Using CPUWNA16LinearKernel for mixed-precision linear")
    if i == 0:
        print("(Worker pid=7) INFO [auto_gptq.py:352] Using CPUWNA16LinearKernel for AutoGPTQLinearMethod")
        seqs = [[{"token": t, "logprob": -1.0, "rank": 1, "top": [[t, -1.0]]} for t in ids[1:]]
                for ids in job["sequences"]]
        models.append({"path": m["path"], "load_s": 1.0, "run_s": 0.5, "quantization": "auto_gptq",
                       "dtype": "float16", "sequences": seqs})
    else:
        print("(Worker pid=8) ERROR 12-06 16:00:01 [multiproc_executor.py:953] ValueError: Failed to find a kernel "
              "that can implement the WNA16 linear layer. Reasons: ")
        print("(Worker pid=8) ERROR 12-06 16:00:01 [multiproc_executor.py:953]  CPUWNA16LinearKernel cannot "
              "implement due to: Quant type (uint8b128) not supported")
        models.append({"path": m["path"], "error": "RuntimeError: Engine core initialization failed. See root cause "
                       "above. Failed core proc(s): {}"})
json.dump({"vllm_version": "0.0-fake", "models": models}, open(out, "w"))
"""


@pytest.fixture
def fake_venv(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "lib" / "python3.11" / "site-packages" / "vllm").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "site-packages" / "vllm" / "__init__.py").write_text("")
    (venv / "bin").mkdir()
    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_RUNNER)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{runner}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("QUANTKIT_VLLM_VENV", str(venv))
    return venv


def test_vllm_client_reports_each_model_and_vllms_root_cause(fake_venv, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "ok")
    assert missing_vllm("gptq") is None and "not wired in" in missing_vllm("gguf")
    good, bad = prompt_logprobs([tmp_path / "a", tmp_path / "b"], [[1, 5, 6], [1, 7]], topk=5)
    assert good.error is None and [len(s) for s in good.sequences] == [2, 1]
    assert good.info["kernels"] == ["CPUWNA16LinearKernel for AutoGPTQLinearMethod"]
    assert good.info["vllm_version"] == "0.0-fake"
    assert bad.sequences == [] and bad.error.startswith("ValueError: Failed to find a kernel")
    assert "Quant type (uint8b128) not supported" in bad.error and "Engine core" not in bad.error


def test_vllm_client_timeout_ends_the_whole_process_group(fake_venv, tmp_path, monkeypatch):
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    monkeypatch.setenv("FAKE_VLLM_PIDFILE", str(pidfile))
    with pytest.raises(EvalError, match="did not finish within 3 s"):
        prompt_logprobs([tmp_path / "a"], [[1, 2]], timeout=3)
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the runner's child process {pid} outlived the timeout")


def test_vllm_client_without_venv_names_the_build_script(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_VLLM_VENV", str(tmp_path / "none"))
    assert "scripts/build_vllm.sh" in missing_vllm("gptq")
    with pytest.raises(EvalError, match="build_vllm.sh"):
        prompt_logprobs([tmp_path], [[1, 2]])
