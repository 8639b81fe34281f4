"""`quantkit eval MODEL --text FILE`: perplexity in a named convention, and KLD against a reference with --ref."""

from __future__ import annotations

import json
import time

import click

from quantkit.eval.perplexity import CONVENTIONS


def text_facts(path: str, texts: list[str], n_tokens: int) -> dict:
    import hashlib

    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
    return {"path": path, "documents": len(texts), "characters": sum(len(t) for t in texts), "tokens": n_tokens,
            "sha256": h.hexdigest()}


def progress_wrapper(enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, unit="tensor", leave=False, dynamic_ncols=True)


@click.command("eval")
@click.argument("model")
@click.option("--text", "text_path", required=True, type=click.Path(),
              help="Evaluation text: a UTF-8 file, or a directory of .txt files (joined with blank lines).")
@click.option("--convention", type=click.Choice(CONVENTIONS), default="gptq", show_default=True,
              help="gptq: non-overlapping windows, one BOS, all targets; llamacpp: llama-perplexity's chunks.")
@click.option("--ctx", type=int, default=None, help="Window length (default 2048 for gptq, 512 for llamacpp).")
@click.option("--ref", "ref", default=None, help="Reference model: also report KLD, same-top % and Δp against it.")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--spread", is_flag=True, help="With --max-windows: N windows evenly spaced over the whole text.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--backend", default="auto", show_default=True, help="Kernel backend for quantized weights (auto, torch, triton).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Activation dtype (default float32 on CPU, bfloat16 on CUDA).")
@click.option("--cache-dequant", is_flag=True,
              help="Dequantize quantized weights once and keep them (faster over many windows; full-precision memory).")
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer file, if the model has none.")
@click.option("--report", "report_dir", type=click.Path(), default=None,
              help="Also write report.json and report.md into this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
def command(model, text_path, convention, ctx, ref, max_windows, spread, device, backend, dtype, cache_dequant,
            tokenizer_path, report_dir, as_json, no_progress):
    """Perplexity of MODEL on a text, in a named convention, with ± standard error and window/token counts.

    \b
    quantkit eval models/mistral-nano --text wiki.test.raw --convention llamacpp --ctx 512
    quantkit eval out/nano-Q4_K_M.gguf --text wiki.test.raw --convention llamacpp --ref models/mistral-nano
    """
    from quantkit.eval.compare import compare_models
    from quantkit.eval.kld import format_report
    from quantkit.eval.loading import load_eval_model, pick_tokenizer
    from quantkit.eval.perplexity import check_convention, evaluate_perplexity, read_texts, tokenize_for_convention

    progress = not no_progress
    ctx = check_convention(convention, ctx)
    texts = read_texts(text_path)  # fail fast on a bad --text before loading models
    t0 = time.perf_counter()
    test = load_eval_model(model, device, dtype, backend, progress_wrapper(progress, "loading model"), cache_dequant)
    reference = load_eval_model(ref, device, dtype, backend, progress_wrapper(progress, "loading reference")) if ref else None
    tok = pick_tokenizer(tokenizer_path, test, reference)
    ids = tokenize_for_convention(tok, texts, convention)
    t_load = time.perf_counter() - t0
    out = {"model": {"source": model, **{k: v for k, v in test.info.items() if k in ("format", "device", "backend", "dtype", "weight_types", "weight_bytes")}},
           "text": text_facts(text_path, texts, len(ids)), "tokenizer": str(tok.path), "convention": convention,
           "ctx": ctx, "max_windows": max_windows, "spread": spread, "bos": "once at the start" if convention == "gptq" else "replaces each chunk's first token"}
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
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    p = out["ppl"]
    click.echo(f"model       {model} ({out['model'].get('format', '?')}, {out['model'].get('device', device)}, "
               f"{out['model'].get('dtype', '?')})")
    click.echo(f"text        {text_path}: {len(texts)} document(s), {len(ids)} tokens, sha256 {out['text']['sha256'][:12]}")
    click.echo(f"convention  {convention}, ctx {ctx}, BOS {out['bos']}: {p['n_windows']} windows, "
               f"{p['n_tokens']} scored tokens" + (f" (--max-windows {max_windows}{', spread over the text' if spread else ', the first ones'})" if max_windows else ""))
    click.echo(f"PPL         {p['ppl']:.4f} ± {p['ppl_stderr']:.4f}")
    if reference is not None:
        click.echo(f"PPL(ref)    {out['ref']['ppl']['ppl']:.4f} ± {out['ref']['ppl']['ppl_stderr']:.4f}   ({ref})")
        click.echo("")
        click.echo(format_report(out["compare"]))
