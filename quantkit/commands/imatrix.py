"""`quantkit imatrix MODEL --calib DATA -o imatrix.gguf`: collect llama.cpp's importance matrix.

Σx² per input column of every decoder linear (and the number of activation rows), gathered layer by layer with
the full-precision model by quantkit's calibration pipeline, written in llama.cpp's GGUF imatrix format, so the
file works with `llama-quantize --imatrix` as well as `quantkit quantize --imatrix`. The work is
`quantkit.pipeline.imatrix.make_imatrix`; this module parses options and renders.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.commands._types import COUNT, DEVICE, SEED


@click.command("imatrix", short_help="Collect a llama.cpp importance matrix.")
@click.argument("model")
@click.option("--calib", default="builtin", show_default=True,
              help="Calibration data: builtin, a .txt/.jsonl/.parquet file or a directory of them.")
@click.option("--calib-samples", default=128, show_default=True, type=COUNT, help="Calibration windows.")
@click.option("--calib-seqlen", default=512, show_default=True, type=click.IntRange(min=2), help="Tokens per window.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the window sampling.")
@click.option("--device", default="cpu", show_default=True, type=DEVICE, help="cpu or cuda[:N].")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="imatrix GGUF file to write.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(model, calib, calib_samples, calib_seqlen, seed, device, output, force, as_json, no_progress):
    """Collect an importance matrix (llama.cpp's GGUF imatrix format) for MODEL from calibration text.

    \b
    quantkit imatrix models/mistral-nano --calib calib/prose.txt -o nano.imatrix.gguf
    quantkit quantize models/mistral-nano --type Q4_K_M --imatrix nano.imatrix.gguf -o nano-Q4_K_M.gguf
    llama-quantize --imatrix nano.imatrix.gguf nano-F32.gguf nano-Q4_K_M.gguf Q4_K_M
    """
    from quantkit.pipeline.imatrix import make_imatrix

    result = make_imatrix(model, output, calib=calib, n_samples=calib_samples, seqlen=calib_seqlen, seed=seed,
                          device=device, force=force, progress=not (no_progress or as_json))
    click.echo(json.dumps(result.to_dict()) if as_json else result.render())
