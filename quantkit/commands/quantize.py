"""`quantkit quantize MODEL -o OUT`: plan, calibrate, quantize layer by layer, write every requested format."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.commands._plan_options import model_options
from quantkit.commands._types import COUNT, SIZE, FiniteFloatRange


@click.command("quantize", short_help="Quantize to GPTQ/AWQ/compressed-tensors/GGUF.")
@model_options
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="Output directory (GGUF: file). With several formats, a directory holding one output per format.")
@click.option("--damp", default=0.01, show_default=True, type=FiniteFloatRange(0, 1, min_open=True),
              help="GPTQ damping, fraction of mean(diag H).")
@click.option("--block-size", default=128, show_default=True, type=COUNT, help="GPTQ lazy-batch block size.")
@click.option("--imatrix", "imatrix_in", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="GGUF: use this importance matrix (llama.cpp imatrix file, e.g. from `quantkit imatrix`).")
@click.option("--imatrix-out", type=click.Path(path_type=Path), default=None,
              help="Also save the collected importance matrix (llama.cpp imatrix GGUF) to this file.")
@click.option("--shard-size", default="5GB", show_default=True, type=SIZE,
              help="Largest safetensors shard of the HF-layout outputs (gptq, awq, compressed-tensors), e.g. 2GB.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Per-layer checkpoints for resuming (default: OUT.partial beside the output).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue an interrupted run with the same arguments from its last completed layer.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--dry-run", is_flag=True, help="Print the plan (targets, sizes, BPW, memory) and stop.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(model, preset, method, formats, gguf_type, overrides, act_order, calib, calib_samples, calib_seqlen,
            seed, device, as_json, output, damp, block_size, imatrix_in, imatrix_out, shard_size, work_dir, resume,
            force, dry_run,
            no_progress):
    """Quantize MODEL layer by layer (only one decoder layer in memory) and write the requested format(s).

    \b
    quantkit quantize models/mistral-nano --preset w4a16-g128 --method gptq -o out/nano-gptq
    quantkit quantize models/mistral-nano --method awq --preset w4a16-g128-asym --format awq -o out/nano-awq
    quantkit quantize models/mistral-nano --format gguf --type Q4_K_M --calib builtin -o out/nano-Q4_K_M.gguf
    quantkit quantize models/mistral-nano --format gptq,compressed-tensors -o out/nano-w4   # out/nano-w4/{gptq,...}
    """
    from quantkit import api

    plan_args = dict(method=method, preset=preset, formats=formats, gguf_type=gguf_type, overrides=overrides,
                     act_order=act_order, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                     device=device)
    if dry_run:
        plan = api.plan(model, **plan_args, imatrix=imatrix_in)
        click.echo(json.dumps(plan.to_dict()) if as_json else plan.render())
        return
    if output is None:
        raise click.UsageError("missing -o/--output (or use --dry-run)")
    result = api.quantize(model, output, **plan_args, seed=seed, damp=damp, block_size=block_size, imatrix=imatrix_in,
                          imatrix_out=imatrix_out, shard_size=shard_size, work_dir=work_dir, resume=resume, force=force,
                          progress=not (no_progress or as_json), log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(result.to_dict()) if as_json else result.render())
