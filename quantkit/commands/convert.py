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


# --format value -> converter(fmt, src, out, dtype, shard_size, force, progress, **options) -> output path
CONVERTERS: dict[str, Callable[..., Path]] = {
    "hf": convert_float,
    "consolidated": convert_float,
}


@click.command("convert")
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--format", "fmt", required=True, type=click.Choice(sorted(CONVERTERS)),
              help="hf: Hugging Face safetensors (+index); consolidated: mistral-inference layout.")
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default=None,
              help="Output float type (default: the source's).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard (hf layout), e.g. 5GB, 500MB.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(src, out, fmt, dtype, shard_size, force, no_progress):
    """Convert a full-precision checkpoint SRC to another layout, float type or shard size.

    \b
    quantkit convert models/mistral-nano -o out/nano-consolidated --format consolidated
    quantkit convert out/nano-consolidated -o out/nano-f32 --format hf --dtype f32 --shard-size 2MB
    """
    path = CONVERTERS[fmt](fmt, src, out, dtype=dtype, shard_size=shard_size, force=force,
                           progress=not no_progress and sys.stderr.isatty())
    click.echo(str(path))
