"""A calibrated Mistral-7B-shaped model end to end on this machine: time, memory, disk, a crash and its resume,
and the outputs loaded by the engines that serve them.

The source is the synthetic BF16 checkpoint of `gguf_convert_speed.generate_checkpoint(..., outliers=True)`:
Mistral-7B-Instruct-v0.2's real tensor names, shapes and shards, nano's (= Mistral's) tokenizer, random weights
with a trained model's uneven statistics (log-normal input-column scales, 8 outlier hidden channels).

    quantkit quantize SRC --method M --preset P --format F [--type T] --calib DIR --calib-samples 128
                      --calib-seqlen 512 -o OUT

runs once with the process tree killed (SIGKILL) as soon as layer `--kill-at` has been checkpointed, then again
with the same arguments, which resumes. Measured on both runs: wall and CPU seconds, the peak of the summed
proportional set size of every process of the run (and the largest single-process VmHWM), the peak disk use of the
output and work directory, and the seconds per layer (from the progress lines, which QUANTKIT_PROGRESS_INTERVAL=0
makes one per layer). Then the outputs are loaded: an HF-layout output (gptq, awq) by transformers + gptqmodel and
by quantkit's runtime on the same tokens (max |logit difference|); a GGUF by llama.cpp (llama-simple, 8 greedy
tokens) and by quantkit's runtime (its greedy tokens).

With `--layers N` < 32 the checkpoint has N decoder layers and the figures are extrapolated to 32 (and say so).

Usage:
  python benchmarks/e2e_7b.py --method gptq --preset w4a16-g128 --format gptq,gguf --type Q4_K_M --kill-at 10
  python benchmarks/e2e_7b.py --method awq --preset w4a16-g128-asym --format awq --layers 4 --kill-at 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_convert_speed import _status_kib, _tree, watch  # noqa: E402

from quantkit.testing import llamacpp_bin, shared_data  # noqa: E402

LAYER_LINE = re.compile(r"layer (\d+)/(\d+)")


def _disk_bytes(out: Path) -> int:
    """Bytes allocated by one run: its output, its work dir (OUT.partial) and the staging directory beside OUT."""
    total = 0
    for entry in out.parent.iterdir():
        if out.name not in entry.name:
            continue
        for dirpath, _, files in os.walk(entry) if entry.is_dir() else [(str(out.parent), [], [entry.name])]:
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
    return total


def run_measured(cmd: list[str], log: Path, out: Path, kill_at: int | None = None) -> dict:
    """Run `cmd` in its own process group; sample memory (2 s) and disk (10 s); note when each layer line first
    appears; SIGKILL the whole group once layer `kill_at` is reported done."""
    env = {**os.environ, "QUANTKIT_PROGRESS_INTERVAL": "0"}
    layer_times: dict[int, float] = {}
    peak: dict = {"pss": 0, "hwm": 0, "disk": 0, "at": None}
    state = {"text": "", "killed": False}
    t0 = time.perf_counter()
    with open(log, "w") as f, open(log, errors="replace") as reader:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        def sample(tick: int) -> None:
            if tick % 2 == 0:  # reading every process's smaps costs CPU the measured run would lose
                pids = _tree(proc.pid)
                pss = sum(_status_kib(p, "smaps_rollup", "Pss:") for p in pids)
                if pss > peak["pss"]:  # where the run was at its peak: its last progress line then
                    lines = [ln for ln in state["text"].replace("\r", "\n").splitlines() if ln.strip()]
                    peak["pss"] = pss
                    peak["at"] = (round(time.perf_counter() - t0, 1), lines[-1][-160:] if lines else "")
                peak["hwm"] = max([peak["hwm"]] + [_status_kib(p, "status", "VmHWM:") for p in pids])
            if tick % 10 == 0:
                peak["disk"] = max(peak["disk"], _disk_bytes(out))
            state["text"] = (state["text"] + reader.read())[-4096:]
            for m in LAYER_LINE.finditer(state["text"]):
                layer_times.setdefault(int(m.group(1)), time.perf_counter() - t0)
            if kill_at is not None and not state["killed"] and max(layer_times, default=0) >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                state["killed"] = True

        wall, code, cpu = watch(proc, sample, 1.0)
    killed = state["killed"]
    if code and not killed:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    done = sorted(layer_times.items())
    per_layer = [round(b - a, 1) for (_, a), (_, b) in zip(done, done[1:])]
    return {"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "peak_pss_gib": round(peak["pss"] / 1024**2, 3), "peak_pss_at": peak["at"],
            "peak_vmhwm_gib": round(peak["hwm"] / 1024**2, 3),
            "peak_disk_gib": round(peak["disk"] / 1024**3, 3), "killed": killed,
            "layers_reported": [k for k, _ in done], "layer_seconds": per_layer}


def verify_hf(path: Path, tokenizer_dir: Path) -> dict:
    """Load an HF-layout output in transformers (+ gptqmodel) and in quantkit's runtime; compare logits."""
    code = f"""
import json, torch
from quantkit.formats.clients import transformers_logits_fn
from quantkit.model.tokenizer import load_tokenizer
from quantkit.runtime.model import load_model
tok = load_tokenizer({str(tokenizer_dir / 'tokenizer.model')!r})
ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog, and then it")[:16]])
ref = transformers_logits_fn({str(path)!r})(ids)[0]
ours = load_model({str(path)!r}, cpu_kernels=False)
with torch.no_grad():
    got = ours(ids).float()[0]
d = (got - ref).abs().max().item()
print(json.dumps({{"tokens": ids.shape[1], "finite": bool(torch.isfinite(ref).all()), "max_abs_logit_diff": d,
                  "logit_scale": ref.abs().max().item(),
                  "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}}))
"""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        return {"ok": False, "error": out.stderr[-2000:]}
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    return {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **measured}


def verify_gguf(path: Path) -> dict:
    """llama.cpp loads and runs the file (8 greedy tokens); quantkit's runtime generates from it too."""
    simple = llamacpp_bin("llama-simple")
    if simple is None:
        return {"ok": False, "error": "llama-simple not found"}
    prompt = "The quick brown fox"
    t0 = time.perf_counter()
    out = subprocess.run([str(simple), "-m", str(path), "-n", "8", prompt], capture_output=True, text=True)
    res = {"ok": out.returncode == 0, "llamacpp_seconds": round(time.perf_counter() - t0, 1),
           "llamacpp_text": out.stdout.strip()[-200:]}
    if out.returncode:
        res["error"] = out.stderr[-2000:]
        return res
    q = subprocess.run([sys.executable, "-m", "quantkit", "generate", str(path), prompt,
                        "--max-tokens", "8", "--temperature", "0"], capture_output=True, text=True)
    res["quantkit_ok"] = q.returncode == 0
    res["quantkit_text"] = (q.stdout.strip() or q.stderr.strip())[-200:]
    return res


def synthetic_checkpoint(work: Path, layers: int) -> Path:
    """The synthetic 7B-shaped checkpoint with `layers` decoder layers under `work`, generated once (in a child
    process: keeps the measuring process small)."""
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"mistral-7b-shaped-{layers}L-outliers"
    if not (src / ".complete").exists():
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; "
                        "import gguf_convert_speed as g; g.generate_checkpoint(Path(sys.argv[1]), int(sys.argv[2]), "
                        "outliers=True)", str(src), str(layers)], check=True, cwd=Path(__file__).resolve().parents[1])
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--work", default="/tmp/e2e7b")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--preset", default="w4a16-g128")
    ap.add_argument("--format", default="gptq,gguf")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--calib", default=str(shared_data("pg-english", "calib") or "builtin"))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--compute-dtype", default="auto", help="quantize --compute-dtype (auto, float32, bfloat16)")
    ap.add_argument("--kill-at", type=int, default=10, help="SIGKILL the run after this layer (0: no crash)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    args = ap.parse_args()

    work = Path(args.work)
    src = synthetic_checkpoint(work, args.layers)
    tag = f"{args.method}-{args.format.replace(',', '+')}-{args.compute_dtype}"
    out = work / f"out-{tag}-{args.layers}L"
    for stale in (out, out.with_name(out.name + ".partial")):
        if stale.exists():
            shutil.rmtree(stale)
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(src), "--method", args.method, "--preset", args.preset,
           "--format", args.format, "--calib", args.calib, "--calib-samples", str(args.calib_samples),
           "--calib-seqlen", str(args.calib_seqlen), "--compute-dtype", args.compute_dtype, "-o", str(out)]
    if "gguf" in args.format.split(","):
        cmd += ["--type", args.type]
    runs = []
    if args.kill_at:
        runs.append(run_measured(cmd, work / f"{tag}-run1.log", out, kill_at=args.kill_at))
        print(f"run 1 (killed after layer {args.kill_at}): {runs[-1]}", file=sys.stderr)
    runs.append(run_measured(cmd, work / f"{tag}-run{len(runs) + 1}.log", out))
    resumed = re.search(r"resuming from layer (\d+)", (work / f"{tag}-run{len(runs)}.log").read_text())
    print(f"run {len(runs)}: {runs[-1]}", file=sys.stderr)

    outputs = {}
    for fmt in args.format.split(","):
        multi = len(args.format.split(",")) > 1
        if fmt == "gguf":
            p = next(out.glob("*.gguf")) if multi else out
            outputs[fmt] = {"path": str(p), "bytes": p.stat().st_size, "verify": verify_gguf(p)}
        else:
            p = out / fmt if multi else out
            size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
            outputs[fmt] = {"path": str(p), "bytes": size, "verify": verify_hf(p, src)}
        print(f"{fmt}: {outputs[fmt]}", file=sys.stderr)

    layer_s = [s for r in runs for s in r["layer_seconds"]]
    total = sum(r["seconds"] for r in runs)
    result = {"layers": args.layers, "command": cmd, "runs": runs, "resumed_from_layer":
              int(resumed.group(1)) if resumed else None, "total_seconds": round(total, 1),
              "median_layer_seconds": sorted(layer_s)[len(layer_s) // 2] if layer_s else None,
              "peak_pss_gib": max(r["peak_pss_gib"] for r in runs),
              "peak_disk_gib": max(r["peak_disk_gib"] for r in runs), "outputs": outputs}
    if args.layers < 32 and layer_s:
        result["extrapolated_32_layer_seconds"] = round(total + (32 - args.layers) * result["median_layer_seconds"], 1)
    (work / f"result-{tag}-{args.layers}L.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
