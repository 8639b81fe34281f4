"""Shared output plumbing: atomic directories/files, safetensors sharding with an index, JSON helpers.

Every output quantkit writes is complete or absent: it is built in a temporary sibling (`.NAME.tmp-PID-XXXX`) and
renamed into place; a write fault (disk full, file-size limit, read-only path) is one error line (`write_error`), and
a run that would not fit is refused before any work (`check_free_space`). What killed runs leave behind under that
naming is removed by the next run on the same name (`remove_stale_temporaries`).
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
    except (ValueError, OverflowError):  # 'abc', 'nanGB', '1e400GB'
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


def write_error(exc: BaseException, where: str | Path | None = None, *, output: str | Path | None = None,
                needs: str | None = None, note: str = "") -> WriteError | None:
    """The one-line error for a failed write (an OSError, or safetensors' SafetensorError wrapping one), or None
    when `exc` is not a write fault. It names `output` when given (what could not be created; the file being written
    then is usually a temporary one), else the file of the error, else `where`. `needs` (out of space only: what the
    run needs, see `describe_needs`) and `note` (e.g. where completed work is kept) are added to the message."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and type(exc).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code not in WRITE_FAULTS:
        return None
    path = output or getattr(exc, "filename", None) or where
    out_of_space = code in (errno.ENOSPC, errno.EDQUOT)
    cls = OutOfSpaceError if out_of_space else WriteError
    detail = f" ({needs})" if needs and out_of_space else ""
    return cls(f"{str(path) + ': ' if path else ''}{WRITE_FAULTS[code]} while writing{detail}: nothing was written"
               f"{note}")


def human_bytes(n: int | float) -> str:
    """4_100_000_000 -> '4.1 GB' (decimal units, as `df -H` and disk vendors count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def existing_ancestor(path: str | Path) -> Path:
    """`path` itself or its nearest existing parent: where a file created at `path` would land."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def describe_needs(needs: list[tuple[str, int]]) -> str:
    """[("the output", 8_200_000), ("the work dir x.partial", 4_200_000)] ->
    'about 12.4 MB is needed: the output 8.2 MB, the work dir x.partial 4.2 MB'."""
    parts = [(what, n) for what, n in needs if n > 0]
    total = sum(n for _, n in parts)
    return f"about {human_bytes(total)} is needed: " + ", ".join(f"{what} {human_bytes(n)}" for what, n in parts)


def check_free_space(needs: list[tuple[str, str | Path, int]]) -> dict[Path, int]:
    """Refuse, before any work, what cannot fit: `needs` lists (what, path, planned bytes) of everything a run will
    write; the entries on one file system are summed and compared with its free space (`shutil.disk_usage`).
    Raises OutOfSpaceError naming the first path, the bytes needed and the bytes free; returns the free bytes per
    file system (keyed by the existing directory measured). Planned sizes are the weights only (headers, configs and
    tokenizer files come on top), so a run refused here could not have finished."""
    groups: dict[int, tuple[Path, list[tuple[str, Path, int]]]] = {}
    for what, path, n in needs:
        base = existing_ancestor(path)
        try:
            dev = base.stat().st_dev
        except OSError:
            continue
        groups.setdefault(dev, (base, []))[1].append((what, Path(path), int(n)))
    free_by_fs: dict[Path, int] = {}
    for base, items in groups.values():
        try:
            free = shutil.disk_usage(base).free
        except OSError:
            continue
        free_by_fs[base] = free
        total = sum(n for _, _, n in items)
        if total > free:
            needed = describe_needs([(what, n) for what, _, n in items])
            raise OutOfSpaceError(f"{items[0][1]}: not enough disk space ({needed}), but only {human_bytes(free)} is "
                                  f"free on {base}; nothing was written (free some space or choose a path on another "
                                  "disk)")
    return free_by_fs


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


def _temp_prefix(target: Path, kind: str = "tmp") -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or not a pid at all): leave it
    return True


def stale_temporaries(target: str | Path) -> list[Path]:
    """What earlier quantkit runs that were killed left beside `target`: the temporaries named by quantkit's own
    pattern for this output name (`.NAME.tmp-PID-XXXX`, `.NAME.tmp-PID`, `.NAME.old-PID-XXXX`, and the older
    `.NAME.tmp-XXXXXXXX`), whose process (the PID in the name) no longer runs. Nothing else matches."""
    target = Path(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-([A-Za-z0-9_]+)(?:-[A-Za-z0-9_]+)?")
    stale = []
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None:
            continue
        tag = found.group(1)
        if tag.isdigit() and _pid_alive(int(tag)):
            continue  # a run still at work (or this very process)
        stale.append(Path(entry.path))
    return stale


def remove_stale_temporaries(target: str | Path) -> None:
    """Remove `stale_temporaries(target)` (a symlink itself, never what it points to)."""
    for p in stale_temporaries(target):
        remove_temp(p)


def temp_dir_beside(target: Path) -> Path:
    """A new hidden directory next to `target` (same file system, so the final rename is atomic), named
    `.NAME.tmp-PID-XXXX`. Temporaries of earlier killed runs for the same name are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))


def temp_file_beside(target: Path) -> Path:
    """A new hidden file next to `target`, named and cleaned up like `temp_dir_beside`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    os.close(fd)
    return Path(name)


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`; an earlier output there (already checked as quantkit's) is replaced.
    Modes follow the umask (some writers, safetensors among them, create 0600 files)."""
    mask = _umask()
    for p in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(_temp_prefix(target, "old") + os.urandom(4).hex())
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def remove_temp(tmp: Path) -> None:
    """Delete a temporary quantkit made, best effort: a directory tree, a file, or a symlink itself (never what it
    points to)."""
    try:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
    except OSError:
        pass


@contextlib.contextmanager
def _replacing(target: Path, tmp: Path) -> Iterator[Path]:
    """Yield `tmp`; on success rename it to `target`, on failure delete it."""
    try:
        yield tmp
    except BaseException:
        remove_temp(tmp)
        raise
    move_into_place(tmp, target)


def atomic_dir(target: str | Path, force: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary directory beside `target`; on success rename it to `target`, on failure delete it."""
    target = check_output_path(target, force)
    return _replacing(target, temp_dir_beside(target))


def atomic_file(target: str | Path, force: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary file path beside `target`; rename on success, delete on failure."""
    target = check_output_path(target, force)
    return _replacing(target, temp_file_beside(target))


def atomic_cache_file(target: str | Path) -> contextlib.AbstractContextManager[Path]:
    """`atomic_file` for a file quantkit keeps for itself (a cache whose owner its reader has checked): replaced
    without the output-ownership check."""
    target = Path(target)
    return _replacing(target, temp_file_beside(target))


def read_json_object(path: str | Path, error: type[Exception]) -> dict:
    """A JSON file that must hold an object; failures raise `error` naming the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as e:  # a directory, no permission, ...
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def read_json_or_empty(path: str | Path) -> dict:
    """An optional JSON object file (tokenizer_config.json, ...): {} when it is absent, unreadable, not JSON or not
    an object, for readers that fall back to defaults."""
    try:
        return read_json_object(path, QuantkitError)
    except QuantkitError:
        return {}


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


