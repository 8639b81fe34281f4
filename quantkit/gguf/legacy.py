"""Legacy ggml block types (blocks of 32): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 — encoders and byte packing.

Without an importance matrix these are ggml's `quantize_row_qX_ref` (plain round-to-nearest with the fp32 scale;
Q4_0/Q5_0 put the largest-magnitude value exactly on the -8/-16 level). With one they are ggml's
`quantize_row_qX_impl`: per-element weights `qw[j] * sqrt(sigma2 + x[j]^2)` (sigma2 = mean x^2 of the whole row)
and a scale search (`make_qx_quants` for Q4_0/Q5_0, `make_qkx3_quants` for Q4_1/Q5_1). Q8_0 ignores the imatrix.

All functions work on `x` = [n_blocks, 32] float32 and return the block bytes [n_blocks, type_size] uint8.
"""

from __future__ import annotations

import numpy as np

from quantkit.ggml_types import f32_to_f16
from quantkit.gguf import search
from quantkit.gguf.f32ops import F32, first_absmax

QK = 32


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(np.float32)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes 0..15 -> [n, 16] bytes: element j in the low nibble, element j+16 in the high nibble."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def pack_qh(q: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit codes -> [n, 4] bytes of the little-endian uint32 holding bit 4 of element j at bit j."""
    bits = ((q.astype(np.uint8) >> 4) & 1)
    return np.packbits(bits, axis=-1, bitorder="little")


def pack_q8_0(d: np.ndarray, qs: np.ndarray) -> np.ndarray:
    return np.concatenate([f32_to_f16(d), qs.astype(np.int8).view(np.uint8)], axis=1)


def pack_q4_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.concatenate([f32_to_f16(d), pack_nibbles(q)], axis=1)


def pack_q4_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.concatenate([f32_to_f16(d), f32_to_f16(m), pack_nibbles(q)], axis=1)


def pack_q5_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.concatenate([f32_to_f16(d), pack_qh(q), pack_nibbles(q)], axis=1)


def pack_q5_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.concatenate([f32_to_f16(d), f32_to_f16(m), pack_qh(q), pack_nibbles(q)], axis=1)


# ---------------------------------------------------------------- reference (no imatrix)

def q8_0_ref(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1)
    d = amax / F32(127)
    v = x * _inverse(d)[:, None]
    # roundf: |v| <= 127 so v +- 0.5 is exact in float64, and the int8 cast truncates toward zero
    qs = np.add(v, np.copysign(F32(0.5), v), dtype=np.float64).astype(np.int8)
    return pack_q8_0(d, qs)


def _symmetric_ref(x: np.ndarray, nlevels: int) -> tuple[np.ndarray, np.ndarray]:
    half = nlevels // 2
    mx = first_absmax(x, axis=1)
    d = mx / F32(-half)
    v = x * _inverse(d)[:, None] + F32(half + 0.5)
    # MIN(nmax, (int8_t)v): v lies in [0.5, nlevels + 0.5] for finite input, so the casts cannot wrap
    return d, np.minimum(F32(nlevels - 1), np.trunc(v)).astype(np.uint8)


def q4_0_ref(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric_ref(x, 16)
    return pack_q4_0(d, q)


def q5_0_ref(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric_ref(x, 32)
    return pack_q5_0(d, q)


def _affine_ref(x: np.ndarray, nlevels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    d = (mx - mn) / F32(nlevels - 1)
    v = (x - mn[:, None]) * _inverse(d)[:, None] + F32(0.5)  # in [0.5, nlevels - 0.5] (+ rounding)
    return d, mn, np.trunc(v)


def q4_1_ref(x: np.ndarray) -> np.ndarray:
    d, m, q = _affine_ref(x, 16)
    return pack_q4_1(d, m, np.minimum(F32(15), q).astype(np.uint8))  # MIN(15, (int8_t)v)


def q5_1_ref(x: np.ndarray) -> np.ndarray:
    d, m, q = _affine_ref(x, 32)
    return pack_q5_1(d, m, q.astype(np.uint8))  # (uint8_t)v, no clamp in C


# ---------------------------------------------------------------- importance-weighted (quantize_row_qX_impl)

def q4_0_weighted(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    scale, L = search.make_qx_quants(x.T.copy(), 8, weights.T.copy())
    return pack_q4_0(scale, L.take().T)


def q5_0_weighted(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    scale, L = search.make_qx_quants(x.T.copy(), 16, weights.T.copy())
    return pack_q5_0(scale, L.take().T)


def q4_1_weighted(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    scale, the_min, L = search.make_qkx_quants(x.T.copy(), 15, weights.T.copy(), -0.9, 0.05, 36, use_mad=False,
                                               degenerate_if_le=True)
    return pack_q4_1(scale, -the_min, L.take().T)


def q5_1_weighted(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    scale, the_min, L = search.make_qkx_quants(x.T.copy(), 31, weights.T.copy(), -0.9, 0.05, 36, use_mad=False,
                                               degenerate_if_le=True)
    return pack_q5_1(scale, -the_min, L.take().T)


REF = {"Q8_0": q8_0_ref, "Q4_0": q4_0_ref, "Q4_1": q4_1_ref, "Q5_0": q5_0_ref, "Q5_1": q5_1_ref}
WEIGHTED = {"Q4_0": q4_0_weighted, "Q4_1": q4_1_weighted, "Q5_0": q5_0_weighted, "Q5_1": q5_1_weighted}
