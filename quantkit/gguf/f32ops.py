"""float32 arithmetic exactly as ggml's C reference quantizers do it, on numpy arrays.

ggml's `ggml-quants.c` is compiled without FMA contraction and without reassociation (ggml-base is built for
generic x86-64), so every `a*b + c` is two correctly rounded float32 operations and every sum is sequential,
left to right. numpy's float32 elementwise ufuncs are IEEE-exact, so the same expression in the same order gives
the same bits. What needs care:
- reductions: numpy's `sum` is pairwise; `seqsum` adds strictly in order, starting from +0.0 like C's `s = 0`;
- rounding: `nearest_int` is ggml's `fval + 12582912.f` bit trick (round half to even for |f| < 2^22, and the
  same garbage as C outside that range); where the range is known to be safe the searches use np.rint instead;
- narrowing: C stores ints into uint8/int8 fields with wrap-around; `wrap_u8` does the same for uint8.

Tolerance: none is needed against the llama.cpp build used here (checked: `ggml-quants.c.o` has no FMA
instructions; 100% of blocks identical on mistral-nano for every type, with and without imatrix). A build that
contracts `a*b + c` into fused multiply-adds in ggml-base (e.g. `-march=native -ffp-contract=fast`) rounds some
sums differently and can flip a few candidate choices; the oracle tests therefore require >= 99.9% identical
blocks rather than 100%.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
MAGIC = np.float32(12582912.0)  # 1.5 * 2^23
GROUP_MAX_EPS = np.float32(1e-15)


def nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: float32 add of 1.5*2^23, then the low mantissa bits (int32)."""
    v = np.asarray(f, dtype=np.float32) + MAGIC
    return (v.view(np.int32) & 0x007FFFFF) - 0x00400000


def wrap_u8(v: np.ndarray) -> np.ndarray:
    return (np.asarray(v).astype(np.int64) & 0xFF).astype(np.int32)


def seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in order, starting from +0.0 (C: `float s = 0; for (...) s += a[i];`).

    numpy reduces a C-contiguous [n, B] array over axis 0 row by row (the inner loop runs over B), so the result is
    the sequential sum; its pairwise summation only applies when the reduced axis is the inner one (B == 1)."""
    if a.ndim == 2 and a.shape[1] >= 2 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0, initial=np.float32(0))
    s = np.zeros(a.shape[1:], dtype=np.float32)
    for i in range(a.shape[0]):
        s += a[i]
    return s


def seqsum_first(a: np.ndarray) -> np.ndarray:
    """Sequential sum over axis 0 starting from a[0] (C: `float s = a[0]; for (i = 1; ...) s += a[i];`)."""
    if a.ndim == 2 and a.shape[1] >= 2 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    s = a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def sumsq_rows(x: np.ndarray) -> np.ndarray:
    """Sum of x^2 along each row of x [n, S], in order from +0.0 (C: `for (...) s += x[i]*x[i];`): [n]. Every
    encoder's sigma2 of a super-block (or row) starts from this."""
    xt = np.ascontiguousarray(x.T)
    return seqsum(xt * xt)


def seqsum_rows(a: np.ndarray) -> np.ndarray:
    """Sequential float32 sum along the last axis (np.add.accumulate is strictly left-to-right).

    Starts from a[..., 0] rather than +0.0: identical unless the first term is -0.0 (never for squares)."""
    return np.add.accumulate(a, axis=-1, dtype=np.float32)[..., -1]


def first_absmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """The signed value with the largest |x| along `axis`, first occurrence wins (C: `if (amax < fabsf(v))`); a NaN
    is never taken (C's comparison is false for it)."""
    a = np.abs(x)
    a[np.isnan(a)] = -1
    idx = np.argmax(a, axis=axis)
    return np.take_along_axis(x, np.expand_dims(idx, axis), axis=axis).squeeze(axis)


def bf16_bits(v: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN made quiet; uint16 bits."""
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    quiet = ((u >> 16) | 64).astype(np.uint16)
    return np.where(is_nan, quiet, rounded)
