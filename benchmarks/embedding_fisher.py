"""The embedding of mistral-nano rounded three ways, by the KL divergence of the model with only the embedding
quantized: data-free (llama.cpp's encoding, the baseline), with the diagonal of the output's Fisher matrix as an
importance vector, and GPTQ against the whole Fisher matrix (`quant/fisher.py`, what `--target-bpw --method gptq`
writes). The Fisher matrix comes from calibration text (*The Hound of the Baskervilles*, 16 x 256 tokens, as the
allocation's default); the divergence is measured on those tokens and on held-out text (*Pride and Prejudice*).

Usage: python benchmarks/embedding_fisher.py [--types Q3_K,Q4_K,Q5_K] [--damp 0.1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nano_gguf_setup import nano_windows  # noqa: E402

from quantkit.eval.sensitivity import _Reference  # noqa: E402
from quantkit.gguf.codec import encode  # noqa: E402
from quantkit.gguf.grids import gptq_round  # noqa: E402
from quantkit.quant.fisher import embedding_fisher, embedding_gptq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q3_K,Q4_K,Q5_K")
    ap.add_argument("--damp", type=float, default=0.1)
    args = ap.parse_args()
    _, model, windows = nano_windows()
    calib, held = windows["calib"], windows["held-out"]
    t0 = time.perf_counter()
    fisher = embedding_fisher(model, calib)
    seconds = time.perf_counter() - t0
    off = float((fisher - torch.diag(fisher.diagonal())).norm() / fisher.norm())
    print(f"Fisher matrix {list(fisher.shape)} from {calib.numel()} tokens x 4 draws in {seconds:.1f} s; "
          f"off-diagonal part {100 * off:.0f}% of its norm", file=sys.stderr)
    refs = {"calib": _Reference(model, calib), "held-out": _Reference(model, held)}
    weight = model.model.embed_tokens.weight.data

    def kld(stored: torch.Tensor) -> dict[str, float]:
        model.model.embed_tokens.weight.data = stored
        try:
            return {k: ref.kld_from_layer(-1) for k, ref in refs.items()}
        finally:
            model.model.embed_tokens.weight.data = weight

    print("| type | rounding | KLD calib | KLD held-out | held-out / data-free |")
    print("|---|---|---:|---:|---:|")
    for type_name in args.types.split(","):
        gptq = embedding_gptq(fisher)
        rows = {
            "data-free (baseline)": encode(weight, type_name).dequantize(torch.float32),
            "Fisher diagonal as importance": encode(weight, type_name, fisher.diagonal()).dequantize(torch.float32),
            "GPTQ on the Fisher matrix": gptq_round(gptq, weight, type_name, "embed_tokens", damp=args.damp,
                                                    block_size=128, group_aware=True)[0].dequantize(torch.float32),
        }
        base = None
        for label, stored in rows.items():
            k = kld(stored)
            base = base or k["held-out"]
            print(f"| {type_name} | {label} | {k['calib']:.6f} | {k['held-out']:.6f} | {k['held-out'] / base:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
