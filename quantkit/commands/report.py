"""`quantkit report OUT... --ref SOURCE --text FILE -o DIR`: a report card of several outputs against one reference.

The work is `quantkit.eval.card.report_card`; this module parses options and renders.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.commands._eval_options import window_options
from quantkit.commands._types import BACKEND, DEVICE, FiniteFloatRange


@click.command("report", short_help="Report card: several outputs vs the reference.")
@click.argument("outputs", nargs=-1, required=True)
@click.option("--ref", "ref", default=None, help="The full-precision reference model.")
@click.option("--ref-logits", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Instead of --ref: the reference-logits.safetensors of an earlier report on the same text.")
@click.option("--text", "text_path", type=click.Path(), required=True,
              help="Evaluation text (file or directory of .txt); not the calibration text.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Report directory: report.md, report.json, PNG plots, reference-logits.safetensors.")
@click.option("--mass", type=FiniteFloatRange(0, 1, min_open=True, max_open=True), default=0.99, show_default=True,
              help="The reference keeps, per position, its most likely tokens holding this much probability (KLD "
                   "counts the rest as one bucket).")
@click.option("--device", default="cpu", show_default=True, type=DEVICE, help="cpu or cuda[:N].")
@click.option("--backend", type=BACKEND, default="auto", show_default=True,
              help="Kernel backend for quantized weights (auto, torch, triton).")
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer file, if the models have none.")
@click.option("--force", is_flag=True, help="Replace an earlier report in the same directory.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
@click.option("--no-progress", is_flag=True, help="No progress on stderr.")
@window_options
def command(outputs, ref, ref_logits, text_path, output, convention, ctx, max_windows, mass, device, backend,
            tokenizer_path, force, as_json, no_progress):
    """Compare quantized OUTPUTS with the reference on a text: size, bits per weight, perplexity, KLD, same-top
    rate and per-layer error, as a table, PNG plots (KLD vs BPW, per-layer error, KLD distribution) and JSON.

    \b
    quantkit report out/nano-gptq out/nano-Q4_K_M.gguf --ref models/mistral-nano --text eval.txt -o out/report
    quantkit report out/nano-awq --ref-logits out/report/reference-logits.safetensors --text eval.txt -o out/r2
    """
    from quantkit.api import report

    card = report(list(outputs), text_path, output, ref=ref, ref_logits=ref_logits, convention=convention, ctx=ctx,
                  max_windows=max_windows, mass=mass, device=device, backend=backend, tokenizer=tokenizer_path,
                  force=force, progress=not no_progress,
                  log=None if as_json else (lambda msg: click.echo(msg, err=True)))
    click.echo(json.dumps(card.to_dict(), indent=2) if as_json else card.render())
