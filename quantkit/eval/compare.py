"""Run a reference and a test model over the same windows: both perplexities plus KLD statistics (kld.py)."""

from __future__ import annotations

from typing import Sequence

import torch

from quantkit.eval.kld import KLDAccumulator
from quantkit.eval.perplexity import (
    DEFAULT_CONVENTION,
    LogitsFn,
    NLLStats,
    PerplexityResult,
    plan_windows,
    progress_bar,
    window_nll,
)


def compare_models(ref_logits_fn: LogitsFn, test_logits_fn: LogitsFn, token_ids: Sequence[int] | torch.Tensor,
                   convention: str = DEFAULT_CONVENTION, ctx: int | None = None, progress: bool = True, bos_id: int = 1,
                   max_windows: int | None = None, spread: bool = False) -> dict:
    """{"convention", "ctx", "n_windows", "n_tokens", "ppl_ref", "ppl_test" (PerplexityResult dicts), "kld",
    "same_top", "delta_p", "ppl" (llama.cpp's PPL statistics)} on the positions the convention scores."""
    ctx, windows, total = plan_windows(token_ids, convention, ctx, bos_id, max_windows, spread)
    acc = KLDAccumulator()
    ref_stats, test_stats = NLLStats(), NLLStats()
    with torch.no_grad():
        for window in progress_bar(windows, total, f"compare ({convention}, ctx {ctx})", progress):
            ref = ref_logits_fn(window.tokens)
            test = test_logits_fn(window.tokens)
            ref_stats.add(window_nll(ref, window, "the reference"))
            test_stats.add(window_nll(test, window, "the test model"))
            acc.update(ref[0, window.first:-1], test[0, window.first:-1].to(ref.device), window.targets)
    result = acc.result()
    result.update({
        "convention": convention, "ctx": ctx, "n_windows": len(ref_stats.window_means),
        "ppl_ref": PerplexityResult.from_stats(ref_stats, convention, ctx).to_dict(),
        "ppl_test": PerplexityResult.from_stats(test_stats, convention, ctx).to_dict(),
    })
    return result
