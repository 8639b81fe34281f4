"""`quantkit plan MODEL`: every tensor's target, output size, BPW and the peak-memory estimate (no work done)."""

from __future__ import annotations

import json

import click

from quantkit.commands._plan_options import model_options


@click.command("plan", short_help="Preview quantize: targets, sizes, BPW, RAM.")
@model_options
def command(model, preset, method, formats, gguf_type, overrides, act_order, calib, calib_samples, calib_seqlen,
            seed, device, as_json):
    """Show what `quantize` would do with the same options: targets, sizes, bits per weight, peak RAM/VRAM.

    \b
    quantkit plan models/mistral-nano --preset w4a16-g128 --method gptq
    quantkit plan models/mistral-nano --type Q4_K_M --json
    quantkit plan models/mistral-nano --preset w4a16-g32 --override 're:.*down_proj=w8a16' --override '-:.*layers\\.0\\..*'
    """  # noqa: E501 (a literal example command line shown in --help)
    from quantkit import api

    plan = api.plan(model, method=method, preset=preset, formats=formats, gguf_type=gguf_type, overrides=overrides,
                    act_order=act_order, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                    device=device)
    click.echo(json.dumps(plan.to_dict()) if as_json else plan.render())
