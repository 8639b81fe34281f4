"""Shared output plumbing: atomic directories/files, safetensors sharding with an index, JSON helpers.

Every output quantkit writes is complete or absent: it is built in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from quantkit.errors import OutputExistsError

DEFAULT_SHARD_BYTES = 5 * 1000**3  # HF's "5GB"


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 123 -> bytes."""
    if isinstance(text, int):
        return text
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def check_output_path(path: str | Path, force: bool) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: output already exists (use --force to replace it)")
    return path


@contextlib.contextmanager
def atomic_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success rename it to `target`, on failure delete it."""
    target = check_output_path(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(target)


@contextlib.contextmanager
def atomic_file(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `target`; rename on success, delete on failure."""
    target = check_output_path(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(tmp, target)


def read_json_object(path: str | Path, error: type[Exception]) -> dict:
    """A JSON file that must hold an object; failures raise `error` naming the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def write_json(path: str | Path, obj, sort_keys: bool = False) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy in-order packing of tensors into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return [s for s in shards if s]


def shard_file_name(index: int, count: int, stem: str = "model") -> str:
    if count == 1:
        return f"{stem}.safetensors"
    return f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None, stem: str = "model") -> list[str]:
    """Write tensors as HF-style shards (+ `<stem>.safetensors.index.json` when more than one). Returns file names."""
    out_dir = Path(out_dir)
    groups = plan_shards([(n, tensor_nbytes(t)) for n, t in tensors.items()], max_shard_bytes)
    files, weight_map = [], {}
    for i, names in enumerate(groups):
        fname = shard_file_name(i, len(groups), stem)
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / fname), metadata=metadata or {"format": "pt"})
        files.append(fname)
        weight_map.update({n: fname for n in names})
    if len(groups) > 1:
        total = sum(tensor_nbytes(t) for t in tensors.values())
        write_json(out_dir / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def stream_sharded(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                   stem: str = "model") -> list[str]:
    """Like save_sharded, but holds at most one shard in memory: tensors arrive one by one.

    Shards are first written as `<stem>-NNNNN.part.safetensors` and renamed to `-of-` names at the end,
    when their count is known.
    """
    out_dir = Path(out_dir)
    parts: list[Path] = []
    weight_map: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    used = total = 0

    def flush():
        nonlocal current, used
        if current:
            part = out_dir / f"{stem}-{len(parts):05d}.part.safetensors"
            save_file(current, str(part), metadata=metadata or {"format": "pt"})
            parts.append(part)
            current, used = {}, 0

    for name, t in named_tensors:
        size = tensor_nbytes(t)
        if current and used + size > max_shard_bytes:
            flush()
        current[name] = t.contiguous()
        weight_map[name] = len(parts)
        used += size
        total += size
    flush()
    files = [shard_file_name(i, len(parts), stem) for i in range(len(parts))]
    for part, fname in zip(parts, files):
        part.rename(out_dir / fname)
    if len(parts) > 1:
        write_json(out_dir / f"{stem}.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": {n: files[i] for n, i in weight_map.items()}})
    return files
