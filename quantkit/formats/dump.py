"""A lossless safetensors serialization of StoredTensors (QuantTensor / GGMLTensor / float tensor).

Used for the pipeline's per-layer resume checkpoints, and as a plain debugging sink (`DumpWriter`, CLI
`--format dump`): every field of a QuantTensor is stored as-is (`NAME::codes`, `::scales`, `::zeros`, `::g_idx`),
ggml blocks as their raw bytes (`NAME::ggml`), float tensors under their own name; the per-tensor facts (bits,
group size, type, error report) and the order go into the safetensors metadata as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.errors import FormatError
from quantkit.formats.base import register
from quantkit.io import read_json_object
from quantkit.tensors import GGMLTensor, QuantTensor

META_KEY = "quantkit.dump"


def flatten(name: str, tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One StoredTensor -> (safetensors entries, JSON facts)."""
    if isinstance(tensor, QuantTensor):
        flat = {f"{name}::codes": tensor.codes, f"{name}::scales": tensor.scales, f"{name}::zeros": tensor.zeros}
        if tensor.g_idx is not None:
            flat[f"{name}::g_idx"] = tensor.g_idx
        meta = {"kind": "quant", "bits": tensor.bits, "group_size": tensor.group_size, "symmetric": tensor.symmetric,
                "error": tensor.error}
    elif isinstance(tensor, GGMLTensor):
        data = torch.from_numpy(np.ascontiguousarray(tensor.data))
        flat = {f"{name}::ggml": data}
        meta = {"kind": "ggml", "type_name": tensor.type_name, "shape": list(tensor.shape), "error": tensor.error}
    elif isinstance(tensor, torch.Tensor):
        flat = {name: tensor}
        meta = {"kind": "float"}
    else:
        raise TypeError(f"{name}: cannot serialize {type(tensor).__name__}")
    return {k: v.detach().cpu().contiguous() for k, v in flat.items()}, meta


def unflatten(name: str, meta: dict[str, Any], get) -> Any:
    kind = meta["kind"]
    if kind == "float":
        return get(name)
    if kind == "quant":
        g_key = f"{name}::g_idx"
        return QuantTensor(codes=get(f"{name}::codes"), scales=get(f"{name}::scales"), zeros=get(f"{name}::zeros"),
                           bits=meta["bits"], group_size=meta["group_size"], symmetric=meta["symmetric"],
                           g_idx=get(g_key) if meta.get("has_g_idx") else None, error=meta.get("error", {}))
    if kind == "ggml":
        data = get(f"{name}::ggml").numpy()
        return GGMLTensor(type_name=meta["type_name"], shape=tuple(meta["shape"]), data=data,
                          error=meta.get("error", {}))
    raise FormatError(f"{name}: unknown dump entry kind {kind!r}")


def save_tensors(path: str | Path, named: Iterable[tuple[str, Any]], extra: dict[str, torch.Tensor] | None = None,
                 info: dict[str, Any] | None = None) -> None:
    """Write StoredTensors (in order) to one safetensors file; atomic (temp file + rename)."""
    path = Path(path)
    flat: dict[str, torch.Tensor] = {}
    order = []
    for name, tensor in named:
        entries, meta = flatten(name, tensor)
        meta["has_g_idx"] = f"{name}::g_idx" in entries
        flat.update(entries)
        order.append([name, meta])
    for k, v in (extra or {}).items():
        flat[f"extra::{k}"] = v.detach().cpu().contiguous()
    seen: set[int] = set()
    for k, v in flat.items():  # safetensors refuses tensors sharing memory (e.g. one imatrix for q/k/v)
        if v.numel() and v.data_ptr() in seen:
            flat[k] = v.clone()
        seen.add(flat[k].data_ptr())
    from quantkit.io import remove_stale_temporaries

    remove_stale_temporaries(path)  # what a killed run left for this name
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps({"order": order, "info": info or {}})})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path) -> tuple[list[tuple[str, Any]], dict[str, torch.Tensor], dict[str, Any]]:
    """-> (ordered StoredTensors, extra tensors, info) as written by `save_tensors`. The tensors are views of the
    file's memory mapping, which stays mapped (with every page read) while any of them lives: copy what is kept."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise FormatError(f"{path}: not a readable quantkit dump ({type(e).__name__}: {e})") from None
    named = [(name, unflatten(name, m, tensors.__getitem__)) for name, m in meta["order"]]
    extra = {k[len("extra::"):]: v for k, v in tensors.items() if k.startswith("extra::")}
    return named, extra, meta.get("info", {})


class DumpWriter:
    """Writer-protocol sink: one `tensors-NNNNN.safetensors` dump per ~max_shard_bytes, atomically renamed."""

    def __init__(self, out: str | Path, force: bool = False, max_shard_bytes: int = 1 << 30,
                 provenance: dict[str, Any] | None = None):
        from quantkit.io import check_output_path, temp_dir_beside

        self.out = check_output_path(out, force)
        self.tmp = temp_dir_beside(self.out)
        self.max_shard_bytes = max_shard_bytes
        self.provenance = provenance or {}
        self._pending: list[tuple[str, Any]] = []
        self._pending_bytes = 0
        self._files: list[str] = []

    def add(self, name: str, tensor) -> None:
        entries, _ = flatten(name, tensor)
        self._pending.append((name, tensor))
        self._pending_bytes += sum(t.numel() * t.element_size() for t in entries.values())
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            fname = f"tensors-{len(self._files):05d}.safetensors"
            save_tensors(self.tmp / fname, self._pending)
            self._files.append(fname)
            self._pending, self._pending_bytes = [], 0

    def finish(self) -> Path:
        from quantkit.io import move_into_place, write_json

        self._flush()
        write_json(self.tmp / "dump.json", {"format": "quantkit-dump", "files": self._files,
                                            "provenance": self.provenance})
        move_into_place(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        from quantkit.io import remove_temp

        remove_temp(self.tmp)


def read_dump(path: str | Path) -> list[tuple[str, Any]]:
    """All tensors of a DumpWriter output, in the order they were added."""
    path = Path(path)
    files = read_json_object(path / "dump.json", FormatError).get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and Path(f).name == f for f in files):
        raise FormatError(f"{path / 'dump.json'}: 'files' must list the file names of the dump")
    out: list[tuple[str, Any]] = []
    for fname in files:
        out += load_tensors(path / fname)[0]
    return out


class DumpFormat:
    """`--format dump`: every StoredTensor as-is (a debugging sink; read back with `read_dump`)."""

    name = "dump"

    def check_scheme(self, scheme) -> None:
        """A dump holds any scheme exactly."""

    def stored_nbytes(self, target, shape: tuple[int, ...], float_bytes: int) -> int:
        numel = 1
        for d in shape:
            numel *= d
        if target is None:
            return numel * float_bytes
        if isinstance(target, str):
            from quantkit.ggml_types import tensor_nbytes

            return tensor_nbytes(shape, target)
        groups = shape[0] * target.groups_for(shape[-1])
        return numel + groups * (4 if target.scale_dtype == "float32" else 2) + groups * 4  # uint8 codes, int32 zeros

    def open_writer(self, out: Path, source_dir, config, schemes, options) -> DumpWriter:
        return DumpWriter(out, force=options.force, provenance=options.provenance)

    def detect(self, path: Path) -> bool:
        return False  # a dump is not a model checkpoint

    def read(self, path: Path):
        raise FormatError(f"{path}: a quantkit dump is read with quantkit.formats.dump.read_dump, not as a model")


register(DumpFormat())
