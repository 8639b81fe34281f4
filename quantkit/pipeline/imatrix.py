"""llama.cpp's importance matrix, collected by quantkit's calibration pipeline (the library behind `quantkit imatrix`).

Σx² per input column of every decoder linear (and the number of activation rows), gathered layer by layer with
the full-precision model, written in llama.cpp's GGUF imatrix format, so the file works with
`llama-quantize --imatrix` as well as `quantkit quantize --imatrix`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantkit.calib.sampling import CalibrationSet
from quantkit.gguf.imatrix import Imatrix
from quantkit.model.checkpoint import Checkpoint


@dataclass
class CollectedImatrix:
    """What `collect_imatrix` gathered: `stats` {canonical linear weight name: (Σx² [in], rows)}, the calibration
    set used, and the same data as an `Imatrix` ready to write."""

    stats: dict[str, tuple[torch.Tensor, Any]]
    calib_set: CalibrationSet
    imatrix: Imatrix

    @property
    def chunks(self) -> int:
        return self.calib_set.n_samples


def collect_imatrix(model: Checkpoint | str | Path, calib: str = "builtin", n_samples: int = 128, seqlen: int = 512,
                    seed: int = 0, device: str = "cpu", progress: bool = False) -> CollectedImatrix:
    """Run the full-precision `model` over `n_samples` calibration windows of `seqlen` tokens from `calib`
    (builtin, a .txt/.jsonl/.parquet file or a directory of them) and accumulate Σx² for every decoder linear.
    `progress`: progress on stderr. Raises QuantkitError when the model has no tokenizer."""
    from quantkit.calib import load_calibration
    from quantkit.errors import QuantkitError
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.model.tokenizer import load_tokenizer
    from quantkit.pipeline.layerwise import PipelineOptions, quantize_model

    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    if ckpt.tokenizer_path is None:
        raise QuantkitError(f"{ckpt.path}: no tokenizer file; calibration needs one")
    calib_set = load_calibration(calib, load_tokenizer(ckpt.tokenizer_path), n_samples, seqlen, seed)
    targets = {name: None for name in ckpt.tensor_names()}
    result = quantize_model(ckpt, targets, [], calib_set.tokens,
                            PipelineOptions(method="rtn", device=device, collect_imatrix=True),
                            work_dir=None, resume=False, progress=progress)
    stats = result.imatrix
    imatrix = Imatrix.from_canonical({n: s for n, (s, _) in stats.items()}, {n: c for n, (_, c) in stats.items()},
                                     datasets=[str(calib_set.identity.get("source", calib))],
                                     chunk_count=calib_set.n_samples, chunk_size=seqlen)
    return CollectedImatrix(stats, calib_set, imatrix)


@dataclass
class ImatrixResult:
    """The imatrix file `make_imatrix` wrote: `to_dict()` is `quantkit imatrix --json`'s object, `render()` its line."""

    output: Path
    entries: int
    chunks: int
    chunk_size: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"command": "imatrix", "status": "ok", "output": str(self.output), "entries": self.entries,
                "chunks": self.chunks, "chunk_size": self.chunk_size, "seconds": self.seconds}

    def render(self) -> str:
        return (f"wrote {self.output}: {self.entries} entries from {self.chunks} windows of "
                f"{self.chunk_size} tokens ({self.seconds} s)")


def make_imatrix(model: str | Path, output: str | Path, *, calib: str = "builtin", n_samples: int = 128,
                 seqlen: int = 512, seed: int = 0, device: str = "cpu", force: bool = False,
                 progress: bool = False) -> ImatrixResult:
    """Collect the importance matrix of `model` (see `collect_imatrix`) and write it to `output` in llama.cpp's GGUF
    imatrix format. Raises OutputExistsError before any work when `output` exists and not `force`."""
    from quantkit.gguf.imatrix import write_imatrix
    from quantkit.io import check_disjoint, check_output_path
    from quantkit.model.checkpoint import open_checkpoint

    t0 = time.perf_counter()
    check_output_path(output, force)
    ckpt = open_checkpoint(model)
    check_disjoint({"output": output}, {"model": ckpt.path, "--calib": calib})
    collected = collect_imatrix(ckpt, calib, n_samples, seqlen, seed, device, progress)
    path = write_imatrix(output, collected.imatrix, force=force)
    return ImatrixResult(Path(path), len(collected.imatrix.entries), collected.chunks, seqlen,
                         round(time.perf_counter() - t0, 2))
