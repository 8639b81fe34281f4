"""`quantkit quantize MODEL -o OUT`: plan, calibrate, quantize layer by layer, write every requested format."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.commands._plan_options import model_options
from quantkit.commands._types import COUNT, SIZE, FiniteFloatRange
from quantkit.pipeline.allocate import ACTIVATION_ROUNDINGS
from quantkit.quant.head_hessian import CLUSTERS as HEAD_CLUSTERS


@click.command("quantize", short_help="Quantize to GPTQ/AWQ/compressed-tensors/GGUF.")
@model_options
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="Output directory (GGUF: file). With several formats, a directory holding one output per format.")
@click.option("--damp", default=0.1, show_default=True, type=FiniteFloatRange(0, 1, min_open=True),
              help="GPTQ damping, fraction of mean(diag H) (0.1 with --group-aware measured best; README).")
@click.option("--block-size", default=128, show_default=True, type=COUNT, help="GPTQ lazy-batch block size.")
@click.option("--group-aware/--no-group-aware", default=True, show_default=True,
              help="GPTQ without --act-order: quantize the groups in order of importance (largest Hessian "
              "diagonal), each group's columns too (GPTQModel's act_group_aware). Groups stay contiguous: no "
              "g_idx, every kernel runs the output.")
@click.option("--head-clusters", default=HEAD_CLUSTERS, show_default=True, type=COUNT,
              help="GPTQ of a quantized lm_head (GGUF): group its rows into this many clusters and round each "
              "against the KL divergence's Hessian of its contexts (the contexts weighted by the probability of "
              "the cluster's tokens) instead of one Hessian for every row; 1: the shared input Hessian. Collecting "
              "the Hessians costs this many times the products of one.")
@click.option("--refine-sweeps", default=0, show_default=True, type=click.IntRange(0, 100),
              help="GPTQ: after the solve, revisit every weight up to this many times and move it one code up or "
              "down when that lowers GPTQ's loss (coordinate descent, group scales fixed). 0 gives GPTQModel's "
              "result; 2 took lm_head's KL divergence 5-6% lower on held-out text (mistral-nano).")
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto",
              show_default=True,
              help="GPTQ: dtype of the calibration forward passes and Hessian products; AWQ: of its scale search's "
              "forward passes. auto: bfloat16 when the model's linear weights are bf16 (as GPTQModel runs it; 4-5x "
              "faster on CPUs with AMX/AVX512-BF16), else float32.")
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
@click.option("--target-bpw", type=FiniteFloatRange(1, 32), default=None,
              help="GGUF: choose every tensor's type by measurement so that the file holds this many bits per "
              "weight (instead of --type): each tensor's KL divergence in each candidate type is measured on "
              "calibration text (with --method gptq, GPTQ-rounded as the run writes it), and the assignment with "
              "the least predicted KLD that fits is written.")
@click.option("--target-size", type=SIZE, default=None,
              help="GGUF: as --target-bpw, with the budget as tensor bytes (e.g. 3.9GB).")
@click.option("--candidates", default=None, metavar="TYPES",
              help="Types the allocation chooses from, comma-separated (default IQ1_M,IQ2_XXS,IQ2_S,Q2_K,IQ3_XXS,"
              "IQ3_S,Q3_K,IQ4_XS,IQ4_NL,Q4_K,Q4_1,Q5_0,Q5_K,Q5_1,Q6_K,Q8_0; IQ1_M and IQ2_XXS only for tensors with "
              "an imatrix entry, or, with --method gptq, a Hessian).")
@click.option("--activation-rounding", type=click.Choice(ACTIVATION_ROUNDINGS), default="llama.cpp-cpu",
              show_default=True,
              help="GGUF allocation: how each product is measured. llama.cpp-cpu: as llama.cpp's CPU backend "
              "computes it, the input rounded to the weight type's dot-product type first (blocks of 256 for the "
              "k- and i-quants, of 32 for Q4_0..Q8_0 and IQ4_NL), so the choice and the prediction count that "
              "rounding; none: exact float products (backends that dequantize and multiply in float).")
@click.option("--sensitivity", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File that caches the measured sensitivities (default: under ~/.cache/quantkit/sensitivity, "
              "keyed by model, tokens, imatrix and GPTQ options; with --method gptq the embedding's Fisher matrix "
              "is kept beside it); several budgets reuse one measurement.")
@click.option("--sensitivity-samples", default=16, show_default=True, type=COUNT,
              help="Calibration windows the sensitivities are measured on.")
@click.option("--sensitivity-seqlen", default=256, show_default=True, type=click.IntRange(min=2),
              help="Tokens per sensitivity window.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--dry-run", is_flag=True, help="Print the plan (targets, sizes, BPW, memory) and stop.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(model, preset, method, formats, gguf_type, overrides, act_order, calib, calib_samples, calib_seqlen,
            seed, device, as_json, output, damp, block_size, group_aware, head_clusters, refine_sweeps, compute_dtype,
            imatrix_in, imatrix_out, shard_size, work_dir, resume, target_bpw, target_size, candidates,
            activation_rounding, sensitivity, sensitivity_samples, sensitivity_seqlen, force, dry_run, no_progress):
    """Quantize MODEL layer by layer (only one decoder layer in memory) and write the requested format(s).

    \b
    quantkit quantize models/mistral-nano --preset w4a16-g128 --method gptq -o out/nano-gptq
    quantkit quantize models/mistral-nano --method awq --preset w4a16-g128-asym --format awq -o out/nano-awq
    quantkit quantize models/mistral-nano --format gguf --type Q4_K_M --calib builtin -o out/nano-Q4_K_M.gguf
    quantkit quantize models/mistral-nano --format gptq,compressed-tensors -o out/nano-w4   # out/nano-w4/{gptq,...}
    quantkit quantize models/mistral-nano --format gguf --target-bpw 4.5 -o out/nano-4.5bpw.gguf
    """
    from quantkit import api

    plan_args = dict(method=method, preset=preset, formats=formats, gguf_type=gguf_type, overrides=overrides,
                     act_order=act_order, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                     device=device)
    targeted = target_bpw is not None or target_size is not None
    if dry_run and targeted:
        raise click.UsageError("--dry-run shows a plan before any work; a --target-bpw/--target-size allocation "
                               "needs its measurement first (run without --dry-run)")
    if dry_run:
        plan = api.plan(model, **plan_args, imatrix=imatrix_in)
        click.echo(json.dumps(plan.to_dict()) if as_json else plan.render())
        return
    if output is None:
        raise click.UsageError("missing -o/--output (or use --dry-run)")
    result = api.quantize(model, output, **plan_args, seed=seed, damp=damp, block_size=block_size,
                          group_aware=group_aware, head_clusters=head_clusters, refine_sweeps=refine_sweeps,
                          compute_dtype=compute_dtype, imatrix=imatrix_in,
                          imatrix_out=imatrix_out, shard_size=shard_size, work_dir=work_dir, resume=resume, force=force,
                          progress=not (no_progress or as_json), log=lambda m: click.echo(m, err=True),
                          target_bpw=target_bpw, target_size=target_size, candidates=candidates,
                          sensitivity=sensitivity, sensitivity_samples=sensitivity_samples,
                          sensitivity_seqlen=sensitivity_seqlen, activation_rounding=activation_rounding)
    click.echo(json.dumps(result.to_dict()) if as_json else result.render())
