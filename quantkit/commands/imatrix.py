"""`quantkit imatrix MODEL --calib DATA -o imatrix.gguf`: collect llama.cpp's importance matrix.

Σx² per input column of every decoder linear (and the number of activation rows), gathered layer by layer with
the full-precision model by quantkit's calibration pipeline, written in llama.cpp's GGUF imatrix format, so the
file works with `llama-quantize --imatrix` as well as `quantkit quantize --imatrix`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


def collect_imatrix(ckpt, calib: str, n_samples: int, seqlen: int, seed: int, device: str = "cpu",
                    progress: bool = True):
    """{canonical linear weight name: (Σx² [in], rows)} and the calibration set used."""
    from quantkit.calib import load_calibration
    from quantkit.errors import QuantkitError
    from quantkit.model.tokenizer import load_tokenizer
    from quantkit.quant.pipeline import PipelineOptions, quantize_model

    if ckpt.tokenizer_path is None:
        raise QuantkitError(f"{ckpt.path}: no tokenizer file; calibration needs one")
    calib_set = load_calibration(calib, load_tokenizer(ckpt.tokenizer_path), n_samples, seqlen, seed)
    targets = {name: None for name in ckpt.tensor_names()}
    result = quantize_model(ckpt, targets, [], calib_set.tokens,
                            PipelineOptions(method="rtn", device=device, collect_imatrix=True),
                            work_dir=None, resume=False, progress=progress)
    return result.imatrix, calib_set


@click.command("imatrix")
@click.argument("model")
@click.option("--calib", default="builtin", show_default=True,
              help="Calibration data: builtin, a .txt/.jsonl/.parquet file or a directory of them.")
@click.option("--calib-samples", default=128, show_default=True, type=int, help="Calibration windows.")
@click.option("--calib-seqlen", default=512, show_default=True, type=int, help="Tokens per window.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the window sampling.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
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
    from quantkit.gguf.imatrix import Imatrix, write_imatrix
    from quantkit.io import check_output_path
    from quantkit.model.checkpoint import open_checkpoint

    t0 = time.perf_counter()
    check_output_path(output, force)
    ckpt = open_checkpoint(model)
    stats, calib_set = collect_imatrix(ckpt, calib, calib_samples, calib_seqlen, seed, device, not (no_progress or as_json))
    imatrix = Imatrix.from_canonical({n: s for n, (s, _) in stats.items()}, {n: c for n, (_, c) in stats.items()},
                                     datasets=[str(calib_set.identity.get("source", calib))],
                                     chunk_count=calib_set.n_samples, chunk_size=calib_seqlen)
    path = write_imatrix(output, imatrix, force=force)
    result = {"command": "imatrix", "status": "ok", "output": str(path), "entries": len(imatrix.entries),
              "chunks": calib_set.n_samples, "chunk_size": calib_seqlen, "seconds": round(time.perf_counter() - t0, 2)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"wrote {path}: {len(imatrix.entries)} entries from {calib_set.n_samples} windows of "
                   f"{calib_seqlen} tokens ({result['seconds']} s)")
