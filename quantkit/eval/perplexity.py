"""Perplexity in two named conventions (docs/algorithms.md §3).

- `gptq` [GPTQ-ctxN]: the caller's token stream (documents joined with "\\n\\n", one BOS at the very start) is cut
  into non-overlapping windows of `ctx` (default 2048), the tail is dropped, every window is a fresh context and
  all ctx-1 targets of each window are scored.
- `llamacpp` [LCPP-ctxN] (llama-perplexity): chunks of `ctx` (default 512), the first token of each chunk is
  replaced by BOS, only the second half is scored (positions ctx/2 .. ctx-2 predicting the next token);
  at least 2*ctx tokens are needed, as llama-perplexity requires.

`logits_fn(tokens [1, T] int64) -> logits [1, T, V]`. PPL = exp(mean NLL); the ± is llama.cpp's
PPL * stddev(NLL) / sqrt(count - 1).

The default convention everywhere (`quantkit eval`, `quantkit compare`, `quantkit.evaluate`) is `llamacpp` at
ctx 512 (`DEFAULT_CONVENTION`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from quantkit.errors import EvalError
from quantkit.errors import NonFiniteError

CONVENTIONS = ("gptq", "llamacpp")
DEFAULT_CTX = {"gptq": 2048, "llamacpp": 512}
# The one default of `quantkit eval`, `quantkit compare` and `quantkit.evaluate`: llama-perplexity's layout at ctx
# 512, so the same pair of models gives the same KLD from every entry point, numbers line up with llama.cpp's
# tools, and the built-in model (trained at context 512) is scored within its trained context.
DEFAULT_CONVENTION = "llamacpp"

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Window:
    index: int
    tokens: torch.Tensor  # [1, T] int64, what the model sees
    first: int  # logits at positions first .. T-2 are scored
    targets: torch.Tensor  # [T-1-first] int64: the tokens those positions predict


def check_convention(convention: str, ctx: int | None) -> int:
    if convention not in CONVENTIONS:
        raise EvalError(f"unknown perplexity convention {convention!r}; choose one of: {', '.join(CONVENTIONS)}")
    ctx = DEFAULT_CTX[convention] if ctx is None else int(ctx)
    if ctx < 4:
        raise EvalError(f"ctx must be at least 4 tokens, got {ctx}")
    return ctx


def check_max_windows(max_windows: int | None) -> int | None:
    """None (every window) or a count >= 1; a zero or negative count is an error, never silently one window."""
    if max_windows is None:
        return None
    try:
        count = operator.index(max_windows)
    except TypeError:
        count = 0
    if count < 1:
        raise EvalError(f"max_windows must be a whole number >= 1 (or None for every window), got {max_windows!r}")
    return count


def count_windows(n_tokens: int, convention: str, ctx: int | None = None) -> int:
    ctx = check_convention(convention, ctx)
    return n_tokens // ctx


def iter_windows(token_ids: Sequence[int] | torch.Tensor, convention: str = DEFAULT_CONVENTION,
                 ctx: int | None = None, bos_id: int = 1, max_windows: int | None = None,
                 spread: bool = False) -> Iterator[Window]:
    """The windows a convention evaluates, in order (see the module docstring).

    max_windows limits the count: the first N windows, or with `spread` N windows evenly spaced over the whole
    stream (window k of N is window floor(k * total / N)), a deterministic sample of a long text.
    """
    ctx = check_convention(convention, ctx)
    max_windows = check_max_windows(max_windows)
    ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
    n = ids.numel()
    need = 2 * ctx if convention == "llamacpp" else ctx
    if n < need:
        raise EvalError(
            f"text is too short: {n} tokens, convention {convention} with ctx {ctx} needs at least {need}"
        )
    total = n // ctx
    count = total if max_windows is None else min(total, max_windows)
    indices = [k * total // count for k in range(count)] if spread else range(count)
    first = 0 if convention == "gptq" else ctx // 2
    for i in indices:
        window = ids[i * ctx:(i + 1) * ctx].clone()
        if convention == "llamacpp":
            window[0] = bos_id
        yield Window(i, window.unsqueeze(0), first, window[first + 1:])


def window_nll(logits: torch.Tensor, window: Window, who: str = "the model") -> torch.Tensor:
    """Per-token NLL (float64) of the scored positions of one window, from logits [1, T, V]. Raises NonFiniteError
    when an NLL is NaN or Inf (a perplexity of nan is never a result); `who` names the model in that message."""
    scored = logits[0, window.first:-1].float()
    logp = torch.log_softmax(scored, dim=-1)
    nll = -logp.gather(-1, window.targets.to(logp.device)[:, None])[:, 0].double().cpu()
    finite = torch.isfinite(nll)
    if not bool(finite.all()):
        pos = window.first + int((~finite).nonzero()[0])
        raise NonFiniteError(f"{who}: the negative log-likelihood is NaN or Inf in window {window.index} (position "
                             f"{pos}): its logits are not finite")
    return nll


@dataclass
class NLLStats:
    """Running sums over scored tokens (and per-window means, for reporting)."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    window_means: list[float] = field(default_factory=list)

    def add(self, nll: torch.Tensor) -> None:
        nll = nll.double()
        self.count += nll.numel()
        self.total += nll.sum().item()
        self.total_sq += (nll * nll).sum().item()
        self.window_means.append(nll.mean().item())

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def std(self) -> float:
        return math.sqrt(max(self.total_sq / self.count - self.mean**2, 0.0))

    @property
    def mean_stderr(self) -> float:
        return self.std / math.sqrt(self.count - 1) if self.count > 1 else float("nan")


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    nll_mean: float
    n_tokens: int  # scored tokens
    n_windows: int
    convention: str
    ctx: int
    window_nll: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_stats(cls, stats: NLLStats, convention: str, ctx: int) -> "PerplexityResult":
        ppl = math.exp(stats.mean)
        return cls(ppl, ppl * stats.mean_stderr, stats.mean, stats.count, len(stats.window_means), convention, ctx,
                   list(stats.window_means))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("window_nll")
        return d

    def describe(self) -> str:
        return (f"PPL = {self.ppl:.4f} +/- {self.ppl_stderr:.4f}  "
                f"[{self.convention}, ctx {self.ctx}, {self.n_windows} windows, {self.n_tokens} scored tokens]")


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from quantkit.progress import progress

    return progress(iterable, total=total, desc=desc, unit="window", leave=False, dynamic_ncols=True)


def plan_windows(token_ids: Sequence[int] | torch.Tensor, convention: str, ctx: int | None, bos_id: int,
                 max_windows: int | None, spread: bool) -> tuple[int, Iterator, int]:
    """(ctx, windows, how many) for scoring `token_ids` under a convention, at most `max_windows` of them."""
    ctx = check_convention(convention, ctx)
    ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
    total = count_windows(ids.numel(), convention, ctx)
    max_windows = check_max_windows(max_windows)
    if max_windows is not None:
        total = min(total, max_windows)
    return ctx, iter_windows(ids, convention, ctx, bos_id, max_windows, spread), total


def evaluate_perplexity(logits_fn: LogitsFn, token_ids: Sequence[int] | torch.Tensor,
                        convention: str = DEFAULT_CONVENTION,
                        ctx: int | None = None, progress: bool = True, bos_id: int = 1,
                        max_windows: int | None = None, spread: bool = False) -> PerplexityResult:
    """Perplexity of `logits_fn` on `token_ids` under a named convention (module docstring)."""
    ctx, windows, total = plan_windows(token_ids, convention, ctx, bos_id, max_windows, spread)
    stats = NLLStats()
    with torch.no_grad():
        for window in progress_bar(windows, total, f"perplexity ({convention}, ctx {ctx})", progress):
            stats.add(window_nll(logits_fn(window.tokens), window))
    return PerplexityResult.from_stats(stats, convention, ctx)


# ---- text preparation ----

def read_texts(path) -> list[str]:
    """The documents of an evaluation text: one file, or every *.txt file of a directory (sorted by name)."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".txt", ".raw", ".md"))
        if not files:
            raise EvalError(f"{path}: directory has no .txt/.raw files to evaluate on")
    elif path.is_file():
        files = [path]
    else:
        raise EvalError(f"{path}: no such text file or directory")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise EvalError(f"{f}: not UTF-8 text") from None
    return texts


def tokenize_for_convention(tokenizer, texts: Sequence[str] | str, convention: str) -> list[int]:
    """One token stream with a single BOS at the start: documents joined by "\\n\\n" (gptq) or concatenated as-is
    (llamacpp tokenizes one raw file; several files are joined by "\\n\\n" there too)."""
    if isinstance(texts, str):
        texts = [texts]
    check_convention(convention, None)
    return tokenizer.encode("\n\n".join(texts), bos=True)
