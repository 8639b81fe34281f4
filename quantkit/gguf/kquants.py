"""k-quant encoders (super-blocks of 256): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

`x` is [n_superblocks, 256] float32; `qw` (optional) is the importance of each element's column, same shape.
Without `qw` each function is ggml's `quantize_row_qX_K_ref` (what `llama-quantize` runs without an imatrix);
with `qw` it is `quantize_row_qX_K_impl(…, quant_weights)`. Both return the block bytes [n, type_size] uint8.

Steps shared by all: search every sub-block's scale (and min) on the float weights (`search`), quantize the
sub-block scales against one fp16 super-block scale, then re-quantize every weight with the fp16-rounded
effective scale — exactly as the C code does, including its corner cases (a sub-block whose effective scale is 0
keeps the codes of the search; narrowing to uint8/int8 wraps).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quantkit.ggml_types import f16_to_f32, f32_to_f16
from quantkit.gguf import search
from quantkit.gguf.f32ops import F32, GROUP_MAX_EPS, first_absmax, nearest_int, seqsum, wrap_i8, wrap_u8

QK_K = 256


def _sub(x: np.ndarray, size: int) -> np.ndarray:
    """[N, 256] -> element-major sub-blocks [size, N*256/size] (contiguous)."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K `scales[12]` -> (sc [n, 8], m [n, 8]) 6-bit values (get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    lo_sc, lo_m, mixed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (mixed & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 63, (mixed >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, m


def q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """Q3_K `scales[12]` -> the 16 unsigned 6-bit values (bias 32 not removed) [n, 16]."""
    s = scales.astype(np.uint8)
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    high = (s[:, 8:12][:, None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]) & 3  # [n, 4(s//4), 4(s%4)]
    return low | (high.reshape(-1, 16) << 4)


def pack_q3_k_scales(ls: np.ndarray) -> np.ndarray:
    """Inverse of `q3_k_scales`: 6-bit values [n, 16] -> scales[12] bytes."""
    ls = ls.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (ls[:, 0:8] & 0x0F) | ((ls[:, 8:16] & 0x0F) << 4)
    hi = (ls >> 4).reshape(-1, 4, 4)  # [n, s//4, s%4]
    out[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return out


def _superblock_sigma2(x: np.ndarray) -> np.ndarray:
    """sum of x^2 over each super-block, summed in order: [N]."""
    xt = np.ascontiguousarray(x.T)
    return seqsum(xt * xt)


def _positive_max(v: np.ndarray) -> np.ndarray:
    """C's `float m = 0; for (...) if (v[j] > m) m = v[j];` over axis 1 (a -0.0 never replaces the +0.0)."""
    m = v.max(axis=1)
    return np.where(m > 0, m, F32(0)).astype(np.float32)


def _requant(x: np.ndarray, search_codes: Callable[[np.ndarray], np.ndarray], dq: np.ndarray,
             dm: np.ndarray | None, lo: int, hi: int, offset: int) -> np.ndarray:
    """`l = clamp(nearest_int((x + dm)/d), lo, hi) + offset` per sub-block where d != 0; the sub-blocks with d == 0
    keep the codes of the search, `search_codes(sub-block indices)` -> [size, k] (sub-block index = n*S + s).

    x [N, S, size]; dq, dm [N, S]. Returns int32 [N, S, size]."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        v = (x + dm[:, :, None]) / dq[:, :, None] if dm is not None else x / dq[:, :, None]
        l = np.minimum(hi, np.maximum(lo, nearest_int(v))) + offset
    kept = np.flatnonzero(dq == 0)
    if kept.size:
        l.reshape(-1, x.shape[-1])[kept] = search_codes(kept).T
    return l


def pack_2bit(L: np.ndarray) -> np.ndarray:
    """[N, 256] codes 0..3 -> qs [N, 64]: qs[32h + l] = L[128h+l] | L[128h+32+l]<<2 | L[+64]<<4 | L[+96]<<6."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_k4_scales_exact(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The C packing of Q4_K/Q5_K sub-block scales with uint8 arithmetic (no masking of out-of-range values)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    s = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    s[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return s


# ------------------------------------------------------------------------------------------- Q4_K / Q5_K

def _q45_k(x: np.ndarray, qw: np.ndarray | None, nmax: int):
    n = x.shape[0]
    xs = _sub(x, 32)
    if qw is None:
        sum_x2 = seqsum(xs * xs)
        av_x = np.sqrt(sum_x2 / F32(32))
        w = av_x + np.abs(xs)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = search.make_qkx_quants(xs, nmax, w, rmin, 0.1, nstep, use_mad=False)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(np.float32)
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(np.float32)
        ls = np.minimum(63, wrap_u8(nearest_int(inv_scale[:, None] * scales)))
        lm = np.minimum(63, wrap_u8(nearest_int(inv_min[:, None] * mins)))
        d_val, m_val = max_scale / F32(63), max_min / F32(63)
    else:
        sigma2 = F32(2) * _superblock_sigma2(x) / F32(QK_K)
        w = qw * np.sqrt(sigma2[:, None] + x * x)
        ws = _sub(w, 32)
        sw = seqsum(ws)
        scales, mins, L = search.make_qkx_quants(xs, nmax, ws, -0.9, 0.05, 36, use_mad=False, degenerate_if_le=True)
        swt = np.ascontiguousarray(sw.reshape(n, 8).T)
        d_val, ls = search.make_qp_quants(np.ascontiguousarray(scales.reshape(n, 8).T), 63, swt)
        m_val, lm = search.make_qp_quants(np.ascontiguousarray(mins.reshape(n, 8).T), 63, swt)
        ls, lm = ls.T, lm.T
        if nmax == 31:  # quantize_row_q5_K_impl clamps, q4_K_impl does not
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    scale_bytes = _pack_k4_scales_exact(ls, lm)
    d16, dmin16 = f32_to_f16(d_val), f32_to_f16(m_val)
    sc, m = scale_min_k4(scale_bytes)
    dq = f16_to_f32(d16)[:, None] * sc.astype(np.float32)
    dm = f16_to_f32(dmin16)[:, None] * m.astype(np.float32)
    L = _requant(x.reshape(n, 8, 32), L.take, dq, dm, 0, nmax, 0).reshape(n, QK_K)
    return d16, dmin16, scale_bytes, L.astype(np.uint8)


def pack_q4_k_codes(L: np.ndarray) -> np.ndarray:
    """codes [N, 256] 0..15 -> qs [N, 128]."""
    q = L.astype(np.uint8).reshape(-1, 4, 2, 32)
    return ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)


def pack_q5_k_codes(L: np.ndarray) -> np.ndarray:
    """codes [N, 256] 0..31 -> qh [N, 32] + qs [N, 128] (bytes 16..176 of the block)."""
    high = (L.reshape(-1, 8, 32) > 15).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    return np.concatenate([np.bitwise_or.reduce(high, axis=1), pack_q4_k_codes(L)], axis=1)


def pack_q6_k_codes(L: np.ndarray) -> np.ndarray:
    """codes [N, 256] 0..63 -> ql [N, 128] + qh [N, 64] (bytes 0..192 of the block)."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.stack([(q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4),
                   (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)], axis=2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql, qh.reshape(-1, 64)], axis=1)


def pack_q3_k_codes(L: np.ndarray) -> np.ndarray:
    """codes [N, 256] 0..7 (signed + 4) -> hmask [N, 32] + qs [N, 64] (bytes 0..96 of the block)."""
    n = L.shape[0]
    high = L > 3
    low = np.where(high, L - 4, L)
    hmask = np.bitwise_or.reduce(high.reshape(n, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None],
                                 axis=1)
    return np.concatenate([hmask, pack_2bit(low)], axis=1)


def q4_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d16, dmin16, scale_bytes, L = _q45_k(x, qw, 15)
    return np.concatenate([d16, dmin16, scale_bytes, pack_q4_k_codes(L)], axis=1)


def q5_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d16, dmin16, scale_bytes, L = _q45_k(x, qw, 31)
    return np.concatenate([d16, dmin16, scale_bytes, pack_q5_k_codes(L)], axis=1)


# ------------------------------------------------------------------------------------------- Q6_K

def q6_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    n = x.shape[0]
    xs = _sub(x, 16)
    scales, L = search.make_qx_quants(xs, 32, None if qw is None else _sub(qw, 16))
    scales = scales.reshape(n, 16)
    max_scale = first_absmax(scales, axis=1)
    zero_block = np.abs(max_scale) < GROUP_MAX_EPS
    safe = np.where(zero_block, F32(1), max_scale).astype(np.float32)
    iscale = F32(-128) / safe
    d16 = f32_to_f16(F32(1) / iscale)
    sc = wrap_i8(np.minimum(127, nearest_int(iscale[:, None] * scales)))
    dq = f16_to_f32(d16)[:, None] * sc.astype(np.float32)
    L = _requant(x.reshape(n, 16, 16), L.take, dq, None, -32, 31, 32)
    out = np.concatenate([pack_q6_k_codes(L.reshape(n, QK_K)), sc.astype(np.int8).view(np.uint8), d16], axis=1)
    out[zero_block] = 0
    return out


# ------------------------------------------------------------------------------------------- Q3_K

def q3_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    n = x.shape[0]
    xs = _sub(x, 16)
    if qw is None:
        scales, L3 = search.make_q3_quants(xs, 4)
        search_codes = lambda groups: L3[:, groups]  # noqa: E731
        scales = scales.reshape(n, 16)
        max_scale = first_absmax(scales, axis=1)
        nonzero = max_scale != 0
        safe = np.where(nonzero, max_scale, F32(1)).astype(np.float32)
        iscale = F32(-32) / safe
        ls = np.minimum(31, np.maximum(-32, wrap_i8(nearest_int(iscale[:, None] * scales)))) + 32
        scale_bytes = np.where(nonzero[:, None], pack_q3_k_scales(ls), np.uint8(0))
        d16 = f32_to_f16(np.where(nonzero, F32(1) / iscale, F32(0)))
    else:
        sigma2 = F32(2) * _superblock_sigma2(x) / F32(QK_K)
        w = qw * np.sqrt(sigma2[:, None] + x * x)
        ws = _sub(w, 16)
        sw = seqsum(ws)
        scales, codes = search.make_qx_quants(xs, 4, ws)
        search_codes = codes.take
        d_block, ls = search.make_qx_quants(np.ascontiguousarray(scales.reshape(n, 16).T), 32,
                                            np.ascontiguousarray(sw.reshape(n, 16).T))
        scale_bytes = pack_q3_k_scales(ls.take().T)
        d16 = f32_to_f16(d_block)
    sc = q3_k_scales(scale_bytes).astype(np.int32) - 32
    dq = f16_to_f32(d16)[:, None] * sc.astype(np.float32)
    L = _requant(x.reshape(n, 16, 16), search_codes, dq, None, -4, 3, 4).reshape(n, QK_K)
    return np.concatenate([pack_q3_k_codes(L), scale_bytes, d16], axis=1)


# ------------------------------------------------------------------------------------------- Q2_K

def q2_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    n = x.shape[0]
    xs = _sub(x, 16)
    if qw is None:
        scales, mins, L = search.make_qkx_quants(xs, 3, np.abs(xs), -0.5, 0.1, 15, use_mad=True)
        scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        with np.errstate(divide="ignore"):
            i_s = np.where(max_scale > 0, F32(15) / max_scale, F32(0)).astype(np.float32)
            i_m = np.where(max_min > 0, F32(15) / max_min, F32(0)).astype(np.float32)
        s = np.where((max_scale > 0)[:, None], wrap_u8(nearest_int(i_s[:, None] * scales)), 0)
        s = s | np.where((max_min > 0)[:, None], wrap_u8(nearest_int(i_m[:, None] * mins) << 4), 0)
        d16 = f32_to_f16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
        dmin16 = f32_to_f16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    else:
        sigma2 = _superblock_sigma2(x) / F32(QK_K)
        w = qw * np.sqrt(sigma2[:, None] + x * x)
        ws = _sub(w, 16)
        sw = seqsum(ws)
        scales, mins, L = search.make_qkx_quants(xs, 3, ws, -0.9, 0.05, 36, use_mad=False, degenerate_if_le=True)
        swt = np.ascontiguousarray(sw.reshape(n, 16).T)
        dm, ls = search.make_qp_quants(np.ascontiguousarray(scales.reshape(n, 16).T), 15, swt)
        mm, lm = search.make_qp_quants(np.ascontiguousarray(mins.reshape(n, 16).T), 15, swt)
        s = wrap_u8(ls.T | (lm.T << 4))
        d16, dmin16 = f32_to_f16(dm), f32_to_f16(mm)
    s = s.astype(np.uint8)
    dq = f16_to_f32(d16)[:, None] * (s & 0x0F).astype(np.float32)
    dm_ = f16_to_f32(dmin16)[:, None] * (s >> 4).astype(np.float32)
    L = _requant(x.reshape(n, 16, 16), L.take, dq, dm_, 0, 3, 0).reshape(n, QK_K)
    return np.concatenate([s, pack_2bit(L), d16, dmin16], axis=1)


ENCODERS = {"Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
