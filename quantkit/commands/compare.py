"""`quantkit compare BASE QUANT --text FILE`: how far a quantized model is from its base.

Per-linear weight error (SQNR dB, relative MSE; worst first) from the stored tensors, then the output-level
KL divergence / same-top / Δp statistics on a text, in llama-perplexity's layout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import click
import torch

from quantkit.eval.perplexity import CONVENTIONS


def open_stored(spec: str) -> tuple[list[str], Callable[[str], object]]:
    """(canonical names, getter) of any checkpoint: quantized formats first, then full-precision sources."""
    from quantkit.errors import FormatError
    from quantkit.model.checkpoint import open_checkpoint

    path = Path(spec).expanduser()
    if path.exists():
        from quantkit.formats.base import detect_format

        try:
            fmt = detect_format(path)
        except FormatError:
            fmt = None
        if fmt is not None and fmt.name not in ("hf", "consolidated"):
            q = fmt.read(path)
            return list(q.names), q.get
    ckpt = open_checkpoint(spec)
    return ckpt.tensor_names(), ckpt.get_tensor


def as_float(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.float()
    return t.dequantize(torch.float32)


def stored_kind(t) -> str:
    from quantkit.quant.tensor import GGMLTensor, QuantTensor

    if isinstance(t, QuantTensor):
        return f"int{t.bits}-g{t.group_size}"
    if isinstance(t, GGMLTensor):
        return t.type_name
    return str(t.dtype).replace("torch.", "")


def weight_errors(base: str, quant: str, progress: bool = True) -> list[dict]:
    """SQNR and relative MSE of every 2-D tensor QUANT stores, against BASE; sorted worst (lowest SQNR) first."""
    from quantkit.quant.rtn import sqnr_db

    base_names, base_get = open_stored(base)
    names, get = open_stored(quant)
    common = [n for n in names if n in set(base_names)]
    if progress:
        from tqdm import tqdm

        common = tqdm(common, desc="weight error", unit="tensor", leave=False, dynamic_ncols=True)
    rows = []
    for name in common:
        stored = get(name)
        if len(getattr(stored, "shape", ())) != 2:
            continue
        w, wq = base_get(name).float(), as_float(stored)
        if tuple(w.shape) != tuple(wq.shape):
            rows.append({"name": name, "kind": stored_kind(stored), "error": f"shape {list(wq.shape)} vs base {list(w.shape)}"})
            continue
        rel = ((w - wq).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)).item()
        rows.append({"name": name, "kind": stored_kind(stored), "sqnr_db": sqnr_db(w, wq), "rel_mse": rel})
    rows.sort(key=lambda r: r.get("sqnr_db", -1e9))
    return rows


@click.command("compare")
@click.argument("base")
@click.argument("quant")
@click.option("--text", "text_path", type=click.Path(), default=None,
              help="Evaluation text (file or directory of .txt); without it only weight errors are shown.")
@click.option("--convention", type=click.Choice(CONVENTIONS), default="llamacpp", show_default=True)
@click.option("--ctx", type=int, default=None, help="Window length (default 512 for llamacpp, 2048 for gptq).")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--top", type=int, default=10, show_default=True, help="Show the N tensors with the largest weight error.")
@click.option("--weights/--no-weights", default=True, show_default=True, help="Compute per-tensor weight errors.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", default="auto", show_default=True)
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer file, if neither model has one.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--no-progress", is_flag=True)
def command(base, quant, text_path, convention, ctx, max_windows, top, weights, device, backend, tokenizer_path,
            as_json, no_progress):
    """Compare QUANT with its full-precision BASE: per-tensor weight error and KL divergence on a text.

    \b
    quantkit compare models/mistral-nano out/nano-Q4_K_M.gguf --text wiki.test.raw
    """
    from quantkit.eval.compare import compare_models
    from quantkit.eval.kld import format_report
    from quantkit.eval.loading import load_eval_model, pick_tokenizer
    from quantkit.eval.perplexity import check_convention, read_texts, tokenize_for_convention

    progress = not no_progress
    ctx = check_convention(convention, ctx)
    texts = read_texts(text_path) if text_path else None
    out: dict = {"base": base, "quant": quant}
    if weights:
        out["weights"] = weight_errors(base, quant, progress)
    if texts is not None:
        t0 = time.perf_counter()
        ref = load_eval_model(base, device, None, backend)
        test = load_eval_model(quant, device, None, backend)
        tok = pick_tokenizer(tokenizer_path, ref, test)
        ids = tokenize_for_convention(tok, texts, convention)
        out["compare"] = compare_models(ref.logits_fn(), test.logits_fn(), ids, convention, ctx, progress=progress,
                                        bos_id=tok.bos_id, max_windows=max_windows)
        out["timing_s"] = round(time.perf_counter() - t0, 2)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    if weights:
        rows = out["weights"]
        click.echo(f"weight error, worst {min(top, len(rows))} of {len(rows)} tensors (SQNR dB, higher is better):")
        for r in rows[:top]:
            if "error" in r:
                click.echo(f"  {r['name']:<48} {r['kind']:<10} {r['error']}")
            else:
                click.echo(f"  {r['name']:<48} {r['kind']:<10} {r['sqnr_db']:7.2f} dB   rel MSE {r['rel_mse']:.3e}")
        finite = [r["sqnr_db"] for r in rows if "sqnr_db" in r]
        if finite:
            click.echo(f"  mean SQNR {sum(finite) / len(finite):.2f} dB over {len(finite)} tensors")
        click.echo("")
    if "compare" in out:
        c = out["compare"]
        click.echo(f"{convention}, ctx {ctx}: {c['n_windows']} windows, {c['n_tokens']} scored tokens")
        click.echo(format_report(c))
