"""`quantkit convert SRC -o OUT --format hf|consolidated [--dtype bf16|f16|f32] [--shard-size 5GB]`.

Unquantized conversion: re-shard and re-type safetensors, and switch between the Hugging Face and
mistral-inference (consolidated) layouts. Each `--format` maps to a converter function in `CONVERTERS`; a new
target (e.g. gguf) adds one entry and one choice.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click

from quantkit.io import parse_size


def convert_float(fmt: str, src: str, out: Path, dtype: str | None, shard_size: str, force: bool,
                  progress: bool, **_) -> Path:
    """Float source -> float output in layout `fmt` ("hf" or "consolidated"), tensor by tensor."""
    from tqdm import tqdm

    from quantkit.formats.base import WriteOptions, get_format
    from quantkit.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    options = WriteOptions(force=force, max_shard_bytes=parse_size(shard_size), extra={"dtype": dtype},
                           provenance={"command": "quantkit convert " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None,
                                       "source": {"fingerprint": ckpt.fingerprint(), "layout": ckpt.layout}})
    writer = get_format(fmt).open_writer(out, ckpt.path, ckpt.config, {}, options)
    try:
        names = ckpt.tensor_names()
        for name in tqdm(names, desc=f"convert -> {fmt}", unit="tensor", disable=not progress, file=sys.stderr):
            writer.add(name, ckpt.get_tensor(name))
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def convert_gguf(fmt: str, src: str, out: Path, dtype: str | None, shard_size: str, force: bool, progress: bool,
                 gguf_type: str | None = None, imatrix: Path | None = None, **_) -> Path:
    """Float source -> one GGUF file (--type F32/F16/BF16/Q8_0, or any llama-quantize mix), streamed per tensor."""
    from quantkit.gguf.convert import convert_to_gguf

    type_name = gguf_type or {"f32": "F32", "f16": "F16", "bf16": "BF16"}.get(dtype or "", "BF16")
    return Path(convert_to_gguf(src, out, type_name, imatrix=imatrix, force=force, progress=progress)["output"])


# --format value -> converter(fmt, src, out, dtype, shard_size, force, progress, **options) -> output path
CONVERTERS: dict[str, Callable[..., Path]] = {
    "hf": convert_float,
    "consolidated": convert_float,
    "gguf": convert_gguf,
}


@click.command("convert")
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output directory (gguf: file).")
@click.option("--format", "fmt", required=True, type=click.Choice(sorted(CONVERTERS)),
              help="hf: Hugging Face safetensors (+index); consolidated: mistral-inference layout.")
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default=None,
              help="Output float type (default: the source's).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard (hf layout), e.g. 5GB, 500MB.")
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
    if fmt != "gguf" and (gguf_type or imatrix):
        raise click.UsageError("--type and --imatrix apply to --format gguf only")
    path = CONVERTERS[fmt](fmt, src, out, dtype=dtype, shard_size=shard_size, force=force,
                           progress=not no_progress and sys.stderr.isatty(), gguf_type=gguf_type, imatrix=imatrix)
    click.echo(str(path))
