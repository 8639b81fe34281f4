"""Does a written checkpoint compute what quantkit thinks it computes? (the library behind `quantkit verify`)

1. OUT is read back through quantkit's own reader (every tensor decoded and validated) and run as the reference
   model with dequantized weights (fp32, CPU).
2. OUT is loaded by a real client too:
   - `client="transformers"` (default): transformers + optimum + gptqmodel for GPTQ/AWQ, transformers +
     compressed-tensors for compressed-tensors, in this process. Compared on the full logits: the max logit
     difference quantkit vs client, absolute and relative to the largest logit; fails beyond `tol` (relative).
   - `client="vllm"`: vLLM (CPU build) in its own venv, through `quantkit.eval.vllm_client` (a subprocess; every
     output of one call shares it). vLLM returns prompt log-probabilities: its top-K tokens per position
     (K = `topk`, 1000 by default) and the log-probability of the actual next token. Compared per position:
       KLD(quantkit ‖ vLLM) over vLLM's returned tokens plus one "rest" bucket holding the remaining probability
         mass of each side (the distributions coarse-grained to K+1 outcomes: a lower bound of the full-vocabulary
         KLD, equal to it when the rest mass is negligible; `rest_mass_mean` says how much was lumped);
       same top = quantkit's argmax is vLLM's rank-1 token;
       |Δ log p| of the actual next token (max and mean).
     Fails when the mean KLD, the same-top fraction or the max |Δ log p| is beyond VLLM_TOLERANCES[dtype]
     (calibrated in formats/*.md: vLLM's CPU kernels in float16 vs quantkit's fp32 differ by float rounding only).
3. The tokens (a fixed prompt set, or windows of a text file) go through both and through the full-precision
   SOURCE: KLD / same-top-token vs SOURCE are reported for each side.

A client that did not run (not installed, failed to load OUT) is a failure (`status == "not_run"` with a
reason), unless the caller opted out (`use_client=False`: `status == "skipped"`). Both checks compare quantkit's
reading of OUT with the client's reading of the same file: they catch a disagreement about what the bytes mean
(packing, zero points, scales layout, config semantics), not a corruption that every reader decodes the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import CheckFailed, EvalError, QuantkitError
from quantkit.eval.kld import bucketed_kld

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In the beginning of the nineteenth century, the city grew rapidly as new factories",
)
CLIENTS = ("transformers", "vllm")
VLLM_DTYPES = ("float16", "bfloat16")
# Pass limits of `client="vllm"` per vLLM activation dtype, calibrated on mistral-nano (formats/*.md, 2026-12-06;
# vLLM 0.32.0 CPU, weight-only CPUWNA16 kernel). Correct GPTQ/AWQ/compressed-tensors W4A16 outputs, worst of the
# built-in prompts (82 positions) and 4x256 tokens of calib/prose.txt (1020 positions):
#   float16:  KLD mean ≤ 3.0e-6, same top ≥ 99.8 %, max |Δlog p| ≤ 0.017
#   bfloat16: KLD mean ≤ 2.0e-4, same top ≥ 97.5 %, max |Δlog p| ≤ 0.125
# One layer's GPTQ zero points off by one (quantkit reads them, vLLM's symmetric kernel does not: a disagreement):
#   float16: KLD 2.9e-3, same top 95.1 %, |Δlog p| 0.33;  bfloat16: KLD 3.0e-3, same top 95.1 %, |Δlog p| 0.29.
# float16 separates the two by ~1000x in KLD; bfloat16 (8-bit mantissa) by ~15x only: prefer float16.
VLLM_TOLERANCES = {
    "float16": {"kld_mean": 1e-4, "same_top": 0.97, "max_abs_dlogp": 0.1},
    "bfloat16": {"kld_mean": 1e-3, "same_top": 0.95, "max_abs_dlogp": 0.25},
}
DEFAULT_TOPK = 1000


def prompt_tokens(tokenizer_path: Path | None, vocab_size: int) -> list[torch.Tensor]:
    """The fixed prompts as token ids; without a tokenizer, fixed pseudo-random ids (reproducible)."""
    if tokenizer_path is not None:
        from quantkit.model.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        return [torch.tensor([tok.encode(p, bos=True)]) for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 24), generator=g) for _ in PROMPTS]


def text_tokens(text_path: str | Path, tokenizer_path: Path | None, ctx: int = 256,
                max_windows: int = 4) -> list[torch.Tensor]:
    """The first `max_windows` non-overlapping windows of `ctx` tokens of a text file (BOS before the first)."""
    from quantkit.model.tokenizer import load_tokenizer

    if tokenizer_path is None:
        raise EvalError(f"--text {text_path}: neither the reference nor the output has a tokenizer")
    if not 2 <= ctx <= 512:
        raise EvalError(f"verify windows must be 2..512 tokens (vLLM runs with max_model_len 512), got {ctx}")
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--text {text_path}: cannot read it as UTF-8 text ({e})") from e
    ids = load_tokenizer(tokenizer_path).encode(text, bos=True)
    windows = [ids[i:i + ctx] for i in range(0, len(ids), ctx)][:max_windows]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise EvalError(f"--text {text_path}: fewer than 2 tokens")
    return [torch.tensor([w]) for w in windows]


def verify(out: str | Path, ref: str | Path, tol: float = 1e-3, use_client: bool = True,
           client: str = "transformers", **kwargs: Any) -> VerifyResult:
    """Read `out` with quantkit (every tensor decoded) and, when `use_client`, with its real client; run the
    prompts through both and through the full-precision `ref`. Keyword arguments as in `verify_many`.

    Raises CheckFailed when `ref` is a different model. A client disagreeing (`.client_status == "fail"`) or not
    running (`"not_run"`, with a reason) is not raised here: the result says so (`.failed`)."""
    return verify_many([out], ref, tol=tol, use_client=use_client, client=client, **kwargs)[0]


def verify_many(outs: Sequence[str | Path], ref: str | Path, tol: float = 1e-3, use_client: bool = True,
                client: str = "transformers", text: str | Path | None = None, ctx: int = 256,
                max_windows: int = 4, vllm_dtype: str = "float16", topk: int = DEFAULT_TOPK,
                tolerances: dict[str, float] | None = None, vllm_timeout: float | None = None) -> list[VerifyResult]:
    """`verify` for several outputs of the same source; with `client="vllm"` one vLLM process loads them all
    (its start-up is paid once). text: score windows (`ctx` tokens, at most `max_windows`) of this file instead of
    the fixed prompts. vllm_dtype: vLLM's activation dtype ("float16" or "bfloat16"); tolerances: overrides of
    VLLM_TOLERANCES[vllm_dtype] ("kld_mean", "same_top", "max_abs_dlogp"); topk: vLLM's prompt log-probs per
    position; vllm_timeout: seconds for the vLLM subprocess (default 120 + 300 per output)."""
    from quantkit.formats.base import read_checkpoint
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.model.reference import Transformer

    if client not in CLIENTS:
        raise EvalError(f"unknown client {client!r} (choose {', '.join(CLIENTS)})")
    if vllm_dtype not in VLLM_DTYPES:
        raise EvalError(f"vLLM dtype must be one of {', '.join(VLLM_DTYPES)}, got {vllm_dtype!r}")
    limits = dict(VLLM_TOLERANCES[vllm_dtype], **(tolerances or {}))
    source = open_checkpoint(ref)
    ckpts = []
    for out in outs:
        ckpt = read_checkpoint(out)
        for name in ckpt.names:  # decode and validate every tensor
            ckpt.get(name)
        if source.config.summary() | {"torch_dtype": None} != ckpt.config.summary() | {"torch_dtype": None}:
            raise CheckFailed(f"{out}: config does not match the reference {ref} (different model)")
        ckpts.append(ckpt)
    tokenizer_path = source.tokenizer_path or next((c.tokenizer_path for c in ckpts if c.tokenizer_path), None)
    if text is not None:
        prompts = text_tokens(text, tokenizer_path, ctx=ctx, max_windows=max_windows)
    else:
        prompts = prompt_tokens(tokenizer_path, ckpts[0].config.vocab_size)

    vllm_scores: dict[int, Any] = {}
    vllm_reasons: dict[int, str] = {}
    if use_client and client == "vllm":
        vllm_scores, vllm_reasons = _run_vllm(outs, ckpts, prompts, vllm_dtype, topk, vllm_timeout)

    base = Transformer.from_checkpoint(source, dtype=torch.float32)
    with torch.no_grad():
        base_logits = [base(ids)[0] for ids in prompts]
    del base
    results = []
    for i, (out, ckpt) in enumerate(zip(outs, ckpts)):
        if not use_client:
            status: dict[str, Any] = {"status": "skipped", "reason": "disabled (--no-client)"}
            results.append(_verify_transformers(out, ckpt, ref, prompts, text, base_logits, tol, None, status))
        elif client == "transformers":
            results.append(_verify_transformers(out, ckpt, ref, prompts, text, base_logits, tol, True, None))
        else:
            results.append(_verify_vllm(out, ckpt, ref, prompts, text, base_logits, vllm_scores.get(i),
                                        vllm_reasons.get(i), limits, vllm_dtype, topk))
    return results


def _header(out, ckpt, ref, prompts, text) -> dict[str, Any]:
    return {"output": str(out), "format": ckpt.format, "reference": str(ref),
            "text": None if text is None else str(text), "prompts": len(prompts),
            "tokens": int(sum(p.shape[1] for p in prompts))}


def _verify_transformers(out, ckpt, ref, prompts, text, base_logits, tol, use_client, status) -> VerifyResult:
    from quantkit.eval.kld import KLDAccumulator
    from quantkit.formats.clients import missing_client, transformers_logits_fn
    from quantkit.formats.dequantized import dequantized_model

    ours = dequantized_model(ckpt)
    client: Callable | None = None
    if use_client:
        reason = missing_client(ckpt.format)
        if reason is None:
            try:
                client = transformers_logits_fn(out)
            except Exception as e:  # noqa: BLE001 - any load failure means the client did not run; say why
                reason = f"transformers could not load {out}: {_one_line(e)}"
        if reason is not None:
            status = {"name": "transformers", "status": "not_run", "reason": reason}
    kld_ours, kld_client = KLDAccumulator(), KLDAccumulator()
    max_abs, max_logit = 0.0, 0.0
    with torch.no_grad():
        for ids, r in zip(prompts, base_logits):
            q = ours(ids)[0]
            kld_ours.update(r, q)
            max_logit = max(max_logit, float(q.abs().max()))
            if client is not None:
                c = client(ids)[0]
                kld_client.update(r, c)
                max_abs = max(max_abs, float((c - q).abs().max()))
    result: dict[str, Any] = _header(out, ckpt, ref, prompts, text)
    result["quantkit_vs_source"] = _kld_summary(kld_ours.result())
    if client is not None:
        rel = max_abs / max(max_logit, 1e-30)
        result["client"] = {"name": "transformers", "max_abs_logit_diff": max_abs, "max_rel_logit_diff": rel,
                            "tolerance": tol, "status": "pass" if rel <= tol else "fail",
                            "client_vs_source": _kld_summary(kld_client.result())}
    else:
        result["client"] = status
    return VerifyResult(result)


def _run_vllm(outs, ckpts, prompts, dtype, topk, timeout) -> tuple[dict[int, Any], dict[int, str]]:
    """vLLM's scores of every output it can load (index -> VLLMScores), and why not for the others."""
    from quantkit.eval.vllm_client import missing_vllm, prompt_logprobs

    reasons: dict[int, str] = {}
    runnable = []
    for i, ckpt in enumerate(ckpts):
        reason = missing_vllm(ckpt.format)
        if reason is None:
            runnable.append(i)
        else:
            reasons[i] = reason
    if not runnable:
        return {}, reasons
    try:
        scores = prompt_logprobs([outs[i] for i in runnable], [p[0].tolist() for p in prompts], topk=topk,
                                 dtype=dtype, timeout=timeout)
    except QuantkitError as e:
        return {}, reasons | {i: str(e).splitlines()[0] for i in runnable}
    found: dict[int, Any] = {}
    for i, s in zip(runnable, scores):
        if s.error is not None:
            reasons[i] = f"vLLM could not load it: {s.error}"
        else:
            found[i] = s
    return found, reasons


def _verify_vllm(out, ckpt, ref, prompts, text, base_logits, scores, reason, limits, dtype, topk) -> VerifyResult:
    from quantkit.eval.kld import KLDAccumulator
    from quantkit.formats.dequantized import dequantized_model

    ours = dequantized_model(ckpt)
    kld_ours = KLDAccumulator()
    rows: list[tuple[float, float, bool, bool, float, float]] = []
    with torch.no_grad():
        for s, (ids, r) in enumerate(zip(prompts, base_logits)):
            q = ours(ids)[0]
            kld_ours.update(r, q)
            if scores is None:
                continue
            logq = torch.log_softmax(q.double(), -1)
            logr = torch.log_softmax(r.double(), -1)
            for t, pos in enumerate(scores.sequences[s]):  # pos: vLLM's view of token t+1 given tokens <= t
                rows.append(_compare_position(logq[t], logr[t], pos))
    result: dict[str, Any] = _header(out, ckpt, ref, prompts, text)
    result["quantkit_vs_source"] = _kld_summary(kld_ours.result())
    if scores is None:
        result["client"] = {"name": "vllm", "status": "not_run", "reason": reason}
        return VerifyResult(result)
    n = len(rows)
    kld = [r[0] for r in rows]
    dlogp = [r[4] for r in rows]
    c: dict[str, Any] = {
        "name": "vllm", "vllm_version": scores.info.get("vllm_version"), "dtype": dtype,
        "quantization": scores.info.get("quantization"), "kernels": scores.info.get("kernels", []),
        "load_s": round(scores.load_s, 1), "run_s": round(scores.run_s, 1), "topk": topk, "positions": n,
        "kld_mean": sum(kld) / n, "kld_max": max(kld), "same_top": sum(r[2] for r in rows) / n,
        "max_abs_dlogp": max(dlogp), "mean_abs_dlogp": sum(dlogp) / n,
        "rest_mass_mean": sum(r[5] for r in rows) / n,
        "kld_support": f"vLLM's top-{topk} tokens (+ the actual token) and one bucket for the rest",
        "tolerances": dict(limits),
        "client_vs_source": {"kld_mean": sum(r[1] for r in rows) / n, "same_top": sum(r[3] for r in rows) / n},
    }
    failed = [k for k, bad in (("kld_mean", c["kld_mean"] > limits["kld_mean"]),
                               ("same_top", c["same_top"] < limits["same_top"]),
                               ("max_abs_dlogp", c["max_abs_dlogp"] > limits["max_abs_dlogp"])) if bad]
    c["failed_checks"] = failed
    c["status"] = "fail" if failed else "pass"
    result["client"] = c
    return VerifyResult(result)


def _compare_position(logq: torch.Tensor, logr: torch.Tensor, pos: dict) -> tuple[float, float, bool, bool,
                                                                                     float, float]:
    """(KLD quantkit‖vLLM, KLD source‖vLLM, same top vs quantkit, same top vs source, |Δlog p|, quantkit's rest
    mass) at one position, from vLLM's top list and actual-token log-prob (see the module docstring)."""
    ids = [int(t) for t, _ in pos["top"]]
    lv = [float(lp) for _, lp in pos["top"]]
    if pos["token"] not in ids:
        ids.append(int(pos["token"]))
        lv.append(float(pos["logprob"]))
    index = torch.tensor(ids)
    v = torch.tensor(lv, dtype=torch.float64)
    v_rest = torch.tensor(max(1.0 - float(v.exp().sum()), 1e-300), dtype=torch.float64).log()  # vLLM lists no more
    top = ids[0]
    others = torch.ones(logq.shape[-1], dtype=torch.bool)
    others[index] = False

    def kld(logp: torch.Tensor) -> tuple[float, float]:
        lp = logp[index]
        p_rest = logp[others].logsumexp(-1) if bool(others.any()) else torch.tensor(float("-inf"))
        k = bucketed_kld((lp.exp() * (lp - v)).sum(), p_rest, v_rest)
        return float(k), float(p_rest.exp())

    k_q, rest = kld(logq)
    k_r, _ = kld(logr)
    dlogp = abs(float(logq[int(pos["token"])]) - float(pos["logprob"]))
    return k_q, k_r, int(logq.argmax()) == top, int(logr.argmax()) == top, dlogp, rest


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _kld_summary(r: dict) -> dict:
    return {"kld_mean": r["kld"]["mean"], "kld_max": r["kld"]["max"], "same_top": r["same_top"]["fraction"]}


def render(result: dict) -> str:
    """The text `quantkit verify` prints for a result dict."""
    q = result["quantkit_vs_source"]
    what = (f"{result['prompts']} prompts" if result.get("text") is None
            else f"{result['prompts']} windows of {result['text']}")
    lines = [(f"verify {result['output']} ({result['format']}) against {result['reference']}: "
              f"{what}, {result['tokens']} tokens"),
             (f"  quantkit reader vs source : KLD mean {q['kld_mean']:.6f}  max {q['kld_max']:.6f}  "
              f"same top {100 * q['same_top']:.1f}%")]
    c = result["client"]
    name = c.get("name", "real client")
    if c["status"] == "skipped":
        lines.append(f"  real client               : SKIPPED ({c['reason']})")
    elif c["status"] == "not_run":
        lines.append(f"  {name:<26}: DID NOT RUN ({c['reason']})")
    elif name == "vllm":
        cs, t = c["client_vs_source"], c["tolerances"]
        lines.append(f"  vllm vs source            : KLD mean {cs['kld_mean']:.6f}  same top "
                     f"{100 * cs['same_top']:.1f}%  (top-{c['topk']} + rest)")
        kernels = ", ".join(c["kernels"]) or "kernel not logged"
        lines.append(f"  quantkit vs vllm {c['vllm_version']} ({c['quantization']}, {c['dtype']}, {kernels}; "
                     f"load {c['load_s']:.0f} s), {c['positions']} positions:")
        lines.append(f"    KLD mean {c['kld_mean']:.2e} (≤ {t['kld_mean']:.0e})  max {c['kld_max']:.2e}  "
                     f"same top {100 * c['same_top']:.1f}% (≥ {100 * t['same_top']:.0f}%)  "
                     f"max |Δlog p| {c['max_abs_dlogp']:.3f} (≤ {t['max_abs_dlogp']:g})  "
                     f"rest mass {100 * c['rest_mass_mean']:.1f}%  {c['status'].upper()}")
    else:
        cs = c["client_vs_source"]
        lines.append(f"  {name} vs source  : KLD mean {cs['kld_mean']:.6f}  max {cs['kld_max']:.6f}  "
                     f"same top {100 * cs['same_top']:.1f}%")
        lines.append(f"  quantkit vs {name}: max |dlogit| {c['max_abs_logit_diff']:.3e}  "
                     f"relative {c['max_rel_logit_diff']:.3e}  (tolerance {c['tolerance']:.0e})  "
                     f"{c['status'].upper()}")
    return "\n".join(lines)


@dataclass
class VerifyResult:
    """`data`: {"output", "format", "reference", "text" (None: the built-in prompts), "prompts" (sequences),
    "tokens", "quantkit_vs_source", "client"} (the JSON
    `quantkit verify --json` prints); client["status"] is "pass", "fail", "not_run" (the client did not run:
    "reason" says why) or "skipped" (opted out)."""

    data: dict[str, Any]

    @property
    def client_status(self) -> str:
        return self.data["client"]["status"]

    @property
    def failed(self) -> bool:
        """The client disagrees with quantkit beyond the tolerances, or did not run although it was asked to."""
        return self.client_status in ("fail", "not_run")

    @property
    def max_rel_logit_diff(self) -> float | None:
        return self.data["client"].get("max_rel_logit_diff")

    def failure(self) -> str | None:
        """One line saying why this result failed, or None."""
        c = self.data["client"]
        out = self.data["output"]
        if c["status"] == "not_run":
            return f"{out}: the {c.get('name', 'real')} client did not run: {c['reason']}"
        if c["status"] != "fail":
            return None
        if c.get("name") == "vllm":
            t = c["tolerances"]
            parts = {"kld_mean": f"KLD mean {c['kld_mean']:.2e} > {t['kld_mean']:.0e}",
                     "same_top": f"same top {100 * c['same_top']:.1f}% < {100 * t['same_top']:.0f}%",
                     "max_abs_dlogp": f"max |Δlog p| {c['max_abs_dlogp']:.3f} > {t['max_abs_dlogp']:g}"}
            return f"{out}: vLLM disagrees with quantkit: " + ", ".join(parts[k] for k in c["failed_checks"])
        return (f"{out}: the client's logits differ from quantkit's by {c['max_rel_logit_diff']:.3e} (relative) > "
                f"{c['tolerance']:.0e}")

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def render(self) -> str:
        return render(self.data)
