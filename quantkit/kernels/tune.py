"""Tiny launch-config picker shared by the kernels.

On a GPU the first call for a key times each candidate config (CUDA-graph replay, so Python launch overhead does
not hide the kernel time) and remembers the fastest (configs that fail to compile, or whose output disagrees
with a reference kernel when the caller passes a check, are skipped; the timings are kept for reports); under
TRITON_INTERPRET=1 (CPU tests) the first candidate is used without timing. Picking must happen before CUDA-graph
capture (the runtime warms up first).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Sequence

_CACHE: dict[Hashable, Any] = {}
_TIMES: dict[Hashable, dict] = {}  # key -> {cfg: ms} of the last search
_ERRORS: dict[Hashable, list] = {}  # key -> skipped configs and why
NO_SEARCH = False  # True: take each key's first (default) candidate without timing (quick benchmark passes)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sm_count(device) -> int:
    import torch

    if interpreting() or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick(key: Hashable, candidates: Sequence[Any], run: Callable[[Any], None],
         check: Callable[[Any], bool] | None = None) -> Any:
    """The fastest of `candidates` for `key` (`run(cfg)` launches the kernel once with cfg). `check(cfg)`, when
    given, must return True before a candidate is timed (a config whose output disagrees is skipped). The
    measured times are kept in `timings()`."""
    if key in _CACHE:
        return _CACHE[key]
    if interpreting() or NO_SEARCH or len(candidates) == 1:
        _CACHE[key] = candidates[0]
        return candidates[0]
    best, best_t, errors, times = None, float("inf"), [], {}
    for cfg in candidates:
        try:
            if check is not None and not check(cfg):
                errors.append(f"{cfg}: output differs from the reference kernel")
                continue
            t = time_gpu(lambda: run(cfg), rep=5)
        except Exception as e:  # a config the compiler rejects (shared memory, registers) is just skipped
            errors.append(f"{cfg}: {type(e).__name__}: {e}")
            continue
        times[cfg] = t
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError(f"no kernel config ran for {key}: " + " | ".join(errors)[:2000])
    _CACHE[key] = best
    _TIMES[key] = times
    _ERRORS[key] = errors
    return best


def time_gpu(fn: Callable[[], Any], rep: int = 20) -> float:
    """ms per call of `fn` on the GPU without Python launch overhead: the calls are captured in a CUDA graph
    (`triton.testing.do_bench_cudagraph`); falls back to `do_bench` if capture is not possible."""
    import triton.testing

    bench_graph = getattr(triton.testing, "do_bench_cudagraph", None)
    if bench_graph is not None:
        try:
            return float(bench_graph(fn, rep=rep))
        except Exception:
            pass
    return float(triton.testing.do_bench(fn, warmup=5, rep=rep))


def chosen() -> dict[Hashable, Any]:
    return dict(_CACHE)


def timings() -> dict[Hashable, dict]:
    """key -> {cfg: ms} measured by `pick` (GPU searches only)."""
    return dict(_TIMES)


def skipped() -> dict[Hashable, list]:
    return dict(_ERRORS)
