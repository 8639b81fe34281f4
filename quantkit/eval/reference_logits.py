"""A reference model's predictions kept compactly, so outputs can be compared with it without running it again.

Per scored position the reference keeps its most likely tokens — the fewest that hold `mass` (default 99%) of its
probability — with their log-probabilities, and the log-probability of the actual next token; per layer, its
residual stream on a few probe positions. From that:

- KLD(ref || test) per position = Σ_{i kept} p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest), where
  "rest" is every other token taken as one outcome: the exact KL divergence of the two distributions coarsened to
  the kept tokens plus one bucket, so never above the full-vocabulary KLD (llama-perplexity's
  `--kl-divergence-base` keeps the whole vocabulary instead). On mistral-nano, whose distributions are flat
  (about 2,500 tokens hold 99%), it is 1.2% below the full KLD, where a fixed top-64 is 25% below
  (`benchmarks/coarse_kld_gap.py`); peaked distributions keep fewer tokens and lose less;
- same top = argmax(test) equals the reference's most likely token;
- the reference perplexity, from the actual tokens' log-probabilities.

The file is a safetensors file (no pickles) whose metadata says which tokens, convention and context it covers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import EvalError
from quantkit.eval.kld import bucketed_kld

FORMAT_TAG = "quantkit-reference-logits/1"


@dataclass
class ReferenceLogits:
    """What a reference predicted on every scored position of a text (see the module docstring). The kept tokens
    of all positions are flat arrays; `counts[n]` of them belong to position n, most likely first."""

    ids: torch.Tensor  # int64 [E]
    logp: torch.Tensor  # float32 [E]
    counts: torch.Tensor  # int64 [N]
    target_logp: torch.Tensor  # float32 [N]
    rest_logp: torch.Tensor  # float64 [N]: log of the probability of the tokens not kept (-inf: none)
    probe_states: torch.Tensor  # float32 [layers, P, hidden]: the residual stream after each layer on the probe
    meta: dict[str, str]  # source, tokens_sha256, convention, ctx, n_windows, probe_tokens, mass

    TENSORS = ("ids", "logp", "counts", "target_logp", "rest_logp", "probe_states")

    @property
    def starts(self) -> torch.Tensor:
        return torch.cumsum(self.counts, 0) - self.counts

    def positions(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position index 0.. within the slice, id, log-prob) of the kept tokens of positions start..stop-1."""
        first = int(self.counts[:start].sum())
        counts = self.counts[start:stop]
        last = first + int(counts.sum())
        return (torch.repeat_interleave(torch.arange(stop - start), counts), self.ids[first:last],
                self.logp[first:last])

    def top1(self) -> torch.Tensor:
        return self.ids[self.starts]

    def matches(self, meta: dict[str, str]) -> str | None:
        """None when this reference covers the same tokens, convention, context and windows; else what differs."""
        for key in ("tokens_sha256", "convention", "ctx", "n_windows", "probe_tokens"):
            if self.meta.get(key) != meta.get(key):
                return f"{key} is {self.meta.get(key)!r} here but {meta.get(key)!r} for this run"
        return None

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"ids": self.ids.to(torch.int32), "logp": self.logp, "counts": self.counts.to(torch.int32),
                   "target_logp": self.target_logp, "rest_logp": self.rest_logp.double(),
                   "probe_states": self.probe_states.to(torch.float16)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": FORMAT_TAG, **self.meta})

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceLogits":
        from safetensors import safe_open

        from quantkit.errors import QuantkitError
        from quantkit.model.checkpoint import read_safetensors_header

        path = Path(path)
        try:
            header = read_safetensors_header(path)
        except QuantkitError as e:
            raise EvalError(f"not a reference-logits file: {e}") from None
        meta = header.get("__metadata__", {})
        if meta.get("format") != FORMAT_TAG or set(header) - {"__metadata__"} != set(cls.TENSORS):
            raise EvalError(f"{path}: not a quantkit reference-logits file (expected format {FORMAT_TAG!r} and "
                            f"tensors {', '.join(cls.TENSORS)})")
        with safe_open(str(path), framework="pt") as f:
            t = {name: f.get_tensor(name) for name in cls.TENSORS}
        ids, logp, counts = t["ids"].long(), t["logp"].float(), t["counts"].long()
        consistent = (ids.dim() == logp.dim() == counts.dim() == 1 and ids.shape == logp.shape
                      and t["target_logp"].shape == counts.shape == t["rest_logp"].shape
                      and bool((counts >= 1).all()) and not bool(t["rest_logp"].isnan().any())
                      and int(counts.sum()) == ids.numel() and t["probe_states"].dim() == 3
                      and all(bool(torch.isfinite(t[n]).all()) for n in ("logp", "target_logp", "probe_states")))
        if not consistent:
            raise EvalError(f"{path}: reference-logits tensors have inconsistent shapes or non-finite values")
        return cls(ids, logp, counts, t["target_logp"].float(), t["rest_logp"].double(), t["probe_states"].float(),
                   {k: v for k, v in meta.items() if k != "format"})


def tokens_digest(token_ids: torch.Tensor) -> str:
    return hashlib.sha256(torch.as_tensor(token_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


def head_of(logits: torch.Tensor, targets: torch.Tensor, mass: float) -> tuple[torch.Tensor, ...]:
    """logits [N, V], actual next tokens [N] -> (ids [E], log-probs [E], counts [N], target log-probs [N], log of
    the mass not kept [N]): per position the fewest most-likely tokens whose probabilities sum to at least `mass`,
    most likely first."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    counts = ((sorted_logp.exp().cumsum(-1) < mass).sum(-1) + 1).clamp_max(logp.shape[-1])
    keep = torch.arange(logp.shape[-1], device=logp.device)[None, :] < counts[:, None]
    rest = sorted_logp.masked_fill(keep, float("-inf")).logsumexp(-1)
    target = logp.gather(-1, targets.reshape(-1, 1).to(logp.device))[:, 0]
    return (order[keep].cpu(), sorted_logp[keep].float().cpu(), counts.cpu(), target.float().cpu(), rest.cpu())


def coarse_kld(ref: ReferenceLogits, start: int, test_logits: torch.Tensor) -> torch.Tensor:
    """KLD(ref || test) of positions start.. (as many as test_logits [n, V] has) over the reference's kept tokens
    plus one bucket for the rest (float64 [n]). The rest's log-probabilities are log-sum-exps, never 1 - sum, so a
    tiny rest is exact."""
    n = test_logits.shape[0]
    pos, ids, logp = ref.positions(start, start + n)
    logq = torch.log_softmax(test_logits.double(), dim=-1).cpu()
    logq_kept = logq[pos, ids]
    kept = torch.zeros(n, dtype=torch.float64).index_add_(0, pos, logp.double().exp() * (logp.double() - logq_kept))
    kept_mask = torch.zeros_like(logq, dtype=torch.bool)
    kept_mask[pos, ids] = True
    logq_rest = logq.masked_fill(kept_mask, float("-inf")).logsumexp(-1)
    return bucketed_kld(kept, ref.rest_logp[start:start + n], logq_rest)


def relative_error(test: torch.Tensor, ref: torch.Tensor) -> float:
    """||test − ref|| / ||ref|| (Frobenius), in float64."""
    ref = ref.double()
    return float((test.double().to(ref.device) - ref).norm() / ref.norm().clamp_min(1e-300))
