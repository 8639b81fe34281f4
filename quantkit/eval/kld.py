"""Streaming KL divergence / top-token / Δp statistics against full-precision logits (docs/algorithms.md §1).

Definitions follow llama-perplexity's `--kl-divergence`:
- KLD per token = Σ_i p_base_i · (log p_base_i − log q_i), summed over entries with log p_base_i > −16;
- same top = argmax(q) == argmax(p_base), reported as % ± the binomial normal-approximation error;
- Δp = q(correct token) − p_base(correct token), mean / RMS / percentiles;
- PPL statistics: both perplexities, Pearson correlation of per-token NLLs, ln(PPL(Q)/PPL(base)), ratio, difference.
Logits are never stored: each update reduces them to a few scalars per token.
"""

from __future__ import annotations

import math

import torch

LOG_P_FLOOR = -16.0
KLD_PERCENTILES = (99.9, 99.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


def bucketed_kld(kept: torch.Tensor, logp_rest: torch.Tensor, logq_rest: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) of two distributions coarsened to some kept tokens plus one bucket holding all others:
    `kept` = Σ_kept p_i (log p_i − log q_i) per position, `logp_rest` / `logq_rest` the log-probabilities of the
    bucket (−inf: empty). Never above the full-vocabulary KLD (coarsening cannot increase a divergence). float64."""
    logp_rest, logq_rest = logp_rest.double(), logq_rest.double()
    rest = torch.where(logp_rest > float("-inf"), logp_rest.exp() * (logp_rest - logq_rest.clamp_min(-690.0)),
                       torch.zeros_like(logp_rest))
    return (kept.double() + rest).clamp_min(0)


def _mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    mean = x.mean().item()
    if n < 2:
        return mean, float("nan")
    var = max((x * x).mean().item() - mean * mean, 0.0)
    return mean, math.sqrt(var / (n - 1))


def percentile(x: torch.Tensor, q: float) -> float:
    return (torch.quantile(x, q / 100.0).item() if x.numel() < 16_000_000
            else x.sort().values[int(q / 100 * (x.numel() - 1))].item())


class KLDAccumulator:
    """`update(ref_logits, test_logits, targets=None)` per batch of scored positions, then `result()`."""

    def __init__(self) -> None:
        self._kld: list[torch.Tensor] = []
        self._same: list[torch.Tensor] = []
        self._dp: list[torch.Tensor] = []
        self._nll_ref: list[torch.Tensor] = []
        self._nll_test: list[torch.Tensor] = []

    def update(self, ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """ref/test logits [..., V] at the same positions; targets [...] the correct next tokens (for Δp / PPL)."""
        vocab = ref_logits.shape[-1]
        if test_logits.shape != ref_logits.shape:
            raise ValueError(f"logit shapes differ: ref {tuple(ref_logits.shape)} vs test {tuple(test_logits.shape)}")
        logp = torch.log_softmax(ref_logits.reshape(-1, vocab).float(), dim=-1)
        logq = torch.log_softmax(test_logits.reshape(-1, vocab).float(), dim=-1)
        keep = logp > LOG_P_FLOOR
        terms = torch.where(keep, logp.exp() * (logp - logq), torch.zeros((), dtype=logp.dtype))
        self._kld.append(terms.double().sum(-1).cpu())
        self._same.append((logp.argmax(-1) == logq.argmax(-1)).cpu())
        if targets is not None:
            t = targets.reshape(-1, 1).to(logp.device)
            lp, lq = logp.gather(-1, t)[:, 0].double(), logq.gather(-1, t)[:, 0].double()
            self._dp.append((lq.exp() - lp.exp()).cpu())
            self._nll_ref.append(-lp.cpu())
            self._nll_test.append(-lq.cpu())

    @property
    def count(self) -> int:
        return sum(k.numel() for k in self._kld)

    def result(self) -> dict:
        if not self._kld:
            raise ValueError("no positions were added")
        kld = torch.cat(self._kld)
        same = torch.cat(self._same).double()
        n = kld.numel()
        mean, err = _mean_stderr(kld)
        out: dict = {
            "n_tokens": n,
            "kld": {
                "mean": mean, "mean_stderr": err, "max": kld.max().item(), "min": kld.min().item(),
                "median": percentile(kld, 50.0), "p99": percentile(kld, 99.0),
                "percentiles": {str(q): percentile(kld, q) for q in KLD_PERCENTILES},
            },
        }
        p_same = same.mean().item()
        out["same_top"] = {"fraction": p_same, "stderr": math.sqrt(p_same * (1 - p_same) / max(n - 1, 1))}
        if self._dp:
            dp = torch.cat(self._dp)
            dp_mean, dp_err = _mean_stderr(dp)
            rms2 = (dp * dp).mean().item()
            rms_err = (math.sqrt(max((dp**4).mean().item() - rms2**2, 0.0) / max(n - 1, 1)) / (2 * math.sqrt(rms2))
                       if rms2 > 0 else 0.0)
            out["delta_p"] = {
                "mean": dp_mean, "mean_stderr": dp_err, "rms": math.sqrt(rms2), "rms_stderr": rms_err,
                "max": dp.max().item(), "min": dp.min().item(), "median": percentile(dp, 50.0),
                "percentiles": {str(q): percentile(dp, q) for q in DP_PERCENTILES},
            }
            out["ppl"] = ppl_statistics(torch.cat(self._nll_test), torch.cat(self._nll_ref))
        return out


def ppl_statistics(nll_q: torch.Tensor, nll_base: torch.Tensor) -> dict:
    """PPL(Q), PPL(base), their correlation and ratio, with standard errors (delta method, as llama.cpp)."""
    n = nll_q.numel()
    mq, eq = _mean_stderr(nll_q)
    mb, eb = _mean_stderr(nll_base)
    diff = nll_q - nll_base
    md, ed = _mean_stderr(diff)
    cq, cb = nll_q - mq, nll_base - mb
    cov = (cq * cb).mean().item()
    denom = math.sqrt((cq * cq).mean().item() * (cb * cb).mean().item())
    cor = cov / denom if denom > 0 else 1.0
    ppl_q, ppl_b = math.exp(mq), math.exp(mb)
    # Var(ppl_q - ppl_b) by the delta method with the covariance of the two means
    cov_means = cov / max(n - 1, 1)
    var_diff = ppl_q**2 * eq**2 + ppl_b**2 * eb**2 - 2 * ppl_q * ppl_b * cov_means
    return {
        "ppl_q": ppl_q, "ppl_q_stderr": ppl_q * eq,
        "ppl_base": ppl_b, "ppl_base_stderr": ppl_b * eb,
        "cor_ln_ppl": cor,
        "ln_ratio": md, "ln_ratio_stderr": ed,
        "ratio": math.exp(md), "ratio_stderr": math.exp(md) * ed,
        "diff": ppl_q - ppl_b, "diff_stderr": math.sqrt(max(var_diff, 0.0)),
    }


def format_report(result: dict) -> str:
    """The statistics in llama-perplexity's text layout (its KL divergence summary)."""
    lines = []
    if "ppl" in result:
        p = result["ppl"]
        lines += [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {p['ppl_q']:10.6f} ± {p['ppl_q_stderr']:10.6f}",
            f"Mean PPL(base)                : {p['ppl_base']:10.6f} ± {p['ppl_base_stderr']:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * p['cor_ln_ppl']:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {p['ln_ratio']:10.6f} ± {p['ln_ratio_stderr']:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {p['ratio']:10.6f} ± {p['ratio_stderr']:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {p['diff']:10.6f} ± {p['diff_stderr']:10.6f}",
            "",
        ]
    k = result["kld"]
    lines += [
        "====== KL divergence statistics ======",
        f"Mean    KLD: {k['mean']:10.6f} ± {k['mean_stderr']:10.6f}",
        f"Maximum KLD: {k['max']:10.6f}",
    ]
    for q in KLD_PERCENTILES:
        label = "Median " if q == 50.0 else f"{q:4.1f}%  "
        lines.append(f"{label} KLD: {k['percentiles'][str(q)]:10.6f}")
    lines += [f"Minimum KLD: {k['min']:10.6f}", ""]
    s = result["same_top"]
    if "delta_p" in result:
        d = result["delta_p"]
        lines += [
            "====== Token probability statistics ======",
            f"Mean    Δp: {100 * d['mean']:6.3f} ± {100 * d['mean_stderr']:5.3f} %",
            f"Maximum Δp: {100 * d['max']:6.3f}%",
        ]
        for q in DP_PERCENTILES:
            label = "Median " if q == 50.0 else f"{q:4.1f}%  "
            lines.append(f"{label} Δp: {100 * d['percentiles'][str(q)]:6.3f}%")
        lines += [
            f"Minimum Δp: {100 * d['min']:6.3f}%",
            f"RMS Δp    : {100 * d['rms']:6.3f} ± {100 * d['rms_stderr']:5.3f} %",
        ]
    lines.append(f"Same top p: {100 * s['fraction']:6.3f} ± {100 * s['stderr']:5.3f} %")
    return "\n".join(lines)
