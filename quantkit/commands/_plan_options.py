"""Options shared by `plan` and `quantize`: what to produce."""

from __future__ import annotations

import click

from quantkit.commands._types import COUNT, DEVICE, OVERRIDE, SEED
from quantkit.gguf.mixes import FILE_TYPES
from quantkit.pipeline.plan import METHODS
from quantkit.quant.scheme import PRESETS


def _list_types(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--list-types: every GGUF file type with its bits per weight and a description, then exit."""
    if not value or ctx.resilient_parsing:
        return
    from quantkit.pipeline.plan import list_gguf_types, render_listing

    click.echo(render_listing(list_gguf_types(), "type"))
    ctx.exit()


def _list_presets(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--list-presets: every integer preset with its bits per weight and a description, then exit."""
    if not value or ctx.resilient_parsing:
        return
    from quantkit.pipeline.plan import list_presets, render_listing

    click.echo(render_listing(list_presets(fmt="gptq"), "preset", "gptq"))
    ctx.exit()


def model_options(f):
    """The options `plan` and `quantize` share (what to produce)."""
    options = [
        click.argument("model"),
        click.option("--preset", default=None, type=click.Choice(list(PRESETS), case_sensitive=False),
                     metavar="PRESET",
                     help="Integer scheme preset (default w4a16-g128; w4a16-g128-asym with --method awq): "
                     "w8a16, w4a16-g128, w4a16-g128-asym, w4a16-g32, ... (--list-presets shows them all)."),
        click.option("--method", type=click.Choice(METHODS), default="rtn", show_default=True,
                     help="rtn: round to nearest (no data); gptq / awq: calibration-driven."),
        click.option("--format", "formats", default=None,
                     help="Output format(s), comma-separated: gptq, awq, compressed-tensors, gguf, dump. "
                     "Default: gguf with --type, else gptq (awq with --method awq)."),
        click.option("--type", "gguf_type", default=None, type=click.Choice(list(FILE_TYPES), case_sensitive=False),
                     metavar="TYPE",
                     help="GGUF file type (Q4_K_M, Q8_0, Q6_K, ...; --list-types shows them all); implies "
                     "--format gguf."),
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
        click.option("--list-types", is_flag=True, expose_value=False, is_eager=True, callback=_list_types,
                     help="Print every GGUF type (--type) with its bits per weight and a description, and exit."),
        click.option("--list-presets", is_flag=True, expose_value=False, is_eager=True, callback=_list_presets,
                     help="Print every preset (--preset) with its bits per weight and a description, and exit."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f
