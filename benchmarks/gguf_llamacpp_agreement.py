"""How often llama.cpp's top token equals quantkit's on mistral-nano GGUFs, with enough positions to tell rates apart.

The test (`tests/test_gguf_llamacpp.py`) compares 252 positions per type; at that size 98.8% and 99.2% are one
position apart. This script runs the same comparison on `--chunks` chunks of 128 tokens (default 32: 4,032
positions) for a few types and prints each rate with its 95% Wilson interval, beside the two references for how far
the arithmetic alone moves the top token:
  - quantkit vs itself: the ggml-numerics model with float32 vs float64 matmul sums;
  - llama.cpp vs itself: the same file run with and without weight repacking (other GEMM kernels), for the types
    llama.cpp repacks on x86.

Usage: python benchmarks/gguf_llamacpp_agreement.py [--types Q8_0,Q4_0,Q4_K_M,Q2_K] [--chunks 32] [--out JSON]
Needs llama.cpp's tools (scripts/build_llamacpp.sh) and the pg-english text of ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantkit.gguf.convert import write_gguf  # noqa: E402
from quantkit.model.checkpoint import open_checkpoint  # noqa: E402
from quantkit.testing import NANO_PATH, shared_data  # noqa: E402
from tests.test_gguf_llamacpp import REPACKED_TYPES, compare_with_llamacpp  # noqa: E402


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def fmt(p: float | None, n: int) -> str:
    if p is None:
        return "–"
    lo, hi = wilson(p, n)
    return f"{100 * p:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M,Q2_K")
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the raw figures as JSON here")
    args = ap.parse_args()
    src = shared_data("pg-english", "calib", "alice-s-adventures-in-wonderland.txt")
    if src is None:
        raise SystemExit("needs ../shared/data/pg-english (the evaluation text)")
    nano = open_checkpoint(NANO_PATH)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "eval.txt"
        text.write_text(src.read_text()[10000:])
        for ftype in args.types.split(","):
            gguf = write_gguf(nano, tmp / f"nano-{ftype}.gguf", ftype, progress=False)
            r = compare_with_llamacpp(gguf, text, tmp, f32_cache=True, no_repack_run=ftype in REPACKED_TYPES,
                                      chunks=args.chunks)
            results[ftype] = r
            print(ftype, {k: r[k] for k in ("ppl_llamacpp", "plain", "ggml", "noise", "llamacpp_no_repack")},
                  flush=True)
    n = next(iter(results.values()))["plain"]["positions"]
    print(f"\nmistral-nano, Alice text, {n} positions (ctx 128, {args.chunks} chunks); same top token, 95% interval\n")
    print("| type | quantkit plain vs llama.cpp | quantkit ggml-numerics vs llama.cpp "
          "| quantkit vs itself (f32/f64 sums) "
          "| llama.cpp vs itself (repack on/off) | max \\|Δ log p\\| ggml-numerics vs llama.cpp | quantkit vs itself |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for ftype, r in results.items():
        k = r["llamacpp_no_repack"]
        print(f"| {ftype} | {fmt(r['plain']['same_top'], n)} | {fmt(r['ggml']['same_top'], n)} | "
              f"{fmt(r['noise']['same_top'], n)} | {fmt(k['same_top'] if k else None, n)} | "
              f"{r['ggml']['max_logprob_diff']:.3f} | {r['noise']['max_logprob_diff']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"chunks": args.chunks, "positions": n, "results": results}, indent=1,
                                             default=float))


if __name__ == "__main__":
    main()
