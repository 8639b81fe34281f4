"""`quantkit report`: several outputs against one reference, as a table, plots and JSON (a report card).

The reference runs once over the text's windows and is reduced to `ReferenceLogits` (top-k log-probs per scored
position, its residual stream per layer on a few probe positions), saved beside the report so later reports can
reuse it (`ref_logits=`). Each output then runs alone (one model in memory at a time) over the same windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from quantkit.errors import EvalError
from quantkit.eval.kld import percentile
from quantkit.eval.perplexity import DEFAULT_CONVENTION, NLLStats, PerplexityResult, plan_windows, window_nll
from quantkit.eval.reference_logits import ReferenceLogits, coarse_kld, head_of, relative_error, tokens_digest
from quantkit.formats.sizes import bits_per_weight, file_bytes, stored_tensor_bytes

REFERENCE_FILE = "reference-logits.safetensors"
FIGURES = {"kld_vs_bpw": "kld_vs_bpw.png", "layer_error": "layer_error.png", "kld_distribution": "kld_distribution.png"}


@dataclass
class ReportCard:
    data: dict[str, Any]  # what report.json holds
    directory: Path

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["outputs"]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def render(self) -> str:
        d = self.data
        return (f"reference {d['reference']['source']}: PPL {d['reference']['ppl']:.2f} on {d['text']} "
                f"({d['convention']} convention, ctx {d['ctx']}, {d['n_windows']} windows, {d['n_tokens']} scored "
                f"tokens)\n" + markdown_table(d) + f"\n\nreport: {self.directory / 'report.md'}")


def layer_states(model, tokens: torch.Tensor) -> torch.Tensor:
    """The residual stream after each decoder layer, float32 [layers, T, hidden], for tokens [1, T]."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    h = model.embed(tokens)
    rope, mask = model.rope(positions, h.dtype), model.mask(positions, tokens.shape[1])
    states = []
    for layer in model.model.layers:
        h = layer(h, positions, rope, mask)
        states.append(h[0].float().cpu())
    return torch.stack(states)


def run_reference(eval_model, ids: torch.Tensor, meta: dict[str, str], convention: str, ctx: int, bos_id: int,
                  max_windows: int | None, mass: float, probe_tokens: int, progress=None) -> ReferenceLogits:
    logits_fn = eval_model.logits_fn()
    _, windows, total = plan_windows(ids, convention, ctx, bos_id, max_windows, False)
    parts, probe = [], None
    with torch.no_grad():
        for window in (progress(windows, total, "reference") if progress else windows):
            logits = logits_fn(window.tokens)
            window_nll(logits, window, f"the reference {eval_model.spec}")  # names a NaN/Inf reference
            parts.append(head_of(logits[0, window.first:-1], window.targets, mass))
            if probe is None:
                probe = layer_states(eval_model.model, window.tokens[:, :probe_tokens].to(eval_model.device))
    ids_kept, logp, counts, target, rest = (torch.cat(column) for column in zip(*parts))
    return ReferenceLogits(ids_kept, logp, counts, target, rest, probe, meta)


def score_output(eval_model, ref: ReferenceLogits, ids: torch.Tensor, convention: str, ctx: int, bos_id: int,
                 max_windows: int | None, probe_tokens: int, progress=None) -> tuple[dict[str, Any], torch.Tensor]:
    """One output's PPL, KLD statistics, same-top rate and per-layer error against `ref`; plus per-token KLDs."""
    logits_fn = eval_model.logits_fn()
    _, windows, total = plan_windows(ids, convention, ctx, bos_id, max_windows, False)
    stats, klds, same, start, layer_err, top1 = NLLStats(), [], [], 0, [], ref.top1()
    with torch.no_grad():
        for window in (progress(windows, total, eval_model.spec) if progress else windows):
            logits = logits_fn(window.tokens)
            stats.add(window_nll(logits, window, eval_model.spec))
            scored = logits[0, window.first:-1]
            n = scored.shape[0]
            klds.append(coarse_kld(ref, start, scored))
            same.append(scored.argmax(-1).cpu() == top1[start:start + n])
            if not layer_err:
                states = layer_states(eval_model.model, window.tokens[:, :probe_tokens].to(eval_model.device))
                layer_err = [relative_error(s, r) for s, r in zip(states, ref.probe_states)]
            start += n
    kld, same_top = torch.cat(klds), torch.cat(same).double()
    ppl = PerplexityResult.from_stats(stats, convention, ctx).to_dict()
    row = {"ppl": ppl["ppl"], "ppl_stderr": ppl["ppl_stderr"],
           "kld": {"mean": kld.mean().item(), "median": percentile(kld, 50.0), "p99": percentile(kld, 99.0),
                   "max": kld.max().item()},
           "same_top_pct": 100 * same_top.mean().item(), "layer_error": layer_err}
    return row, kld


def report_card(outputs: Sequence[str | Path], text: str | Path, output: str | Path, *,
                ref: str | Path | None = None, ref_logits: str | Path | None = None,
                convention: str = DEFAULT_CONVENTION, ctx: int | None = None, max_windows: int | None = None,
                mass: float = 0.99, probe_tokens: int = 64, device: str = "cpu", backend: str = "auto",
                dtype: str | None = None, tokenizer: str | Path | None = None, force: bool = False,
                progress: bool = False, log: Callable[[str], None] | None = None) -> ReportCard:
    """Compare `outputs` with the reference on `text`; write report.json, report.md, PNG plots and the reference's
    compact logits (reference-logits.safetensors) into the directory `output`. The reference is `ref` (a model) or
    `ref_logits` (such a file from an earlier report, checked to cover the same tokens and windows)."""
    from quantkit.eval.loading import load_eval_model, pick_tokenizer
    from quantkit.eval.perplexity import check_convention, read_texts, tokenize_for_convention
    from quantkit.io import atomic_dir, check_disjoint

    if not outputs:
        raise EvalError("no outputs to report on: give one or more quantized models")
    if (ref is None) == (ref_logits is None):
        raise EvalError("give the reference as a model (--ref) or as saved logits (--ref-logits), one of them")
    if not 0 < mass < 1 or probe_tokens < 1:
        raise EvalError(f"mass {mass}: expected a fraction in (0, 1); probe tokens {probe_tokens}: expected >= 1")
    ctx = check_convention(convention, ctx)
    texts = read_texts(str(text))
    output = Path(output)
    inputs = {f"output #{i + 1}": str(p) for i, p in enumerate(outputs)}
    check_disjoint({"-o": output}, {**inputs, "--ref": ref, "--ref-logits": ref_logits, "--text": str(text)})
    say = log or (lambda _msg: None)

    def bar(iterable, total, desc):
        from quantkit.progress import progress as progress_bar

        return progress_bar(iterable, desc=desc, total=total, unit="window", enabled=progress, leave=False)

    t0 = time.perf_counter()
    saved = ReferenceLogits.load(ref_logits) if ref_logits is not None else None
    reference = load_eval_model(str(ref), device, dtype, backend) if ref is not None else None
    first = None if reference is not None else load_eval_model(str(outputs[0]), device, dtype, backend)
    tok = pick_tokenizer(str(tokenizer) if tokenizer is not None else None, reference or first)
    ids = torch.as_tensor(tokenize_for_convention(tok, texts, convention), dtype=torch.int64)
    _, _, n_windows = plan_windows(ids, convention, ctx, tok.bos_id, max_windows, False)
    meta = {"source": str(ref if ref is not None else saved.meta.get("source")), "tokens_sha256": tokens_digest(ids),
            "convention": convention, "ctx": str(ctx), "n_windows": str(n_windows), "probe_tokens": str(probe_tokens),
            "mass": str(mass)}
    if saved is not None:
        problem = saved.matches(meta)
        if problem:
            raise EvalError(f"{ref_logits}: these reference logits are for another text or setting ({problem})")
        ref_data = saved
    else:
        say(f"reference: {ref}")
        ref_data = run_reference(reference, ids, meta, convention, ctx, tok.bos_id, max_windows, mass,
                                 probe_tokens, bar)
        del reference
    ref_ppl = math.exp(-ref_data.target_logp.double().mean().item())
    rows, per_token, names = [], {}, set()
    for path in outputs:
        say(f"scoring {path}")
        model = first if first is not None and path == outputs[0] else load_eval_model(str(path), device, dtype,
                                                                                       backend)
        first = None
        row, kld = score_output(model, ref_data, ids, convention, ctx, tok.bos_id, max_windows, probe_tokens, bar)
        name = Path(path).name
        while name in names:
            name += "'"
        names.add(name)
        tensor_bytes = stored_tensor_bytes(Path(path))
        rows.append({"name": name, "path": str(path), "format": model.info.get("format"),
                     "weight_types": model.info.get("weight_types"), "bytes": file_bytes(Path(path)),
                     "tensor_bytes": tensor_bytes,
                     "bpw": bits_per_weight(tensor_bytes, model.model.config.num_parameters()),
                     "delta_ppl": row["ppl"] - ref_ppl, **row})
        per_token[name] = kld
        del model
    data = {"reference": {"source": meta["source"], "ppl": ref_ppl}, "text": str(text), "tokenizer": str(tok.path),
            "convention": convention, "ctx": ctx, "n_windows": n_windows, "n_tokens": int(ref_data.target_logp.numel()),
            "reference_mass": float(ref_data.meta.get("mass", mass)),
            "reference_tokens_kept_mean": ref_data.counts.double().mean().item(), "probe_tokens": probe_tokens,
            "definitions": {
                "bpw": "8 x bytes of tensor data the output holds / parameters of the model (as `plan` and "
                       "`quantize` count it; bytes is the size of the files on disk)",
                "kld": "KL(reference || output) per scored token, in nats, over the reference's most likely tokens "
                       "holding reference_mass of its probability plus one bucket for all others (never above the "
                       "full-vocabulary KLD)",
                "same_top_pct": "% of scored tokens where the output's most likely token is the reference's",
                "layer_error": "||h_output - h_reference|| / ||h_reference|| of the residual stream after each layer, "
                               f"on the first {probe_tokens} positions of the first window"},
            "outputs": rows, "timing_s": round(time.perf_counter() - t0, 2),
            "figures": FIGURES}
    with atomic_dir(output, force=force) as tmp:
        write_report_files(tmp, data, per_token, ref_data)
    return ReportCard(data, output)


def write_report_files(directory: Path, data: dict[str, Any], per_token: dict[str, torch.Tensor],
                       ref: ReferenceLogits) -> None:
    from quantkit.eval import plots
    from quantkit.io import write_json

    rows = data["outputs"]
    plots.save(plots.kld_vs_bpw(rows), directory / FIGURES["kld_vs_bpw"])
    plots.save(plots.layer_error(rows), directory / FIGURES["layer_error"])
    plots.save(plots.kld_distribution(rows, per_token), directory / FIGURES["kld_distribution"])
    ref.save(directory / REFERENCE_FILE)
    write_json(directory / "report.json", data)
    figures = "\n\n".join(f"![{key.replace('_', ' ')}]({name})" for key, name in FIGURES.items())
    (directory / "report.md").write_text(
        f"# Report card\n\nReference: `{data['reference']['source']}` (PPL {data['reference']['ppl']:.3f}); text "
        f"`{data['text']}`, {data['convention']} convention, ctx {data['ctx']}, {data['n_windows']} windows, "
        f"{data['n_tokens']} scored tokens.\n\n{markdown_table(data)}\n\n{figures}\n\n## Definitions\n\n"
        + "\n".join(f"- **{k}**: {v}" for k, v in data["definitions"].items()) + "\n")


def markdown_table(data: dict[str, Any]) -> str:
    head = ("| output | format | size | BPW | PPL ± err | ΔPPL | KLD mean | KLD median | KLD p99 | same top |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in data["outputs"]:
        lines.append(f"| {r['name']} | {r['format']} | {r['bytes'] / 1e6:.1f} MB | {r['bpw']:.2f} | "
                     f"{r['ppl']:.3f} ± {r['ppl_stderr']:.3f} | {r['delta_ppl']:+.3f} | {r['kld']['mean']:.5f} | "
                     f"{r['kld']['median']:.5f} | {r['kld']['p99']:.4f} | {r['same_top_pct']:.2f}% |")
    return "\n".join(lines)

