"""The resume work directory of one layer-wise run.

    .quantkit-work          marker: quantkit created this directory (nothing else is ever cleared)
    state.json              fingerprint of the run + number of completed layers (written last, atomically)
    embed.safetensors       the finished embedding tensor
    acts.safetensors        the calibration activations entering the next layer
    layer-NNNNN.safetensors the finished tensors of layer N, its imatrix rows and its log rows

A run with the same fingerprint continues after the last completed layer and replays the finished tensors, so
its output is byte-identical to an uninterrupted run; any other content is cleared.

The directory outlives a failed run only when a resume can use it: it holds completed layers and the run was
interrupted (Ctrl-C, SIGTERM, SIGKILL) or stopped by a fault that can go away (disk full, a file-size limit, a
permission, memory). After any other error (bad input, a non-finite weight, ...) the directory this run started is
removed (`discard`); one made by an earlier run is left as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from quantkit import __version__
from quantkit.errors import OutputExistsError
from quantkit.formats.dump import load_tensors, save_tensors
from quantkit.io import remove_temp

WORK_VERSION = 1
MARKER = ".quantkit-work"  # written first into every work dir: only such a directory is ever cleared
IMATRIX_PREFIX = "imatrix::"
COMPANION_PREFIX = "companion::"  # a tensor's version for the companion writer (GGUF beside integer formats)

Imatrix = dict[str, tuple[torch.Tensor, int]]  # module weight name -> (Σ x² per input column, token count)
Named = tuple[str, Any, Any]  # (name, finished tensor, its companion version or None)


def _flatten(named: list[Named]) -> list[tuple[str, Any]]:
    """(name, tensor, companion) triples as the stored (name, tensor) list: companions under COMPANION_PREFIX."""
    out = [(n, t) for n, t, _ in named]
    return out + [(COMPANION_PREFIX + n, c) for n, _, c in named if c is not None]


def _pair_up(stored: list[tuple[str, Any]]) -> list[Named]:
    companions = {n[len(COMPANION_PREFIX):]: t for n, t in stored if n.startswith(COMPANION_PREFIX)}
    return [(n, t, companions.get(n)) for n, t in stored if not n.startswith(COMPANION_PREFIX)]


class WorkDir:
    def __init__(self, path: str | Path, fingerprint: str, num_layers: int):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.fresh = False  # this run started the directory from scratch: everything in it is this run's
        self._owns_dir = False  # ... and the directory itself (it did not exist, or was a quantkit work dir)

    def start(self, resume: bool) -> int:
        """Completed layers to continue after (0: a fresh run). An earlier quantkit work dir of another run is
        cleared; anything else that is not empty is refused, never deleted."""
        state = self._state()
        if resume and state.get("fingerprint") == self.fingerprint:
            return int(state.get("completed_layers", 0))
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"work dir {self.path} exists and is not a directory; choose another --work-dir")
        ours = (self.path / MARKER).is_file() or "fingerprint" in state
        if self.path.is_dir() and any(self.path.iterdir()):
            if not ours:
                raise OutputExistsError(f"work dir {self.path} is not empty and is not a quantkit work directory "
                                        f"(no {MARKER}); refusing to delete it: choose another --work-dir")
            shutil.rmtree(self.path)
        self.fresh, self._owns_dir = True, ours or not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKER).write_text("quantkit work directory: deleted when the run completes\n")
        self.mark_completed(0)
        return 0

    def completed(self) -> int:
        """Layers a run with this fingerprint would not redo (0: nothing worth keeping)."""
        state = self._state()
        return int(state.get("completed_layers", 0)) if state.get("fingerprint") == self.fingerprint else 0

    def discard(self) -> None:
        """Remove what this run created (only a directory it started from scratch; a user's empty directory given
        as --work-dir is emptied, not removed)."""
        if not self.fresh:
            return
        if self._owns_dir:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.path.is_dir():
            for p in self.path.iterdir():
                remove_temp(p)
        self.fresh = False

    def _state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.path / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def mark_completed(self, layers: int) -> None:
        tmp = self.path / ".state.json.tmp"
        try:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "completed_layers": layers,
                                       "num_layers": self.num_layers, "version": __version__}, indent=2))
            tmp.replace(self.path / "state.json")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def save_embedding(self, named: list[Named]) -> None:
        save_tensors(self.path / "embed.safetensors", _flatten(named))

    def load_embedding(self) -> list[Named]:
        return _pair_up(load_tensors(self.path / "embed.safetensors")[0])

    def save_activations(self, acts: torch.Tensor) -> None:
        save_tensors(self.path / "acts.safetensors", [], extra={"acts": acts})

    def load_activations(self) -> torch.Tensor:
        return load_tensors(self.path / "acts.safetensors")[1]["acts"]

    def _layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def save_layer(self, i: int, named: list[Named], imatrix: Imatrix, log: list[dict]) -> None:
        extra = {IMATRIX_PREFIX + n: s for n, (s, _) in imatrix.items()}
        counts = {n: c for n, (_, c) in imatrix.items()}
        save_tensors(self._layer_file(i), _flatten(named), extra=extra, info={"log": log, "imatrix_counts": counts})

    def load_layer(self, i: int) -> tuple[list[Named], Imatrix, list[dict]]:
        named, extra, info = load_tensors(self._layer_file(i))
        counts = info.get("imatrix_counts", {})
        # copies: the imatrix outlives the layer's tensors, and a view would keep the whole file mapped and resident
        imatrix = {k[len(IMATRIX_PREFIX):]: (v.clone(), int(counts.get(k[len(IMATRIX_PREFIX):], 0)))
                   for k, v in extra.items() if k.startswith(IMATRIX_PREFIX)}
        return _pair_up(named), imatrix, info.get("log", [])

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
