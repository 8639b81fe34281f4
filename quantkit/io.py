"""Shared output plumbing: atomic directories/files, safetensors sharding with an index, JSON helpers.

Every output quantkit writes is complete or absent: it is built in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from quantkit.errors import OutOfSpaceError, OutputExistsError, QuantkitError, WriteError

DEFAULT_SHARD_BYTES = 5 * 1000**3  # HF's "5GB"


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 123 -> bytes."""
    if isinstance(text, int):
        return text
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    t = text.strip().lower()
    try:
        for suffix, mult in units.items():
            if t.endswith(suffix):
                size = int(float(t[: -len(suffix)]) * mult)
                break
        else:
            size = int(t)
    except ValueError:
        size = 0
    if size <= 0:
        raise QuantkitError(f"size {text!r}: expected a positive size such as 5GB, 500MB, 2GiB or a number of bytes")
    return size


# files quantkit writes into every directory it creates (a work dir, an HF-layout output, a dump, a report)
OWNER_FILES = ("quantkit.json", "dump.json", "report.json", ".quantkit-work", ".quantkit-outputs")
GGUF_OWNER_KEY = b"quantkit."  # every GGUF quantkit writes carries quantkit.* provenance keys
_GGUF_HEADER_SCAN = 32 << 20  # the KV header (tokenizer included) of a GGUF is far below this


WRITE_FAULTS = {errno.ENOSPC: "out of disk space", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large (a file-size limit)", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.ENOTDIR: "a parent of the path is not a directory",
                errno.EEXIST: "a parent of the path exists and is not a directory"}  # mkdir(exist_ok=True)


def write_error(exc: BaseException, where: str | Path | None = None) -> WriteError | None:
    """The one-line error for a failed write (an OSError, or safetensors' SafetensorError wrapping one), or None
    when `exc` is not a write fault."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and type(exc).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code not in WRITE_FAULTS:
        return None
    path = getattr(exc, "filename", None) or where
    cls = OutOfSpaceError if code in (errno.ENOSPC, errno.EDQUOT) else WriteError
    return cls(f"{path + ': ' if path else ''}{WRITE_FAULTS[code]} while writing: nothing was written")


def written_by_quantkit(path: str | Path) -> bool:
    """Whether `path` is something quantkit created and may therefore replace: a directory holding one of
    OWNER_FILES, or a GGUF file whose header carries quantkit.* keys."""
    path = Path(path)
    if path.is_dir():
        return any((path / f).is_file() for f in OWNER_FILES)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
            seen, tail = 0, b""
            while seen < _GGUF_HEADER_SCAN:
                chunk = f.read(1 << 20)
                if not chunk:
                    return False
                if GGUF_OWNER_KEY in tail + chunk:
                    return True
                tail, seen = chunk[-len(GGUF_OWNER_KEY):], seen + len(chunk)
    except OSError:
        return False
    return False


def check_output_path(path: str | Path, force: bool) -> Path:
    """Refuse an existing output, unless `force` and it is an earlier quantkit output or an empty directory (never
    a user's own data)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputExistsError(f"{path}: output already exists (use --force to replace it)")
        empty_dir = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
        if not empty_dir and (path.is_symlink() or not written_by_quantkit(path)):
            raise OutputExistsError(f"{path}: exists and was not written by quantkit; --force replaces only "
                                    "quantkit's own outputs (remove it yourself or choose another path)")
    return path


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_disjoint(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Refuse any output path equal to, inside, or containing an input path (names say which option is which)."""
    for out_name, out in outputs.items():
        if out is None:
            continue
        o = Path(out).resolve()
        for in_name, inp in inputs.items():
            if inp is None or not Path(inp).exists():
                continue
            if _related(o, Path(inp).resolve()):
                raise OutputExistsError(f"{out_name} {out} overlaps {in_name} {inp}: quantkit never writes into, "
                                        "over or around its inputs; choose another path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir_beside(target: Path) -> Path:
    """A new hidden directory next to `target` (same file system, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def temp_file_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    return Path(name)


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`; an earlier output there (already checked as quantkit's) is replaced.
    Modes follow the umask (some writers, safetensors among them, create 0600 files)."""
    mask = _umask()
    for p in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    if target.is_dir():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def remove_temp(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success rename it to `target`, on failure delete it."""
    target = check_output_path(target, force)
    tmp = temp_dir_beside(target)
    try:
        yield tmp
    except BaseException:
        remove_temp(tmp)
        raise
    move_into_place(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `target`; rename on success, delete on failure."""
    target = check_output_path(target, force)
    tmp = temp_file_beside(target)
    try:
        yield tmp
    except BaseException:
        remove_temp(tmp)
        raise
    move_into_place(tmp, target)


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
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / fname),
                  metadata=metadata or {"format": "pt"})
        files.append(fname)
        weight_map.update({n: fname for n in names})
    if len(groups) > 1:
        total = sum(tensor_nbytes(t) for t in tensors.values())
        write_json(out_dir / f"{stem}.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


