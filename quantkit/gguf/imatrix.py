"""llama.cpp importance-matrix files: read and write the GGUF format `llama-imatrix` writes, read the legacy `.dat`.

GGUF imatrix (tools/imatrix/imatrix.cpp): KVs `general.type = "imatrix"`, `imatrix.datasets` (string array),
`imatrix.chunk_count`, `imatrix.chunk_size` (u32); per weight two F32 tensors: `<gguf name>.in_sum2` (sum of x^2
per input column, ne = [in_features, n_mat]) and `<gguf name>.counts` (activation rows seen, ne = [1, n_mat]).
Tensor names are GGUF names (`blk.0.attn_q.weight`), sorted. `llama-quantize` weights a column by
`in_sum2 / count` (float32), or 1 where the count is 0 — `Imatrix.importance` computes exactly that.

Legacy `.dat`: int32 n_entries; per entry int32 name_len, name, int32 ncall, int32 nval, float32[nval] values
(= mean x^2 * ncall); then optionally int32 chunk_count, int32 len, dataset name. llama-quantize divides by ncall.

Names: `Imatrix.entries` is keyed by GGUF names; `to_canonical` / `from_canonical` convert with
`quantkit.model.arch` (quantkit's pipeline collects under canonical HF names).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import FormatError
from quantkit.io import atomic_file
from quantkit.model import arch

IN_SUM2 = ".in_sum2"
COUNTS = ".counts"
MAX_LEGACY_NAME = 1 << 16
MAX_LEGACY_VALUES = 1 << 28


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 [n_mat, in_features]: sum of x^2 per input column (per expert)
    counts: np.ndarray  # float32 [n_mat]: number of activation rows accumulated

    def importance(self) -> np.ndarray:
        """float32 [n_mat, in_features] as llama-quantize computes it: sums / count, 1 where count == 0."""
        count = np.round(self.counts.astype(np.float64)).astype(np.float32)  # lround, then (float)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self.sums.astype(np.float32) / count[:, None]
        return np.where(count[:, None] > 0, out, np.float32(1)).astype(np.float32)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)  # GGUF tensor name -> entry
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def importance(self, name: str) -> np.ndarray | None:
        """mean x^2 per input column for a GGUF tensor name ([in_features]; [n_mat, in] for experts), or None."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        imp = entry.importance()
        return imp[0] if imp.shape[0] == 1 else imp

    def to_canonical(self) -> dict[str, torch.Tensor]:
        """{canonical HF name: importance [in_features]} for every entry whose name quantkit knows."""
        out = {}
        for name in self.entries:
            try:
                canonical = arch.from_gguf(name)
            except KeyError:
                continue
            out[canonical] = torch.from_numpy(self.importance(name))
        return out

    @classmethod
    def from_canonical(cls, sums: dict[str, torch.Tensor | np.ndarray], counts: dict[str, int | float],
                       datasets: list[str] | None = None, chunk_count: int = 0, chunk_size: int = 0) -> "Imatrix":
        """From quantkit's accumulators: canonical name -> sum of x^2 per input column, and rows counted."""
        entries = {}
        for name, s in sums.items():
            a = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
            a = a.astype(np.float32).reshape(-1, a.shape[-1])
            c = np.asarray(counts[name], dtype=np.float32).reshape(-1)
            if c.size == 1 and a.shape[0] > 1:
                c = np.repeat(c, a.shape[0])
            entries[arch.to_gguf(name)] = ImatrixEntry(a, c)
        return cls(entries, list(datasets or []), int(chunk_count), int(chunk_size))


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF imatrix (or, when the file is not GGUF, the legacy `.dat` format)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: imatrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    from quantkit.gguf.reader import parse_gguf

    gguf = parse_gguf(path)  # the hardened header parser: every count and offset checked against the file size
    gtype = gguf.kv.get("general.type")
    if gtype is not None and gtype != "imatrix":
        raise FormatError(f"{path}: general.type is {gtype!r}, expected 'imatrix' (is this a model file?)")
    sums, counts = {}, {}
    for t in gguf.tensors.values():
        if t.name.endswith(IN_SUM2):
            sums[t.name[: -len(IN_SUM2)]] = t
        elif t.name.endswith(COUNTS):
            counts[t.name[: -len(COUNTS)]] = t
    if not sums and not counts:
        raise FormatError(f"{path}: no imatrix entries (no '*.in_sum2' / '*.counts' tensors)")

    def floats(t) -> np.ndarray:
        if t.type_name != "F32":
            raise FormatError(f"{path}: tensor {t.name}: expected F32, found {t.type_name}")
        values = np.fromfile(path, dtype="<f4", count=t.nbytes // 4, offset=t.offset).astype(np.float32)
        if not np.isfinite(values).all() or (values < 0).any():
            raise FormatError(f"{path}: tensor {t.name}: expected finite, non-negative values")
        return values

    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise FormatError(f"{path}: tensor {name}: mismatched in_sum2 and counts")
        vals, cnt = floats(sums[name]), floats(counts[name])
        if cnt.size == 0 or vals.size % cnt.size:
            raise FormatError(f"{path}: tensor {name}: {vals.size} sums do not split into {cnt.size} counts")
        entries[name] = ImatrixEntry(vals.reshape(cnt.size, -1), cnt)
    datasets = gguf.kv.get("imatrix.datasets", [])
    chunks = {k: gguf.kv.get(f"imatrix.{k}", 0) for k in ("chunk_count", "chunk_size")}
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise FormatError(f"{path}: imatrix.datasets = {datasets!r}: expected a list of strings")
    for key, v in chunks.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise FormatError(f"{path}: imatrix.{key} = {v!r}: expected a non-negative integer")
    return Imatrix(entries, datasets, chunks["chunk_count"], chunks["chunk_size"])


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise FormatError(f"{path}: truncated legacy imatrix while reading {what} at byte {pos}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1 or n_entries * 12 > len(data):
        raise FormatError(f"{path}: not an imatrix file (GGUF magic missing, legacy entry count {n_entries})")
    entries = {}
    for i in range(n_entries):
        (length,) = take("<i", f"entry {i} name length")
        if not 0 < length <= MAX_LEGACY_NAME:
            raise FormatError(f"{path}: entry {i}: name length {length} out of range")
        (raw,) = take(f"<{length}s", f"entry {i} name")
        name = raw.decode("utf-8", errors="replace")
        ncall, nval = take("<ii", f"entry {name} header")
        if not 0 < nval <= MAX_LEGACY_VALUES or pos + 4 * nval > len(data):
            raise FormatError(f"{path}: entry {name}: {nval} values do not fit the file")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        if ncall < 0 or not np.isfinite(vals).all() or (vals < 0).any():
            raise FormatError(f"{path}: entry {name}: expected finite, non-negative values and call count")
        # stored values are mean * ncall; keep llama-quantize's result (sums / ncall) with counts = ncall
        entries[name] = ImatrixEntry(vals.reshape(1, -1), np.array([ncall], np.float32))
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i", "chunk count")
        if pos + 4 <= len(data):
            (length,) = take("<i", "dataset name length")
            if 0 < length <= len(data) - pos:
                datasets.append(data[pos:pos + length].decode("utf-8", errors="replace"))
    return Imatrix(entries, datasets, int(chunk_count), 0, legacy=True)


def write_imatrix(path: str | Path, imatrix: Imatrix, force: bool = False) -> Path:
    """Write the GGUF imatrix format (what current `llama-imatrix` writes), atomically."""
    from gguf import GGUFValueType, GGUFWriter

    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        w = GGUFWriter(str(tmp), arch="")
        w.kv_data[0].clear()  # llama-imatrix writes no general.architecture
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", list(imatrix.datasets))
        w.add_key_value("imatrix.chunk_count", int(imatrix.chunk_count), GGUFValueType.UINT32)
        w.add_key_value("imatrix.chunk_size", int(imatrix.chunk_size), GGUFValueType.UINT32)
        for name in sorted(imatrix.entries):
            e = imatrix.entries[name]
            sums = np.ascontiguousarray(e.sums, dtype=np.float32).reshape(-1, e.sums.shape[-1])
            counts = np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1)
            w.add_tensor(name + IN_SUM2, sums if sums.shape[0] > 1 else sums.reshape(-1))
            w.add_tensor(name + COUNTS, counts if counts.shape[0] > 1 else counts.reshape(-1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
