"""`quantkit compare BASE QUANT --text FILE`: how far a quantized model is from its base.

Per-linear weight error (SQNR dB, relative MSE; worst first) from the stored tensors, then the output-level
KL divergence / same-top / Δp statistics on a text, in llama-perplexity's layout. The work is
`quantkit.eval.run.compare`; this module parses options and renders.
"""

from __future__ import annotations

import json

import click

from quantkit.commands._eval_options import window_options
from quantkit.commands._types import BACKEND, DEVICE


@click.command("compare", short_help="Weight error and KLD of QUANT vs BASE.")
@click.argument("base")
@click.argument("quant")
@click.option("--text", "text_path", type=click.Path(), default=None,
              help="Evaluation text (file or directory of .txt); without it only weight errors are shown.")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Show the N tensors with the largest weight error.")
@click.option("--weights/--no-weights", default=True, show_default=True, help="Compute per-tensor weight errors.")
@click.option("--device", default="cpu", show_default=True, type=DEVICE, help="cpu or cuda[:N].")
@click.option("--backend", type=BACKEND, default="auto", show_default=True,
              help="Kernel backend for quantized weights (auto, torch, triton).")
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer file, if neither model has one.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--no-progress", is_flag=True, help="No progress on stderr.")
@window_options
def command(base, quant, text_path, convention, ctx, max_windows, top, weights, device, backend, tokenizer_path,
            as_json, no_progress):
    """Compare QUANT with its full-precision BASE: per-tensor weight error and KL divergence on a text.

    \b
    quantkit compare models/mistral-nano out/nano-Q4_K_M.gguf --text wiki.test.raw
    """
    from quantkit.eval.run import compare

    report = compare(base, quant, text_path, convention=convention, ctx=ctx, max_windows=max_windows,
                     weights=weights, device=device, backend=backend, tokenizer=tokenizer_path,
                     progress=not no_progress)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    text = report.render(top)
    if text:
        click.echo(text)
