"""AWQ of Mistral-7B-shaped decoder layers on this CPU: quantkit against GPTQModel 7.6, same calibration tokens.

The source is e2e_7b.py's synthetic Mistral-7B-Instruct-v0.2-shaped BF16 checkpoint with `--layers N` decoder
layers (default 1: the whole model is then one layer, embedding and lm_head around it). Both tools quantize it to
AWQ w4a16-g128 with zero points on the same `--calib-samples` × `--calib-seqlen` tokens of pg-english calib
(quantkit.calib.load_calibration, seed 0: the windows `quantkit quantize --calib DIR` draws; their sha256 is
checked against the one quantkit's run reports), each in a process of its own, one after the other:

    quantkit:  quantkit quantize SRC --method awq --preset w4a16-g128-asym --format awq --calib DIR ...
    GPTQModel: GPTQModel.load(SRC, AWQConfig(bits=4, group_size=128, sym=False), device="cpu")
               .quantize(calib, batch_size=4, backend=AWQ_TORCH, calibration_sort=None); .save(OUT)

Measured per tool: wall seconds from the start of the process to the saved output, and the peak of the summed
proportional set size of the process and its children (sampled every 2 s). Printed: quantkit's time as a ratio of
GPTQModel's. GPTQModel's own time per layer is read from its log where it prints one. Both outputs are then loaded
by transformers + gptqmodel and compared with quantkit's runtime on 16 tokens (`--verify`).

    GPTQMODEL_CPU_WORKERS=2 python benchmarks/awq_layer_7b.py [--layers 1] [--calib-samples 128]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from e2e_7b import synthetic_checkpoint, verify_hf  # noqa: E402
from gguf_convert_speed import _status_kib, _tree, watch  # noqa: E402

from quantkit.testing import shared_data  # noqa: E402

GPTQMODEL_AWQ = """
import sys, time, torch
from gptqmodel import BACKEND, GPTQModel
from gptqmodel.quantization.config import AWQConfig
src, tokens_file, out = sys.argv[1:4]
tokens = torch.load(tokens_file)
calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in tokens]
t0 = time.perf_counter()
model = GPTQModel.load(src, AWQConfig(bits=4, group_size=128, sym=False), device="cpu")
t1 = time.perf_counter()
model.quantize(calib, batch_size=4, backend=BACKEND.AWQ_TORCH, calibration_sort=None)
t2 = time.perf_counter()
model.save(out)
print(f"GPTQMODEL_SECONDS load={t1 - t0:.1f} quantize={t2 - t1:.1f} save={time.perf_counter() - t2:.1f}", flush=True)
"""


def run(cmd: list[str], log: Path, stdout: Path | None = None) -> dict:
    """Wall seconds and the peak summed PSS (GiB) of `cmd` and its children; its output goes to `log` (its standard
    output to `stdout` when given)."""
    peak = {"pss": 0}
    with open(log, "w") as f, open(stdout or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out if stdout else f, stderr=f,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def sample(tick: int) -> None:
            if tick % 2 == 0:
                peak["pss"] = max(peak["pss"], sum(_status_kib(p, "smaps_rollup", "Pss:") for p in _tree(proc.pid)))

        wall, code, cpu = watch(proc, sample, 1.0)
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{log.read_text(errors='replace')[-3000:]}")
    return {"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "peak_pss_gib": round(peak["pss"] / 1024**2, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--work", default="/tmp/e2e7b")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--tools", default="quantkit,gptqmodel")
    ap.add_argument("--verify", action="store_true", help="load both outputs in transformers + gptqmodel")
    args = ap.parse_args()
    calib_dir = shared_data("pg-english", "calib")
    if calib_dir is None:
        print("error: ../shared/data/pg-english/calib is absent", file=sys.stderr)
        return 2

    from quantkit.calib import load_calibration
    from quantkit.model.tokenizer import load_tokenizer

    work = Path(args.work)
    src = synthetic_checkpoint(work, args.layers)
    import torch

    calib = load_calibration(str(calib_dir), load_tokenizer(str(src / "tokenizer.model")), args.calib_samples,
                             args.calib_seqlen, 0)
    tokens_file = work / f"awq-calib-{args.calib_samples}x{args.calib_seqlen}.pt"
    torch.save(calib.tokens, tokens_file)
    print(f"calibration {calib.tokens.shape[0]} x {calib.tokens.shape[1]} tokens, sha256 {calib.sha256[:16]}",
          flush=True)

    results: dict = {"layers": args.layers, "calib_sha256": calib.sha256}
    tools = args.tools.split(",")
    outs = {t: work / f"awq-peer-{t}-{args.layers}L" for t in tools}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    if "quantkit" in tools:
        cmd = [sys.executable, "-m", "quantkit", "quantize", str(src), "--method", "awq", "--preset",
               "w4a16-g128-asym", "--format", "awq", "--calib", str(calib_dir), "--calib-samples",
               str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen), "--seed", "0", "-o",
               str(outs["quantkit"]), "--json"]
        log = work / f"awq-peer-quantkit-{args.layers}L.log"
        report_file = log.with_suffix(".json")
        r = run(cmd, log, report_file)
        report = json.loads(report_file.read_text())
        r["same_calibration"] = report["calibration"]["tokens_sha256"] == calib.sha256
        rows = [json.loads(ln) for ln in (outs["quantkit"] / "quant_log.jsonl").read_text().splitlines() if ln]
        r["awq_search_seconds"] = [row["seconds"] for row in rows if row.get("module") == "awq"]
        results["quantkit"] = r
        print(f"quantkit: {r}", flush=True)
    if "gptqmodel" in tools:
        log = work / f"awq-peer-gptqmodel-{args.layers}L.log"
        r = run([sys.executable, "-c", GPTQMODEL_AWQ, str(src), str(tokens_file), str(outs["gptqmodel"])], log)
        line = next((ln for ln in log.read_text(errors="replace").splitlines() if "GPTQMODEL_SECONDS" in ln), "")
        r.update({k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])})
        results["gptqmodel"] = r
        print(f"gptqmodel: {r}", flush=True)
    if len(tools) == 2:
        results["ratio_wall"] = round(results["quantkit"]["seconds"] / results["gptqmodel"]["seconds"], 3)
        print(f"quantkit / GPTQModel wall time: {results['ratio_wall']:.2f}x "
              f"({results['quantkit']['seconds']:.0f} s against {results['gptqmodel']['seconds']:.0f} s)")
    if args.verify:
        for tool, out in outs.items():
            results[tool]["verify"] = verify_hf(out, src)
            print(f"{tool} output in transformers + gptqmodel: {results[tool]['verify']}", flush=True)
    (work / f"result-awq-peer-{args.layers}L.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
