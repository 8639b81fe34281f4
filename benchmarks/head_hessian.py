"""mistral-nano's lm_head rounded by GPTQ against the KL divergence's Hessians of row clusters
(`quant/head_hessian.py`, what `--method gptq` writes) and against the one shared input Hessian (the baseline,
`--head-clusters 1`), by the KL divergence of the model with only lm_head quantized.

The Hessians come from the run's calibration: 64 x 512 tokens (seed 0) of *The Hound of the Baskervilles*
(--calib-text hound) or of the five-book mix of `gguf_allocation.py --calib-text mix`; the divergence is measured on
16 x 256 windows of it (the allocation's default, seed 0: inside the calibration), on 16 x 256 other windows
(seed 1) and on held-out text (*Pride and Prejudice*). Only lm_head changes, so the final
hidden states are computed once and each variant costs one GPTQ and three head products.

With --refine-sweeps N, each rounding is also followed by N sweeps of coordinate descent on its codes
(`--refine-sweeps`, `quant/gptq.refine_codes`), one more row each.

Usage: python benchmarks/head_hessian.py [--types Q4_K,Q5_K,Q6_K] [--clusters 1,16,64,256] [--refine-sweeps N]
       [--calib-text hound|mix]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nano_gguf_setup import CALIB_TEXTS, nano_windows  # noqa: E402

from quantkit.gguf.grids import gptq_round  # noqa: E402
from quantkit.quant.head_hessian import HeadHessians  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K,Q5_K,Q6_K")
    ap.add_argument("--clusters", default="1,16,64,256", help="the first is the baseline")
    ap.add_argument("--calib-chunks", type=int, default=64)
    ap.add_argument("--refine-sweeps", type=int, default=0, help="also each rounding refined with N sweeps")
    ap.add_argument("--calib-text", default="hound", choices=CALIB_TEXTS)
    args = ap.parse_args()
    _, model, windows = nano_windows(calib_text=args.calib_text, calib_chunks=args.calib_chunks)
    weight = model.lm_head.weight.data

    def contexts(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.hidden_states(tokens, torch.arange(tokens.shape[1]), tokens.shape[1]).reshape(
                -1, weight.shape[1])

    h = {k: contexts(v) for k, v in windows.items()}
    calib = h.pop("GPTQ calibration")

    def kld(stored: torch.Tensor, x: torch.Tensor) -> float:
        total = 0.0
        for part in x.split(2048):
            logp, logq = torch.log_softmax(part @ weight.T, -1), torch.log_softmax(part @ stored.T, -1)
            total += float((logp.exp() * (logp - logq)).sum(dtype=torch.float64))
        return total / x.shape[0]

    print(f"mistral-nano lm_head {list(weight.shape)}; Hessians from {calib.shape[0]} calibration tokens "
          f"({args.calib_text}); mean KLD "
          "with only lm_head quantized\n")
    print("| type | clusters | refine sweeps | collect (s) | round (s) | calib windows | other windows | held-out | "
          "held-out / baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for type_name in args.types.split(","):
        base = None
        for clusters in (int(c) for c in args.clusters.split(",")):
            t0 = time.perf_counter()
            hessians = HeadHessians(weight, clusters)
            hessians.add_batch(calib)
            t1 = time.perf_counter()
            for sweeps in sorted({0, args.refine_sweeps}):
                t2 = time.perf_counter()
                stored = gptq_round(hessians, weight, type_name, "lm_head", damp=0.1, block_size=128,
                                    group_aware=True, refine_sweeps=sweeps)[0].dequantize(torch.float32)
                t3 = time.perf_counter()
                k = {name: kld(stored, x) for name, x in h.items()}
                base = base or k["held-out"]
                print(f"| {type_name} | {clusters} | {sweeps} | {t1 - t0:.1f} | {t3 - t2:.1f} | {k['calib']:.6f} | "
                      f"{k['calib-other']:.6f} | {k['held-out']:.6f} | {k['held-out'] / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
