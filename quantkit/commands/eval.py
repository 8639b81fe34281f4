"""`quantkit eval MODEL --text FILE`: perplexity in a named convention, and KLD against a reference with --ref.

The work is `quantkit.eval.run.evaluate`; this module parses options and renders.
"""

from __future__ import annotations

import json

import click

from quantkit.commands._eval_options import window_options
from quantkit.commands._types import BACKEND, DEVICE


@click.command("eval", short_help="Perplexity on a text, KLD against --ref.")
@click.argument("model")
@click.option("--text", "text_path", required=True, type=click.Path(),
              help="Evaluation text: a UTF-8 file, or a directory of .txt files (joined with blank lines).")
@click.option("--ref", "ref", default=None, help="Reference model: also report KLD, same-top % and Δp against it.")
@click.option("--spread", is_flag=True, help="With --max-windows: N windows evenly spaced over the whole text.")
@click.option("--device", default="cpu", show_default=True, type=DEVICE, help="cpu or cuda.")
@click.option("--backend", type=BACKEND, default="auto", show_default=True,
              help="Kernel backend for quantized weights (auto, torch, triton).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Activation dtype (default float32 on CPU, bfloat16 on CUDA).")
@click.option("--cache-dequant", is_flag=True,
              help="Dequantize quantized weights once and keep them (faster over many windows; full-precision memory).")
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer file, if the model has none.")
@click.option("--report", "report_dir", type=click.Path(), default=None,
              help="Also write report.json and report.md into this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
@window_options
def command(model, text_path, convention, ctx, ref, max_windows, spread, device, backend, dtype, cache_dequant,
            tokenizer_path, report_dir, as_json, no_progress):
    """Perplexity of MODEL on a text, in a named convention, with ± standard error and window/token counts.

    The default is llama-perplexity's convention at ctx 512 (as `compare`), so `eval --ref BASE` and `compare
    BASE MODEL` report the same KLD for the same pair.

    \b
    quantkit eval models/mistral-nano --text wiki.test.raw
    quantkit eval out/nano-Q4_K_M.gguf --text wiki.test.raw --ref models/mistral-nano
    quantkit eval out/nano-gptq --text wiki.test.raw --convention gptq --ctx 2048
    """
    from quantkit.eval.run import evaluate

    report = evaluate(model, text_path, ref=ref, convention=convention, ctx=ctx, max_windows=max_windows,
                      spread=spread, device=device, backend=backend, dtype=dtype, cache_dequant=cache_dequant,
                      tokenizer=tokenizer_path, progress=not no_progress, report_dir=report_dir)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render())
