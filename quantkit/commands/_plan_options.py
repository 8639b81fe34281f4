"""Options shared by `plan` and `quantize`: what to produce."""

from __future__ import annotations

import click

from quantkit.commands._types import COUNT, DEVICE, OVERRIDE, SEED
from quantkit.pipeline.plan import METHODS


def model_options(f):
    """The options `plan` and `quantize` share (what to produce)."""
    options = [
        click.argument("model"),
        click.option("--preset", default=None,
                     help="Integer scheme preset (default w4a16-g128; w4a16-g128-asym with --method awq): "
                     "w8a16, w4a16-g128, w4a16-g128-asym, w4a16-g32, ... (see quantkit/quant/scheme.py)."),
        click.option("--method", type=click.Choice(METHODS), default="rtn", show_default=True,
                     help="rtn: round to nearest (no data); gptq / awq: calibration-driven."),
        click.option("--format", "formats", default=None,
                     help="Output format(s), comma-separated: gptq, awq, compressed-tensors, gguf, dump. "
                     "Default: gguf with --type, else gptq (awq with --method awq)."),
        click.option("--type", "gguf_type", default=None,
                     help="GGUF file type (Q4_K_M, Q8_0, Q6_K, ...); implies --format gguf."),
        click.option("--override", "overrides", multiple=True, type=OVERRIDE, metavar="PATTERN=PRESET",
                     help="Per-tensor scheme: 're:REGEX=PRESET', 'NAME=PRESET', '-:REGEX' (keep float); for GGUF "
                     "'re:REGEX=TYPE'. Repeatable; the last match wins; fused groups share one scheme."),
        click.option("--act-order/--no-act-order", default=None, help="GPTQ: process columns by descending Hessian "
                     "diagonal (static groups: g_idx stays trivial)."),
        click.option("--calib", default=None, help="Calibration data: builtin, a .txt/.jsonl/.parquet file, a "
                     "directory of them, or wikitext2|c4|pileval|ultrachat (needs the network). Default builtin for "
                     "gptq/awq; "
                     "with rtn + GGUF it enables an importance matrix."),
        click.option("--calib-samples", default=128, show_default=True, type=COUNT, help="Calibration windows."),
        click.option("--calib-seqlen", default=512, show_default=True, type=click.IntRange(min=2),
                     help="Tokens per window."),
        click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the window sampling."),
        click.option("--device", default="cpu", show_default=True, type=DEVICE, help="cpu or cuda[:N]."),
        click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f
