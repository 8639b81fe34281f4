"""Encode one large tensor's rows in worker processes.

The block encoders are numpy; between numpy calls Python holds the GIL, so two encoder threads on two cores reach
~1.8x one thread. Worker processes have no shared GIL, and they run with glibc malloc settings that keep the
encoders' temporaries off fresh page-faulting mmaps: on a 14336x4096 Q4_K tensor (2 cores) 2.1-2.2 s in two
workers against 2.5-2.6 s in two threads. The weight is converted to
float32 straight into a shared-memory file (`/dev/shm` where it exists), each worker maps it and encodes a
contiguous share of the rows with the same `blocks.encode_checked_rows` the in-process path uses, writing block
bytes into a second shared file. Only file names and row ranges cross the process boundary.

Workers are plain subprocesses (`python -m quantkit.gguf.encode_worker`, one JSON line per task), not
multiprocessing: they never re-import the caller's main module and are safe to start while the caller runs
threads. They live as long as the process and are stopped at exit. `encode_in_processes` returns None when they
cannot run here (the caller falls back to threads); `QUANTKIT_ENCODE_PROCESSES=0` turns them off, `=N` sets the
worker count.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from quantkit.errors import QuantkitError, SchemeError

MIN_ELEMENTS = 1 << 21  # smaller tensors: starting the round trip costs more than it saves

_WORKERS: list[subprocess.Popen] = []
_BROKEN = False


def worker_count(requested: int | None) -> int:
    env = os.environ.get("QUANTKIT_ENCODE_PROCESSES", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            return 0
    return requested or os.cpu_count() or 1


def _start(n: int) -> list[subprocess.Popen] | None:
    global _BROKEN
    if _BROKEN:
        return None
    alive = [w for w in _WORKERS if w.poll() is None]
    if len(alive) != len(_WORKERS):
        shutdown()
        alive = []
    try:
        package_root = str(Path(__file__).resolve().parents[2])
        # glibc: serve the encoders' 1 MB temporaries from the heap and keep it (by default each one is a fresh
        # mmap whose pages fault in zeroed: ~25% of the encode time)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   MALLOC_MMAP_THRESHOLD_=str(16 << 20), MALLOC_TRIM_THRESHOLD_=str(128 << 20))
        while len(alive) < n:
            alive.append(subprocess.Popen([sys.executable, "-m", "quantkit.gguf.encode_worker"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, bufsize=1, env=env))
    except OSError:
        _BROKEN = True
        return None
    _WORKERS[:] = alive
    return alive[:n]


def shutdown() -> None:
    """Stop the workers (closing stdin ends their loop; stragglers are killed)."""
    for w in _WORKERS:
        try:
            if w.stdin:
                w.stdin.close()
        except OSError:
            pass
    for w in _WORKERS:
        try:
            w.wait(timeout=2)
        except subprocess.TimeoutExpired:
            w.kill()
    _WORKERS.clear()


atexit.register(shutdown)


def _shared_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _fail(workers: list[subprocess.Popen], permanent: bool = True) -> None:
    """Kill the workers; `permanent`: they broke, so this process stops using worker processes."""
    global _BROKEN
    _BROKEN = _BROKEN or permanent
    for w in workers:
        w.kill()
    _WORKERS.clear()


def encode_in_processes(weight, shape2: tuple[int, int], type_name: str, importance: np.ndarray | None, name: str,
                        out_cols: int, step: int, n_workers: int,
                        to_f32: Callable[[object], np.ndarray]) -> np.ndarray | None:
    """Block bytes [rows, out_cols] of `weight` viewed as `shape2`, encoded by `n_workers` processes in chunks of
    `step` rows; None if the workers cannot run here. Errors in the data (NaN/Inf) are raised as in-process."""
    rows, cols = shape2
    workers = _start(n_workers)
    if not workers:
        return None
    base = Path(_shared_dir()) / f"quantkit-{os.getpid()}-{uuid.uuid4().hex}"
    src, dst, imp = Path(f"{base}.in"), Path(f"{base}.out"), Path(f"{base}.imp")
    try:
        x = np.memmap(src, dtype=np.float32, mode="w+", shape=(rows, cols))
        if isinstance(weight, torch.Tensor):
            torch.from_numpy(x).copy_(weight.detach().reshape(rows, cols))  # bf16/f16 -> f32 in one pass
        else:
            np.copyto(x, to_f32(weight).reshape(rows, cols))
        del x
        np.memmap(dst, dtype=np.uint8, mode="w+", shape=(rows, out_cols)).flush()
        if importance is not None:
            np.ascontiguousarray(importance, dtype=np.float32).tofile(imp)
        # contiguous shares of whole chunks, in row order (the first error in row order is the one raised)
        chunks = -(-rows // step)
        bounds = [min(rows, (chunks * i // len(workers)) * step) for i in range(len(workers) + 1)]
        tasks = [(w, dict(src=str(src), dst=str(dst), rows=rows, cols=cols, out_cols=out_cols, r0=r0, r1=r1,
                          step=step, type=type_name, name=name, importance=str(imp) if importance is not None else None))
                 for w, r0, r1 in zip(workers, bounds, bounds[1:]) if r1 > r0]
        try:
            for w, task in tasks:
                w.stdin.write(json.dumps(task) + "\n")
                w.stdin.flush()
            replies = [json.loads(w.stdout.readline() or "null") for w, _ in tasks]
        except (OSError, ValueError):
            replies = [None]
        if any(r is None for r in replies):  # a worker died: stop using them, let the caller encode in-process
            _fail(workers)
            return None
        for r in replies:
            if not r["ok"]:
                if r["error"] == "SchemeError":
                    raise SchemeError(r["message"])
                raise QuantkitError(f"{name}: encoding worker failed: {r['message']}")
        return np.array(np.memmap(dst, dtype=np.uint8, mode="r", shape=(rows, out_cols)))
    except KeyboardInterrupt:
        _fail(workers, permanent=False)  # they may be mid-task; a later call starts fresh ones
        raise
    finally:
        for p in (src, dst, imp):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
