"""The Q3_K and Q6_K encoders in C++ (`csrc/kquants.cpp`), loaded with ctypes: the encoder workers stay free of
torch. Same bytes as the numpy encoders of `kquants.py`, which stay as their reference and the fallback.

The library is compiled on first use (`kernels.toolchain.build_library`: -O3 -march=native, and
-ffp-contract=off so that no multiply-add is fused and every float operation rounds where the reference's does)
and cached. No C++ compiler: one RuntimeWarning, and the numpy encoders are used. A compiler that fails on the
source raises KernelBuildError (never a silent fallback). QUANTKIT_NATIVE=0 turns the library off (the numpy
encoders run), for comparisons.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from quantkit.errors import KernelBuildError
from quantkit.kernels.toolchain import build_library, missing_compiler

SOURCE = Path(__file__).resolve().parent / "csrc" / "kquants.cpp"  # package data
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17")
ABI = 1
TYPES = ("Q6_K", "Q3_K")

_lock = threading.Lock()
_state: dict[str, object] = {}


def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None when switched off or when no compiler is found (one warning)."""
    if os.environ.get("QUANTKIT_NATIVE", "1") == "0":
        return None
    with _lock:
        if "lib" not in _state:
            if "error" in _state:
                raise KernelBuildError(str(_state["error"]))
            missing = missing_compiler()
            if missing:
                _state["lib"] = None
                warnings.warn(f"quantkit: the C++ Q3_K/Q6_K encoders are unavailable, the numpy ones are used: "
                              f"{missing}", RuntimeWarning, stacklevel=2)
            else:
                try:
                    lib = ctypes.CDLL(str(build_library(SOURCE, FLAGS, "quantkit_kquants")))
                    if lib.quantkit_kquants_abi() != ABI:
                        raise KernelBuildError(f"{SOURCE}: the built library's ABI is not {ABI}")
                except (KernelBuildError, OSError) as e:
                    _state["error"] = str(e)
                    raise KernelBuildError(str(e)) from e
                for fn in (lib.quantkit_q6_k, lib.quantkit_q3_k):
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
                    fn.restype = None
                _state["lib"] = lib
        return _state["lib"]  # type: ignore[return-value]


def encode(type_name: str, x: np.ndarray, qw: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """x [n, 256] float32 (importance qw of the same shape, or None) -> the blocks, written into `out` [n, type
    size] uint8 (C-contiguous), by the library (which must be available: see `library()`)."""
    lib = library()
    if lib is None:
        raise KernelBuildError("the C++ k-quant encoders are not available here")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qw is not None:
        qw = np.ascontiguousarray(qw, dtype=np.float32)
        if qw.shape != x.shape:
            raise ValueError(f"importance shape {qw.shape} != weights shape {x.shape}")
    if x.ndim != 2 or x.shape[1] != 256 or out.shape[0] != x.shape[0] or not out.flags.c_contiguous:
        raise ValueError(f"expected super-blocks [n, 256] and a contiguous output of n rows, got {x.shape}, "
                         f"{out.shape}")
    fn = lib.quantkit_q6_k if type_name == "Q6_K" else lib.quantkit_q3_k
    fn(x.ctypes.data, None if qw is None else qw.ctypes.data, x.shape[0], out.ctypes.data)  # releases the GIL
    return out
