"""How far the report card's compact KLD is below the full-vocabulary KLD, for kept-mass and fixed top-k references.

Usage: python benchmarks/coarse_kld_gap.py QUANTIZED [--text evaltext/prose.txt] [--windows 4]
Runs mistral-nano (the reference) and QUANTIZED (e.g. a Q4_0 GGUF of nano) over the same llamacpp-convention
windows (ctx 512) and prints, for references that keep the tokens holding 99% / 99.9% of the probability and for a
fixed top-64 / top-256, the mean coarse KLD (`quantkit.eval.reference_logits.coarse_kld`), the full KLD and the gap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from quantkit.eval.loading import load_eval_model, pick_tokenizer
from quantkit.eval.perplexity import plan_windows, read_texts, tokenize_for_convention
from quantkit.eval.reference_logits import ReferenceLogits, coarse_kld, head_of

REPO = Path(__file__).resolve().parents[1]


def top_k_reference(logits: torch.Tensor, targets: torch.Tensor, k: int) -> ReferenceLogits:
    """A reference that keeps a fixed k tokens per position (the alternative the mass rule replaced)."""
    logp = torch.log_softmax(logits.double(), -1)
    values, ids = logp.topk(k, -1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    counts = torch.full((logits.shape[0],), k)
    target = logp.gather(-1, targets[:, None])[:, 0]
    return ReferenceLogits(ids.flatten(), values.flatten().float(), counts, target.float(), rest, torch.zeros(1, 1, 1),
                           {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quantized")
    parser.add_argument("--text", default=str(REPO / "evaltext" / "prose.txt"))
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()
    ref, test = load_eval_model(str(REPO / "models" / "mistral-nano")), load_eval_model(args.quantized)
    tok = pick_tokenizer(None, ref)
    ids = tokenize_for_convention(tok, read_texts(args.text), "llamacpp")
    _, windows, _ = plan_windows(ids, "llamacpp", 512, tok.bos_id, args.windows, False)
    variants = {"mass 0.99": 0.99, "mass 0.999": 0.999, "top-64": 64, "top-256": 256}
    coarse, full, kept = {v: [] for v in variants}, [], {v: [] for v in variants}
    with torch.no_grad():
        for w in windows:
            r = ref.logits_fn()(w.tokens)[0, w.first:-1]
            t = test.logits_fn()(w.tokens)[0, w.first:-1]
            lp, lq = torch.log_softmax(r.double(), -1), torch.log_softmax(t.double(), -1)
            full.append((lp.exp() * (lp - lq)).sum(-1))
            for name, value in variants.items():
                reference = (ReferenceLogits(*head_of(r, w.targets, value), torch.zeros(1, 1, 1), {})
                             if isinstance(value, float) else top_k_reference(r, w.targets, value))
                coarse[name].append(coarse_kld(reference, 0, t))
                kept[name].append(reference.counts.double())
    f = torch.cat(full).mean().item()
    print(f"full-vocabulary KLD {f:.5f} ({args.quantized}, {args.windows} windows of {args.text})")
    for name in variants:
        c = torch.cat(coarse[name]).mean().item()
        print(f"{name:>10}: coarse KLD {c:.5f}, {100 * (1 - c / f):5.1f}% below; tokens kept per position "
              f"{torch.cat(kept[name]).mean().item():.0f}")


if __name__ == "__main__":
    main()
