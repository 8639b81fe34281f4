"""`quantkit plan MODEL`: every tensor's target, output size, BPW and the peak-memory estimate (no work done)."""

from __future__ import annotations

import click

from quantkit.commands.quantize import _print_plan, make_plan, model_options


@click.command("plan")
@model_options
def command(model, preset, method, formats, gguf_type, overrides, act_order, calib, calib_samples, calib_seqlen,
            seed, device, as_json):
    """Show what `quantize` would do with the same options: targets, sizes, bits per weight, peak RAM/VRAM.

    \b
    quantkit plan models/mistral-nano --preset w4a16-g128 --method gptq
    quantkit plan models/mistral-nano --type Q4_K_M --json
    quantkit plan models/mistral-nano --preset w4a16-g32 --override 're:.*down_proj=w8a16' --override '-:.*layers\\.0\\..*'
    """
    from quantkit.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model)
    if method in ("gptq", "awq") and calib is None:
        calib = "builtin"
    _print_plan(make_plan(ckpt, preset, method, formats, gguf_type, overrides, act_order, calib, calib_samples,
                          calib_seqlen, device), as_json)
