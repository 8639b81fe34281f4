"""Encode ggml block types in worker processes, one tensor at a time, through shared memory.

Why processes: the encoders make ~600 numpy calls per 2^18-element chunk, and numpy takes the interpreter lock
back after each. Two encoder *threads* on a 2-core machine spent ~16% of their CPU time handing that lock to each
other (Q4_K: 15.5 ms of CPU per chunk alone, 18.0 ms each with two threads; 1.54x from the second core). Two
processes don't share a lock (1.98x).

The parent copies the tensor's rows, in their stored 16/32-bit form, into a shared input buffer chunk by chunk
and submits each chunk as soon as it is there; the workers widen the rows to float32, encode them
(`encode.encode_rows`, the same code the threaded path runs) and write the block bytes into a shared output
buffer. Both buffers grow to the largest tensor seen and are reused. Workers import numpy and the encoders only
(no torch).

    with ProcessEncoder() as pool:
        ggml = quantize_ggml(weight, "Q4_K", pool=pool)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import types
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory

import numpy as np

from quantkit.allocator import tune_allocator
from quantkit.errors import QuantkitError
from quantkit.gguf.encode import SOURCE_DTYPES, chunk_starts, encode_rows, row_bytes, widen


# The staged copy of a tensor's rows lives beside the tensor itself; beyond this size (a float32 7B embedding is
# 0.5 GB, a bf16 one 0.25 GB) the tensor is encoded in-process instead, so peak memory stays ~1 GB.
MAX_STAGED_BYTES = 256 << 20


class EncoderCrashed(QuantkitError):
    """An encoder worker process died (killed, or out of memory)."""


class _SharedBuffer:
    """A shared-memory block that grows (by replacement) to the largest request; unlinked on close."""

    def __init__(self) -> None:
        self.shm: shared_memory.SharedMemory | None = None

    def at_least(self, nbytes: int) -> shared_memory.SharedMemory | None:
        """The buffer, grown to `nbytes` if needed; None when the shared-memory filesystem has no room for it."""
        if self.shm is None or self.shm.size < nbytes:
            self.close()
            if not _shm_has_room(nbytes):
                return None
            self.shm = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
        return self.shm

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


def _shm_has_room(nbytes: int) -> bool:
    """Whether /dev/shm (where Linux keeps POSIX shared memory) can hold `nbytes` more. Its pages are allocated on
    first write, so a buffer bigger than the free space is created fine and then kills the writer with SIGBUS —
    containers often mount only 64 MB there."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):  # not Linux: the OS backs shared memory otherwise
        return True
    return st.f_bavail * st.f_frsize >= nbytes + (16 << 20)


# ---- worker side

_attached: dict[str, shared_memory.SharedMemory] = {}


def _attach(*names: str) -> list[shared_memory.SharedMemory]:
    """The named buffers, attached once per worker; any other (replaced by the parent) is let go first."""
    for stale in [n for n in _attached if n not in names]:
        _attached.pop(stale).close()
    for n in names:
        if n not in _attached:
            _attached[n] = shared_memory.SharedMemory(name=n)
    return [_attached[n] for n in names]


def _encode_chunk(in_name: str, out_name: str, kind: str, rows: int, cols: int, r0: int, r1: int, type_name: str,
                  qw: np.ndarray | None, name: str) -> None:
    ins, outs = _attach(in_name, out_name)
    src = np.ndarray((rows, cols), SOURCE_DTYPES[kind], buffer=ins.buf)
    out = np.ndarray((rows, row_bytes(type_name, cols)), np.uint8, buffer=outs.buf)
    out[r0:r1] = encode_rows(widen(src[r0:r1], kind), type_name, qw, name, r0)
    del src, out  # no view may outlive the call: a buffer with exported views cannot be closed


# ---- parent side

class ProcessEncoder:
    """A pool of encoder processes (default: one per CPU) with its shared input and output buffers."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1
        self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=tune_allocator)
        self._in = _SharedBuffer()
        self._out = _SharedBuffer()
        try:
            self._start_workers()
        except BaseException:
            self.close()
            raise

    def _start_workers(self) -> None:
        """Start every worker now, with the caller's `__main__` hidden: "spawn" re-imports the main script in each
        child, which would run a script's unguarded top-level code (say, a convert call) once more per worker.
        The workers need nothing from it."""
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            started = [self._pool.submit(os.getpid) for _ in range(self.workers)]  # each submit starts a process
        finally:
            if main is not None:
                sys.modules["__main__"] = main
        for f in started:
            f.result()

    def run(self, src: np.ndarray, kind: str, type_name: str, qw: np.ndarray | None, name: str) -> np.ndarray | None:
        """Stored rows `src` [rows, cols] (`SOURCE_DTYPES[kind]`) -> block bytes [rows, row_bytes] (a new array), or
        None when the tensor is larger than MAX_STAGED_BYTES or shared memory has no room for it (the caller
        encodes it in-process instead)."""
        rows, cols = src.shape
        if src.nbytes > MAX_STAGED_BYTES:
            return None
        ins = self._in.at_least(src.nbytes)
        outs = self._out.at_least(rows * row_bytes(type_name, cols)) if ins is not None else None
        if ins is None or outs is None:
            return None
        staged = np.ndarray(src.shape, src.dtype, buffer=ins.buf)
        step, starts = chunk_starts(rows, cols)
        futures = []
        try:
            for r0 in starts:
                r1 = min(rows, r0 + step)
                staged[r0:r1] = src[r0:r1]
                futures.append(self._pool.submit(_encode_chunk, ins.name, outs.name, kind, rows, cols, r0, r1,
                                                 type_name, qw, name))
            for f in futures:
                f.result()
        except BrokenProcessPool:
            raise EncoderCrashed(f"{name}: an encoder worker process died (killed, or out of memory?)") from None
        except BaseException:
            for f in futures:
                f.cancel()
            wait(futures)  # chunks already running still use the buffers: the next tensor must not overwrite them
            raise
        finally:
            del staged
        out = np.ndarray((rows, row_bytes(type_name, cols)), np.uint8, buffer=outs.buf)
        result = out.copy()
        del out
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._in.close()
        self._out.close()

    def __enter__(self) -> "ProcessEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
