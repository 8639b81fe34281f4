"""Non-linear 4-bit i-quant encoders: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256).

Both store 4-bit indices into one 16-value table (`ggml_types.IQ4_VALUES`, ggml's `kvalues_iq4nl`) with a scale per 32
elements: IQ4_NL an fp16 scale per block (4.5 bits per weight), IQ4_XS a 6-bit signed sub-block scale against one
fp16 super-block scale (4.25 bits per weight).

`x` is [n_blocks, 32] (IQ4_NL) or [n_superblocks, 256] (IQ4_XS) float32; `qw` (optional) the importance of each
element's column, same shape. The result is ggml's `quantize_iq4_nl` / `quantize_iq4_xs` (what `llama-quantize`
runs, with or without an imatrix): per sub-block of 32 a scale search over 16 candidate steps weighted by
`qw * sqrt(sigma2 + x^2)` (or `x^2` without importance), then, for IQ4_XS, the sub-block scales rounded to 6 bits
against `-max_scale/32`, and every index chosen again with the rounded scale. float32 arithmetic in C's order
(`f32ops`); block bytes [n, type_size] uint8.
"""

from __future__ import annotations

import numpy as np

from quantkit.ggml_types import IQ4_VALUES, f32_to_f16
from quantkit.gguf.f32ops import F32, GROUP_MAX_EPS, first_absmax, nearest_int, seqsum, sumsq_rows
from quantkit.gguf.legacy import pack_nibbles

KVALUES = np.array(IQ4_VALUES, dtype=np.float32)
SEARCH_STEPS = 7  # ggml's ntry: candidate steps (k - 127)/max for k in -7..7
SUB = 32  # elements per scale


# the midpoints between neighbouring values (exact halves in float32)
MIDPOINTS = (KVALUES[:-1] + KVALUES[1:]) / F32(2)
# every midpoint is a multiple of 1/2, so the count of midpoints <= v depends only on floor(2v): tables over
# floor(2v) in [-257, 257] (beyond: the end values) of the index and of the value
_HALF_STEPS = np.arange(-257, 258, dtype=np.float32)
_INDEX_OF_HALF_STEP = np.searchsorted(2 * MIDPOINTS, _HALF_STEPS, side="right").astype(np.uint8)
_VALUE_OF_HALF_STEP = KVALUES[_INDEX_OF_HALF_STEP]


def _half_step(v: np.ndarray) -> np.ndarray:
    """floor(2v) + 257, clipped to the tables. NaN (only in the lanes of all-zero blocks, which the encoder
    discards) becomes an arbitrary index that the `take(..., mode="clip")` below keeps in range."""
    k = np.floor(v * F32(2))  # exact: doubling and floor are exact in float32
    np.clip(k, -257, 257, out=k)
    with np.errstate(invalid="ignore"):
        return k.astype(np.int32) + 257


def best_index(v: np.ndarray) -> np.ndarray:
    """ggml's `best_index_int8(16, kvalues_iq4nl, v)`: the nearest table index, the upper one on a tie (uint8).

    C compares `v - val[i] < val[i+1] - v` in float32; near a midpoint (|v| >= 4.5) both differences are exact
    (v and the integer values share v's ulp grid and the differences are below 2^24 ulps), and away from it a
    rounding cannot reverse the order, so the choice is the count of midpoints <= v
    (tests/test_gguf_quants.py checks it against the C search)."""
    return np.take(_INDEX_OF_HALF_STEP, _half_step(v), mode="clip")


def _weighted_sums(xe: np.ndarray, w: np.ndarray, inv_step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum w*q*x, sum w*q*q) over each sub-block, in order, with q the table value nearest x*inv_step."""
    q = np.take(_VALUE_OF_HALF_STEP, _half_step(inv_step * xe), mode="clip")
    wq = w * q
    return seqsum(wq * xe), seqsum(wq * q)


def sub_block_scales(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """The searched scale of every sub-block of 32: [n_superblocks, S/32] float32 (0 for a block below
    GROUP_MAX_EPS). `x`, `qw`: [n_superblocks, S]."""
    n, size = x.shape
    xe = np.ascontiguousarray(x.reshape(-1, SUB).T)  # [32, n_sub]: element-major, sums run down axis 0
    if qw is None:
        w = xe * xe
    else:
        sigma2 = sumsq_rows(x) * (F32(2) / F32(size))  # per super-block
        sigma2 = np.repeat(sigma2, size // SUB)[None, :]
        w = np.ascontiguousarray(qw.reshape(-1, SUB).T) * np.sqrt(sigma2 + xe * xe)
    signed_max = first_absmax(xe, axis=0)
    live = np.abs(signed_max) >= GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d0 = -signed_max / KVALUES[0]
        sumqx, sumq2 = _weighted_sums(xe, w, F32(1) / d0)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(np.float32)
        best = d * sumqx
        for step in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
            sumqx, sumq2 = _weighted_sums(xe, w, F32(step + KVALUES[0]) / signed_max)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
    return np.where(live, d, F32(0)).astype(np.float32).reshape(n, size // SUB)


def _indices(x: np.ndarray, inv_step: np.ndarray) -> np.ndarray:
    """Table indices of x [n, S] with one inverse step per sub-block [n, S/32], packed as ggml stores them."""
    v = x.reshape(-1, SUB) * inv_step.reshape(-1, 1)
    return pack_nibbles(best_index(v)).reshape(x.shape[0], -1)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(np.float32)


def iq4_nl(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """[n, 32] float32 -> IQ4_NL blocks [n, 18]: d (fp16), qs[16]."""
    d = sub_block_scales(x, qw)[:, 0]
    out = np.empty((x.shape[0], 18), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16(d)
    out[:, 2:18] = _indices(x, _inverse(d))
    return out


def iq4_xs(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """[n, 256] float32 -> IQ4_XS blocks [n, 136]: d (fp16), scales_h (uint16), scales_l[4], qs[128]."""
    scales = sub_block_scales(x, qw)  # [n, 8]
    abs_max = np.abs(scales).max(axis=1)
    max_scale = np.where(abs_max > 0, first_absmax(scales, axis=1), F32(0)).astype(np.float32)
    d = -max_scale / F32(32)
    ls = np.clip(nearest_int(_inverse(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * ls.astype(np.float32)
    ls = (ls + 32).astype(np.uint16)  # 0..63: low 4 bits in scales_l, high 2 in scales_h
    out = np.empty((x.shape[0], 136), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16(d)
    scales_h = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype("<u2")
    out[:, 2:4] = scales_h.view(np.uint8).reshape(-1, 2)
    out[:, 4:8] = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    out[:, 8:136] = _indices(x, _inverse(dl))
    return out


ENCODERS = {"IQ4_NL": iq4_nl, "IQ4_XS": iq4_xs}
