"""Whole evaluations, as `quantkit eval` and `quantkit compare` run them: load, tokenize, score, report.

`evaluate(model, text, ...)` -> `EvalReport` (perplexity, and KLD / same-top / Δp against `ref`);
`compare(base, quant, text, ...)` -> `CompareReport` (per-tensor weight error, and KLD against the base).
Each report's `.to_dict()` is the command's JSON document and `.render()` its text.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.eval.perplexity import DEFAULT_CONVENTION, DEFAULT_CTX
from quantkit.eval.weights import WeightErrors


def text_facts(path: str, texts: list[str], n_tokens: int) -> dict[str, Any]:
    """{"path", "documents", "characters", "tokens", "sha256"} of an evaluation text (sha256 over the documents)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
    return {"path": path, "documents": len(texts), "characters": sum(len(t) for t in texts), "tokens": n_tokens,
            "sha256": h.hexdigest()}


def progress_wrapper(enabled: bool, desc: str) -> Callable[[Iterable], Iterable] | None:
    """A progress wrapper for model loading (stderr: a bar on a terminal, plain lines elsewhere), or None when
    progress is off."""
    if not enabled:
        return None
    from quantkit.progress import progress

    return lambda items: progress(items, desc=desc, unit="tensor", leave=False, dynamic_ncols=True)


# ---- quantkit eval ----

@dataclass
class EvalReport:
    """The result of `evaluate`. `data` is the JSON document `quantkit eval --json` prints (and report.json holds).

    Keys: model, text, tokenizer, convention, ctx, max_windows, spread, bos, ppl, timing_s; with a reference also
    ref and compare (KLD, same-top, Δp, llama.cpp's PPL statistics)."""

    data: dict[str, Any]
    device: str = "cpu"  # the requested device, shown when the model did not report one

    @property
    def ppl(self) -> float:
        return self.data["ppl"]["ppl"]

    @property
    def ppl_stderr(self) -> float:
        return self.data["ppl"]["ppl_stderr"]

    @property
    def kld_mean(self) -> float | None:
        return self.data["compare"]["kld"]["mean"] if "compare" in self.data else None

    @property
    def same_top(self) -> float | None:
        """Fraction of scored positions where the top token agrees with the reference (None without one)."""
        return self.data["compare"]["same_top"]["fraction"] if "compare" in self.data else None

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def render(self) -> str:
        from quantkit.eval.kld import format_report

        out = self.data
        p, m, t = out["ppl"], out["model"], out["text"]
        max_windows, spread = out["max_windows"], out["spread"]
        lines = [
            f"model       {m['source']} ({m.get('format', '?')}, {m.get('device', self.device)}, "
            f"{m.get('dtype', '?')})",
            f"text        {t['path']}: {t['documents']} document(s), {t['tokens']} tokens, sha256 {t['sha256'][:12]}",
            f"convention  {out['convention']}, ctx {out['ctx']}, BOS {out['bos']}: {p['n_windows']} windows, "
            f"{p['n_tokens']} scored tokens"
            + (f" (--max-windows {max_windows}{', spread over the text' if spread else ', the first ones'})"
               if max_windows else ""),
            f"PPL         {p['ppl']:.4f} ± {p['ppl_stderr']:.4f}",
        ]
        if "ref" in out:
            r = out["ref"]
            lines += [f"PPL(ref)    {r['ppl']['ppl']:.4f} ± {r['ppl']['ppl_stderr']:.4f}   ({r['source']})", "",
                      format_report(out["compare"])]
        return "\n".join(lines)


MODEL_FACTS = ("format", "device", "backend", "dtype", "weight_types", "weight_bytes")


def evaluate(model: str | Path, text: str | Path, *, ref: str | Path | None = None,
             convention: str = DEFAULT_CONVENTION,
             ctx: int | None = None, max_windows: int | None = None, spread: bool = False, device: str = "cpu",
             backend: str = "auto", dtype: str | None = None, cache_dequant: bool = False,
             tokenizer: str | Path | None = None, progress: bool = False,
             report_dir: str | Path | None = None) -> EvalReport:
    """Perplexity of `model` on `text` (a UTF-8 file or a directory of .txt) in a named convention (default
    `llamacpp` at ctx 512, as `compare`: see `quantkit.eval.perplexity.DEFAULT_CONVENTION`).

    With `ref`, both models run over the same windows and the report adds the reference perplexity and KLD /
    same-top / Δp statistics. `tokenizer`: a tokenizer file when the models have none. `report_dir`: also write
    report.json and report.md there. `progress`: progress on stderr. Raises QuantkitError on bad input (the text
    is read and the convention checked before any model is loaded)."""
    from quantkit.eval.compare import compare_models
    from quantkit.eval.loading import load_eval_model, pick_tokenizer
    from quantkit.eval.perplexity import (
        check_convention,
        evaluate_perplexity,
        read_texts,
        tokenize_for_convention,
    )

    model, text = str(model), str(text)
    ref = str(ref) if ref is not None else None
    ctx = check_convention(convention, ctx)
    texts = read_texts(text)  # fail fast on a bad text or report path before loading models
    if report_dir:
        from quantkit.io import check_disjoint, check_output_path

        check_disjoint({"--report": report_dir}, {"model": model, "--ref": ref, "--text": text})
        check_output_path(report_dir, force=True)  # an earlier report is replaced, nothing else
    t0 = time.perf_counter()
    test = load_eval_model(model, device, dtype, backend, progress_wrapper(progress, "loading model"), cache_dequant)
    reference = (load_eval_model(ref, device, dtype, backend, progress_wrapper(progress, "loading reference"))
                 if ref else None)
    tok = pick_tokenizer(str(tokenizer) if tokenizer is not None else None, test, reference)
    ids = tokenize_for_convention(tok, texts, convention)
    t_load = time.perf_counter() - t0
    out: dict[str, Any] = {
        "model": {"source": model, **{k: v for k, v in test.info.items() if k in MODEL_FACTS}},
        "text": text_facts(text, texts, len(ids)), "tokenizer": str(tok.path), "convention": convention,
        "ctx": ctx, "max_windows": max_windows, "spread": spread,
        "bos": "once at the start" if convention == "gptq" else "replaces each chunk's first token"}
    t1 = time.perf_counter()
    if reference is None:
        result = evaluate_perplexity(test.logits_fn(), ids, convention, ctx, progress=progress, bos_id=tok.bos_id,
                                     max_windows=max_windows, spread=spread)
        out["ppl"] = result.to_dict()
    else:
        cmp = compare_models(reference.logits_fn(), test.logits_fn(), ids, convention, ctx, progress=progress,
                             bos_id=tok.bos_id, max_windows=max_windows, spread=spread)
        out["ppl"] = cmp["ppl_test"]
        out["ref"] = {"source": ref, "ppl": cmp["ppl_ref"]}
        out["compare"] = {k: v for k, v in cmp.items() if k not in ("ppl_ref", "ppl_test")}
    out["timing_s"] = {"load": round(t_load, 2), "eval": round(time.perf_counter() - t1, 2)}
    if report_dir:
        from quantkit.eval.report import write_report

        write_report(out, report_dir)
    return EvalReport(out, device=device)


# ---- quantkit compare ----

@dataclass
class CompareReport:
    """The result of `compare`. `data` is the JSON document `quantkit compare --json` prints: base, quant, and
    weights (per-tensor rows, worst first) and/or compare (KLD statistics) + timing_s."""

    data: dict[str, Any]
    convention: str = DEFAULT_CONVENTION
    ctx: int = DEFAULT_CTX[DEFAULT_CONVENTION]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def render(self, top: int = 10) -> str:
        """The text `quantkit compare` prints: the `top` worst tensors, then the KLD report ("" when neither ran)."""
        from quantkit.eval.kld import format_report

        parts = []
        if "weights" in self.data:
            parts.append(WeightErrors(self.data["weights"]).render(top))
        if "compare" in self.data:
            c = self.data["compare"]
            parts.append(f"{self.convention}, ctx {self.ctx}: {c['n_windows']} windows, {c['n_tokens']} scored tokens")
            parts.append(format_report(c))
        return "\n".join(parts)


def compare(base: str | Path, quant: str | Path, text: str | Path | None = None, *,
            convention: str = DEFAULT_CONVENTION,
            ctx: int | None = None, max_windows: int | None = None, weights: bool = True, device: str = "cpu",
            backend: str = "auto", tokenizer: str | Path | None = None, progress: bool = False) -> CompareReport:
    """How far `quant` is from its full-precision `base`: per-tensor weight error (`weights`), and, with `text`,
    KL divergence / same-top / Δp of the outputs over the convention's windows. `progress`: progress on stderr."""
    from quantkit.eval.compare import compare_models
    from quantkit.eval.loading import load_eval_model, pick_tokenizer
    from quantkit.eval.perplexity import (
        check_convention,
        read_texts,
        tokenize_for_convention,
    )
    from quantkit.eval.weights import weight_errors

    base, quant = str(base), str(quant)
    ctx = check_convention(convention, ctx)
    texts = read_texts(text) if text else None
    out: dict[str, Any] = {"base": base, "quant": quant}
    if weights:
        out["weights"] = weight_errors(base, quant, progress).to_dict()
    if texts is not None:
        t0 = time.perf_counter()
        ref = load_eval_model(base, device, None, backend)
        test = load_eval_model(quant, device, None, backend)
        tok = pick_tokenizer(str(tokenizer) if tokenizer is not None else None, ref, test)
        ids = tokenize_for_convention(tok, texts, convention)
        out["compare"] = compare_models(ref.logits_fn(), test.logits_fn(), ids, convention, ctx, progress=progress,
                                        bos_id=tok.bos_id, max_windows=max_windows)
        out["timing_s"] = round(time.perf_counter() - t0, 2)
    return CompareReport(out, convention=convention, ctx=ctx)
