"""`quantkit convert SRC -o OUT --format hf|consolidated|gguf [--dtype bf16|f16|f32] [--shard-size 5GB]`.

Unquantized conversion: re-shard and re-type safetensors, switch between the Hugging Face and mistral-inference
(consolidated) layouts, or write a GGUF file. The converters live in `quantkit.pipeline.convert` (`CONVERTERS`);
this module parses options and prints the written path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from quantkit.commands._types import SIZE
from quantkit.pipeline.convert import CONVERTERS


@click.command("convert", short_help="Re-shard, re-type or convert to GGUF.")
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory (gguf: file).")
@click.option("--format", "fmt", required=True, type=click.Choice(sorted(CONVERTERS)),
              help="hf: Hugging Face safetensors (+index); consolidated: mistral-inference layout.")
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default=None,
              help="Output float type (default: the source's).")
@click.option("--shard-size", default="5GB", show_default=True, type=SIZE,
              help="Largest shard (hf layout), e.g. 5GB, 500MB.")
@click.option("--type", "gguf_type", default=None,
              help="gguf: file type BF16, F16, F32 or Q8_0 (any llama-quantize type works; default BF16 or --dtype).")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="gguf: llama.cpp importance matrix for the quantized types.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(src, out, fmt, dtype, shard_size, gguf_type, imatrix, force, no_progress):
    """Convert a full-precision checkpoint SRC to another layout, float type or shard size.

    \b
    quantkit convert models/mistral-nano -o out/nano-consolidated --format consolidated
    quantkit convert out/nano-consolidated -o out/nano-f32 --format hf --dtype f32 --shard-size 2MB
    quantkit convert models/mistral-nano -o out/nano-BF16.gguf --format gguf --type BF16
    """
    from quantkit.pipeline.convert import convert

    if fmt != "gguf" and (gguf_type or imatrix):
        raise click.UsageError("--type and --imatrix apply to --format gguf only")
    command_line = "quantkit convert " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None
    path = convert(src, out, fmt, dtype=dtype, shard_size=shard_size, gguf_type=gguf_type, imatrix=imatrix,
                   force=force, progress=not no_progress, command_line=command_line)
    click.echo(str(path))
