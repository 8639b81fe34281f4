"""How much of a GGUF's divergence in `llama-perplexity` is llama.cpp's activation rounding, on mistral-nano.

llama.cpp's CPU backend rounds the input of every matrix product to the weight type's vec_dot_type (8-bit blocks of
256 for the k- and i-quants, of 32 for Q4_0..Q8_0 and IQ4_NL) before its integer dot products. For each GGUF given,
on the same windows of held-out text (llama-perplexity's convention, ctx 512):

  exact      quantkit's dequantized model with float32 products (what `quantkit eval --ref` reports)
  rounded    the same with every product's input rounded as llama.cpp's CPU backend rounds it
             (`quantkit.gguf.activations.apply_ggml_numerics`)
  llama.cpp  `llama-perplexity --kl-divergence` against the F32 GGUF's logits

all as mean KL divergence from the full-precision model. "rounded" reproducing "llama.cpp" says the rounding is the
difference; (rounded - exact) / llama.cpp is its share.

Usage: python benchmarks/activation_rounding.py FILE.gguf [FILE.gguf ...] [--work /tmp/gguf_alloc-mix] [--chunks 40]
(the work directory of benchmarks/gguf_allocation.py: its eval.txt and the F32 model's saved logits base.kld)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nano_gguf_setup import CTX  # noqa: E402

from quantkit.eval.compare import compare_models  # noqa: E402
from quantkit.eval.perplexity import tokenize_for_convention  # noqa: E402
from quantkit.formats.base import read_checkpoint  # noqa: E402
from quantkit.formats.dequantized import dequantized_model  # noqa: E402
from quantkit.gguf.activations import apply_ggml_numerics  # noqa: E402
from quantkit.gguf.llamacpp import parse_kld_summary, run_perplexity  # noqa: E402
from quantkit.model.checkpoint import open_checkpoint  # noqa: E402
from quantkit.model.reference import Transformer  # noqa: E402
from quantkit.model.tokenizer import load_tokenizer  # noqa: E402
from quantkit.testing import NANO_PATH, llamacpp_bin  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_alloc-mix"))
    ap.add_argument("--chunks", type=int, default=40)
    args = ap.parse_args()
    eval_txt, base = args.work / "eval.txt", args.work / "base.kld"
    if not (eval_txt.exists() and base.exists()):
        raise SystemExit(f"error: {args.work} lacks eval.txt and base.kld: run benchmarks/gguf_allocation.py first")
    perplexity = llamacpp_bin("llama-perplexity")
    if perplexity is None:
        raise SystemExit("needs llama.cpp's tools (bash scripts/build_llamacpp.sh)")
    ckpt = open_checkpoint(str(NANO_PATH))
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    ids = tokenize_for_convention(tokenizer, eval_txt.read_text(), "llamacpp")
    full = Transformer.from_checkpoint(ckpt, torch.float32)

    def mean_kld(model) -> float:  # as `quantkit eval --ref`, on llama-perplexity's first `chunks` windows
        return compare_models(full, model, ids, "llamacpp", CTX, progress=False, bos_id=tokenizer.bos_id,
                              max_windows=args.chunks)["kld"]["mean"]

    print(f"mistral-nano, {args.chunks} x {CTX} tokens of {eval_txt} (llama-perplexity's convention); mean KLD\n")
    print("| file | exact | rounded as llama.cpp's CPU | llama.cpp | rounding's share |")
    print("|---|---:|---:|---:|---:|")
    for path in args.files:
        written = read_checkpoint(path)
        model = dequantized_model(written)
        exact = mean_kld(model)
        apply_ggml_numerics(model, written.metadata["tensor_types"], written.get)
        rounded = mean_kld(model)
        out = run_perplexity(perplexity, path, eval_txt, ctx=CTX, chunks=args.chunks, kld_base_in=base)
        llamacpp = parse_kld_summary(out)["kld_mean"]
        print(f"| {path.name} | {exact:.6f} | {rounded:.6f} | {llamacpp:.6f} | {(rounded - exact) / llamacpp:.0%} |",
              flush=True)


if __name__ == "__main__":
    main()
