"""One calibration, many formats: hand the same tensor stream to several writers at once.

    writer = open_writers(["gptq", "compressed-tensors"], {"gptq": out1, "compressed-tensors": out2}, ...)
    for name, tensor in pipeline: writer.add(name, tensor)
    writer.finish()

Every format checks every scheme before anything is written; if one writer fails, all are aborted. A writer that
finished before another failed has already renamed its output into place, so `quantize_checkpoint` points the
writers into one staging directory and moves the outputs out of it only when all of them are complete: every
requested output appears, or none does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.formats.base import StoredTensor, WriteOptions, Writer, get_format
from quantkit.model.config import ModelConfig
from quantkit.quant.scheme import Scheme


class FanOutWriter:
    def __init__(self, writers: dict[str, Writer]):
        self.writers = writers

    def add(self, name: str, tensor: StoredTensor) -> None:
        try:
            for w in self.writers.values():
                w.add(name, tensor)
        except BaseException:
            self.abort()
            raise

    def finish(self) -> dict[str, Path]:
        done: dict[str, Path] = {}
        try:
            for key, w in self.writers.items():
                done[key] = w.finish()
        except BaseException:
            self.abort()
            raise
        return done

    def abort(self) -> None:
        for w in self.writers.values():
            try:
                w.abort()
            except Exception:
                pass


def open_writers(formats: list[str], outs: dict[str, Path], source_dir: Path | None, config: ModelConfig,
                 schemes: dict[str, Any], options: WriteOptions) -> FanOutWriter:
    fmts = [get_format(f) for f in formats]
    for fmt in fmts:  # refuse before creating anything
        for scheme in (schemes or {}).values():
            if isinstance(scheme, Scheme):
                fmt.check_scheme(scheme)
    writers: dict[str, Writer] = {}
    try:
        for fmt in fmts:
            writers[fmt.name] = fmt.open_writer(Path(outs[fmt.name]), source_dir, config, schemes, options)
    except BaseException:
        FanOutWriter(writers).abort()
        raise
    return FanOutWriter(writers)
