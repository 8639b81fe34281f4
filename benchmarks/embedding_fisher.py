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
import tempfile
import time
from pathlib import Path

import torch

from quantkit.calib import load_calibration
from quantkit.eval.sensitivity import _Reference
from quantkit.gguf.codec import encode
from quantkit.gguf.grids import gptq_round
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.reference import Transformer
from quantkit.model.tokenizer import load_tokenizer
from quantkit.quant.fisher import embedding_fisher
from quantkit.quant.gptq import GPTQ
from quantkit.testing import NANO_PATH, shared_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q3_K,Q4_K,Q5_K")
    ap.add_argument("--damp", type=float, default=0.1)
    args = ap.parse_args()
    pg = shared_data("pg-english", "calib")
    if pg is None:
        raise SystemExit("needs ../shared/data/pg-english/calib")
    ckpt = open_checkpoint(str(NANO_PATH))
    model = Transformer.from_checkpoint(ckpt, torch.float32)
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    with tempfile.TemporaryDirectory() as tmp:
        held_txt = Path(tmp) / "held.txt"
        held_txt.write_text((pg / "pride-and-prejudice.txt").read_text()[:200_000])
        calib = load_calibration(str(pg / "the-hound-of-the-baskervilles.txt"), tokenizer, 16, 256, 0).tokens
        held = load_calibration(str(held_txt), tokenizer, 16, 256, 0).tokens
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
        gptq = GPTQ(fisher.shape[0], name="embed_tokens")
        gptq.set_hessian(fisher)
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
