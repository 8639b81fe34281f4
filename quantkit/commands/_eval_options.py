"""The evaluation-window options shared by `eval`, `compare` and `report` (one default convention for all)."""

from __future__ import annotations

import click

from quantkit.commands._types import COUNT
from quantkit.eval.perplexity import CONVENTIONS, DEFAULT_CONVENTION, DEFAULT_CTX


WINDOW_OPTIONS = [
    click.option("--convention", type=click.Choice(CONVENTIONS), default=DEFAULT_CONVENTION, show_default=True,
                 help="llamacpp: llama-perplexity's chunks (BOS each, second half scored); gptq: non-overlapping "
                 "windows, one BOS, all targets. One default for eval, compare and report."),
    click.option("--ctx", type=click.IntRange(min=4), default=None,
                 help=f"Window length (default {DEFAULT_CTX['llamacpp']} for llamacpp, {DEFAULT_CTX['gptq']} for "
                 "gptq)."),
    click.option("--max-windows", type=COUNT, default=None, help="Evaluate only the first N windows."),
]


def window_options(fn):
    for option in reversed(WINDOW_OPTIONS):
        fn = option(fn)
    return fn
