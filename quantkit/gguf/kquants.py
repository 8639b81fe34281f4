"""k-quant encoders (super-blocks of 256): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

`x` is [n_superblocks, 256] float32; `qw` (optional) is the importance of each element's column, same shape.
Without `qw` each function is ggml's `quantize_row_qX_K_ref` (what `llama-quantize` runs without an imatrix);
with `qw` it is `quantize_row_qX_K_impl(…, quant_weights)`. Both return the block bytes [n, type_size] uint8.

Steps shared by all: search every sub-block's scale (and min) on the float weights (`search`; Q3_K and Q6_K have
their own faster forms of make_q3_quants / make_qx_quants here), quantize the sub-block scales against one fp16
super-block scale, then re-quantize every weight with the fp16-rounded effective scale — exactly as the C code
does, including its corner cases (a sub-block whose effective scale is 0 keeps the codes of the search; narrowing
to uint8/int8 wraps).

Q3_K and Q6_K also exist in C++ (`csrc/kquants.cpp`, loaded by `native.py`; `encode.SEARCHED_ENCODERS` uses them where
a compiler exists): these numpy forms are their reference and their fallback.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np

from quantkit.ggml_types import f16_to_f32, f32_to_f16
from quantkit.gguf import search
from quantkit.gguf.f32ops import F32, GROUP_MAX_EPS, MAGIC, nearest_int, seqsum, sumsq_rows, wrap_u8

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
        sigma2 = F32(2) * sumsq_rows(x) / F32(QK_K)
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


def q4_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d16, dmin16, scale_bytes, L = _q45_k(x, qw, 15)
    return np.concatenate([d16, dmin16, scale_bytes, pack_q4_k_codes(L)], axis=1)


def q5_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d16, dmin16, scale_bytes, L = _q45_k(x, qw, 31)
    return np.concatenate([d16, dmin16, scale_bytes, pack_q5_k_codes(L)], axis=1)


# ------------------------------------------------------------------------------------------- Q6_K / Q3_K
#
# Q3_K and Q6_K have their own, faster forms of the searches (`_qx_search`: make_qx_quants, `_q3_search`:
# make_q3_quants) and of the final re-quantization: the same float32 operations in the same order as ggml's C (so
# the same bytes as `search.make_qx_quants` / `search.make_q3_quants` + `_requant`), arranged for numpy's
# one-pass-per-operation style:
# - batches of _BATCH sub-blocks, so that every pass runs over contiguous arrays that stay in the core's L2 cache;
# - work buffers (`_ws`) kept from call to call, page-aligned: touching fresh memory costs a page fault per 4 KiB
#   (~2 us on a VM, i.e. more than the passes over it), and numpy's own allocations land 16 bytes apart modulo
#   4 KiB, where a ufunc that writes one buffer while reading another runs at half speed (4K aliasing);
# - no np.where / masked copies on unpredictable masks (numpy branches per element there: ~20x slower); sparse
#   updates go by index.

# sub-blocks per batch: [16, 2048] float32 arrays are 128 KiB, so a search's work arrays stay in L2
_BATCH = 2048

# the 18 later candidate scales of make_qx_quants(rmse_type=1): `-(nmax + 0.1f*is)/max`, is = -9..9, is != 0
_QX_STEPS = np.array([*range(-9, 0), *range(1, 10)], dtype=np.float32)

_NI_BIAS = 0x00400000  # nearest_int(f) = (bits(f + MAGIC) & 0x7FFFFF) - _NI_BIAS
_NO_KEY = np.iinfo(np.int64).max
_MAGIC_BITS = int(MAGIC.view(np.int32))  # 0x4B400000: the float MAGIC + l for a small integer l is these + l

try:  # np.clip without its Python wrapper (a few us per call, and the searches make hundreds of calls)
    from numpy._core.umath import clip as _clip
except ImportError:  # pragma: no cover - other numpy layouts
    _clip = np.clip

_local = threading.local()
_WS_KEEP = 32 << 20


def _empty(shape, dtype=np.float32) -> np.ndarray:
    """np.empty starting on a 4 KiB boundary (see the notes above)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 4096, dtype=np.uint8)
    off = -raw.ctypes.data % 4096
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def _ws(name: str, shape, dtype=np.float32) -> np.ndarray:
    """This thread's work buffer `name` as a contiguous array of `shape`: page-aligned, grown when too small and
    otherwise kept from call to call (see the notes above; a few MiB per thread for the usual 2^18-element chunks;
    buffers over _WS_KEEP bytes are not kept). A name is one buffer: callers and callees use different names."""
    views = _local.__dict__.setdefault("views", {})
    key = (name, shape, dtype)
    view = views.get(key)
    if view is None:
        if len(views) > 512:  # shapes vary from call to call: keep the cache of views small
            views.clear()
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > _WS_KEEP:
            return _empty(shape, dtype)
        bufs = _local.__dict__.setdefault("bufs", {})
        buf = bufs.get(name)
        if buf is None or buf.size < nbytes:
            buf = bufs[name] = _empty((max(nbytes, 4096),), np.uint8)
            for stale in [k for k in views if k[0] == name]:
                del views[stale]
        view = views[key] = buf[:nbytes].view(dtype).reshape(shape)
    return view


def _ws_slabs(name: str, k: int, shape, dtype=np.float32) -> np.ndarray:
    """k work arrays of `shape` as one [k, *shape] array (a `_ws` buffer) whose slabs each start on a 4 KiB
    boundary: slabs of arbitrary size packed back to back could start 16..48 bytes apart modulo 4 KiB."""
    count = math.prod(shape)
    itemsize = np.dtype(dtype).itemsize
    stride = -(-count * itemsize // 4096) * 4096 // itemsize
    return _ws(name, (k, stride), dtype)[:, :count].reshape(k, *shape)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The `max` of make_qx_quants / make_q3_quants over axis 0 of [n, B]: `if (fabsf(x[i]) > amax) { amax =
    fabsf(x[i]); max = x[i]; }` from amax = 0, i.e. the value of largest magnitude, the first one when both +a and
    -a occur (and never a NaN). From two fast column reductions: the magnitude is max(hi, -lo), its sign that of
    hi + lo (exact in sign); the columns where that does not decide (a tie between +a and -a, +inf and -inf, a
    NaN) take C's loop (`_c_absmax`)."""
    hi = x.max(axis=0)
    lo = x.min(axis=0)
    s = hi + lo
    np.negative(lo, out=lo)
    mx = np.copysign(np.maximum(hi, lo), s)
    redo = np.flatnonzero(~(np.abs(s) > 0) & (hi != 0))  # s is 0 (not all zero) or NaN
    if redo.size:
        mx[redo] = _c_absmax(x[:, redo])
    return mx


def _c_absmax(x: np.ndarray) -> np.ndarray:
    """`_signed_absmax` as C's loop, position by position (for the few columns that need it)."""
    amax = np.zeros(x.shape[1:], dtype=np.float32)
    mx = np.zeros(x.shape[1:], dtype=np.float32)
    for row in x:
        a = np.abs(row)
        upd = a > amax
        amax[upd] = a[upd]
        mx[upd] = row[upd]
    return mx


def _seqsum(terms: np.ndarray, out: np.ndarray) -> np.ndarray:
    """C's `float s = 0; for (i = 0; i < n; ++i) s += t[i];` over axis -2 of [..., n, m] into out [..., m]:
    numpy reduces with the n rows as the outer loop (sequentially) while the inner axis has 2+ elements; with
    one column it would sum pairwise, hence the loop there (as `seqsum`)."""
    if terms.shape[-1] >= 2:
        return np.add.reduce(terms, axis=-2, initial=F32(0), out=out)
    out[...] = 0
    for i in range(terms.shape[-2]):
        out += terms[..., i, :]
    return out


def _qx_search(xt: np.ndarray, wt: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's `make_qx_quants(n, nmax, x, L, rmse_type=1, w)` of every column of xt [n, B] (any strides, e.g. the
    transposed view of [N, 256] super-blocks) with weights wt [n, B] (the imatrix weights; None: x*x, what
    rmse_type 1 uses without them). Returns (scale [B], the winning iscale [B], all-zero columns [B]): the codes
    are `clamp(nearest_int(iscale*x), -nmax, nmax-1) + nmax` (0 where all-zero), which `_qx_codes` recomputes for
    the few columns that need them. Same values as `search.make_qx_quants`.

    Batch by batch, the 19 candidates (`-nmax/max`, then `-(nmax + 0.1f*is)/max`) are evaluated one after the
    other on contiguous [n, batch] arrays: codes, `sumlx += w*x*l` and `suml2 += w*l*l`, each sum sequential over
    the n elements in float32 (np.add.reduce over axis 0, as `seqsum`). C's running choice (`if (suml2 > 0 &&
    sumlx*sumlx > best*suml2) { scale = sumlx/suml2; best = scale*sumlx; }`) then runs over the candidates on [B]
    vectors, keeping the winner's index rather than its codes."""
    n, B = xt.shape
    k = 1 + _QX_STEPS.size
    iscales = _ws("qx_iscales", (k, B))
    sums = _ws("qx_sums", (k, 2, B))  # sumlx, suml2 of every candidate
    all_zero = np.empty(B, dtype=bool)
    lo, hi = F32(-nmax), F32(nmax - 1)
    num = -(F32(nmax) + F32(0.1) * _QX_STEPS)
    for c0 in range(0, B, _BATCH):
        c1 = min(B, c0 + _BATCH)
        xb, wb, wxb, lf, terms_x, terms_2 = slabs = _ws_slabs("qx", 6, (n, c1 - c0))
        terms = slabs[4:]
        np.copyto(xb, xt[:, c0:c1])
        mx = _signed_absmax(xb)
        az = np.abs(mx) < GROUP_MAX_EPS
        all_zero[c0:c1] = az
        mx[az] = 1
        np.divide(F32(-nmax), mx, out=iscales[0, c0:c1])
        np.divide(num[:, None], mx[None, :], out=iscales[1:, c0:c1])
        if wt is None:
            np.multiply(xb, xb, out=wb)
        else:
            np.copyto(wb, wt[:, c0:c1])
        np.multiply(wb, xb, out=wxb)
        for r in range(k):
            np.copyto(lf, iscales[r, c0:c1])  # (a broadcast copy and a plain product beat a broadcast product)
            lf *= xb
            # |iscale * x| <= nmax + 0.9 (max is the largest |x|), so np.rint equals nearest_int here
            np.rint(lf, out=lf)
            _clip(lf, lo, hi, out=lf)
            np.multiply(wxb, lf, out=terms_x)  # w*x[i]*l
            np.multiply(wb, lf, out=terms_2)  # w*l*l
            terms_2 *= lf
            _seqsum(terms, out=sums[r, :, c0:c1])
    sumlx, suml2 = sums[:, 0], sums[:, 1]
    # C's running choice, candidate by candidate on [B] vectors (after the first few candidates, few columns
    # change their choice: those are updated by index)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        best = sumlx[0] / suml2[0]
        best[suml2[0] == 0] = 0  # scale = suml2 ? sumlx/suml2 : 0
        best *= sumlx[0]  # best = scale * sumlx
        win = np.zeros(B, dtype=np.int32)
        sq = np.empty(B, dtype=np.float32)
        prod = np.empty(B, dtype=np.float32)
        better = np.empty(B, dtype=bool)
        positive = np.empty(B, dtype=bool)
        for r in range(1, k):
            np.multiply(best, suml2[r], out=prod)
            np.multiply(sumlx[r], sumlx[r], out=sq)
            np.greater(sq, prod, out=better)  # sumlx*sumlx > best*suml2
            better &= np.greater(suml2[r], 0, out=positive)  # suml2 > 0
            idx = better.nonzero()[0]
            if idx.size:
                sx = sumlx[r, idx]
                best[idx] = sx / suml2[r, idx] * sx  # scale = sumlx/suml2; best = scale*sumlx
                win[idx] = r
        cols = np.arange(B)
        scale = sumlx[win, cols] / suml2[win, cols]
    scale[(win == 0) & (suml2[0] == 0)] = 0
    scale[all_zero] = 0
    return scale, iscales[win, cols], all_zero


def _qx_codes(x16: np.ndarray, iscale: np.ndarray, all_zero: np.ndarray, nmax: int, groups: np.ndarray) -> np.ndarray:
    """make_qx_quants' codes `nmax + MAX(-nmax, MIN(nmax-1, nearest_int(iscale*x)))` (0 for an all-zero group) of
    the given groups: x16 [G, 16] (one group a row) -> int32 [16, len(groups)]."""
    with np.errstate(invalid="ignore", over="ignore"):
        l = np.minimum(nmax - 1, np.maximum(-nmax, nearest_int(iscale[groups, None] * x16[groups]))) + nmax
    return np.where(all_zero[groups, None], 0, l).T.astype(np.int32)


def _q3_search(x: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """ggml's `make_q3_quants(16, 4, x, L, do_rmse=true)` of every sub-block of x [N, 256]: RTN at -4/max, then up
    to 5 coordinate-descent passes with weights x^2. Returns (scale [N*16], a function sub-block indices -> their
    codes int32 [16, k] in 0..7); the same values as `search.make_q3_quants` on `_sub(x, 16)`. Call with numpy's
    floating-point warnings off.

    The descent (`_q3_round`) can only change something where max < 0. With max > 0 the codes have the opposite
    sign of x, so every term w*x*l of sumlx is <= 0, and `slx = sumlx - w*x[i]*L[i]` (the other terms' sum,
    rounded) is never > 0: C leaves those sub-blocks as they are. So a first pass finds every sub-block's max,
    then the sub-blocks with max < 0 are processed first, in batches: RTN start and sums, and the descent's first
    round; the ones that changed are gathered and run the later rounds together. The others only get their RTN
    sums.

    The codes are only needed for the rare sub-blocks whose quantized scale is 0: `search.make_q3_quants`
    recomputes them (sub-blocks are independent)."""
    n = 16
    nmax = 4
    B = x.shape[0] * 16
    x16 = x.reshape(-1, 16)
    xt = x16.T
    # max of every sub-block first: the sub-blocks the descent can change (max < 0) are then processed apart
    mx = np.empty(B, dtype=np.float32)
    for c0 in range(0, B, _BATCH):
        xb = _ws("q3_x", (n, min(B, c0 + _BATCH) - c0))
        np.copyto(xb, xt[:, c0:c0 + xb.shape[1]])
        mx[c0:c0 + xb.shape[1]] = _signed_absmax(xb)
    zero = np.abs(mx) < GROUP_MAX_EPS
    live = (mx < 0) & ~zero
    mx[zero] = 1
    order = np.argsort(~live, kind="stable")  # the sub-blocks in processing order: those in descent first
    n_live = int(np.count_nonzero(live))
    sums = np.empty((2, B), dtype=np.float32)  # sumlx, suml2, in processing order
    lo, hi = F32(-nmax), F32(nmax - 1)
    moving, moving_cols, moving_place = [], [], []  # x and codes + MAGIC of the sub-blocks still moving, ...
    for g0, g1 in [(a, min(n_live, a + _BATCH)) for a in range(0, n_live, _BATCH)] + \
                  [(a, min(B, a + _BATCH)) for a in range(n_live, B, _BATCH)]:
        g = order[g0:g1]
        m = g.size
        slabs = _ws_slabs("q3_batch", 7, (n, m))
        xb, TX, T2, Lm, w, wx = slabs[:6]  # x, the terms w*x*L of sumlx and w*L*L of suml2, codes + MAGIC
        rows = np.take(x16, g, axis=0, out=_ws("q3_rows", (m, n)), mode="clip")
        np.copyto(xb, rows.T)
        iscale = F32(-nmax) / mx[g]
        np.multiply(xb, iscale, out=Lm)  # |iscale * x| <= nmax: np.rint equals nearest_int
        np.rint(Lm, out=Lm)
        _clip(Lm, lo, hi, out=Lm)
        np.multiply(xb, xb, out=w)  # float w = x[i]*x[i]
        np.multiply(w, xb, out=wx)
        np.multiply(wx, Lm, out=TX)  # w*x[i]*l
        np.multiply(w, Lm, out=T2)  # w*l*l
        np.multiply(T2, Lm, out=T2)
        s = _seqsum(slabs[1:3], out=sums[:, g0:g1])
        if g0 < n_live:  # the descent's first round
            Lm += MAGIC
            place = np.zeros(m, dtype=np.int64)
            cols = _q3_round(slabs, s, place)
            if cols.size:
                out = _ws(f"q3_moving{len(moving)}", (2, n, cols.size))
                moving.append(np.take(slabs[0:4:3], cols, axis=2, out=out, mode="clip"))
                moving_cols.append(g0 + cols)
                moving_place.append(place[cols])
    if moving:  # the later rounds, on the sub-blocks still moving (processing-order indices `cols`)
        slabs = _ws_slabs("q3_rounds0", 7, (n, sum(c.size for c in moving_cols)))
        np.concatenate(moving, axis=2, out=slabs[0:4:3])
        _q3_terms(slabs)
        cols = np.concatenate(moving_cols)
        place = np.concatenate(moving_place)
        s = sums[:, cols]
        active = None
        rnd = 0
        while True:
            cont = _q3_round(slabs, s, place, active)
            if cont.size == 0 or 2 * cont.size < cols.size:  # gather the columns still moving
                sums[:, cols] = s
                if cont.size == 0:
                    break
                rnd += 1
                nxt = _ws_slabs(f"q3_rounds{rnd % 2}", 7, (n, cont.size))
                np.take(slabs[0:4:3], cont, axis=2, out=nxt[0:4:3], mode="clip")
                _q3_terms(nxt)
                slabs, cols, s, place, active = nxt, cols[cont], s[:, cont], place[cont], None
            else:
                active = np.zeros(cols.size, dtype=bool)
                active[cont] = True
    sumlx, suml2 = sums
    ordered = sumlx / suml2
    ordered[~(suml2 > 0)] = 0  # C: suml2 > 0 ? sumlx/suml2 : 0
    scale = np.empty(B, dtype=np.float32)
    scale[order] = ordered
    scale[zero] = 0  # an all-zero sub-block
    def codes(groups: np.ndarray) -> np.ndarray:
        xg = np.ascontiguousarray(x.reshape(-1, 16)[groups].T)
        return search.make_q3_quants(xg, nmax)[1]

    return scale, codes


def _q3_terms(slabs: np.ndarray) -> None:
    """The terms w*x[i]*L[i] and w*L[i]*L[i] (slabs 1, 2) from x and the codes + MAGIC (slabs 0, 3), as C
    computes them (w = x*x); slabs 4, 5 are work space. Cheaper than gathering them along with x and the codes."""
    x, TX, T2, Lm, w, L = slabs[:6]
    np.subtract(Lm, MAGIC, out=L)
    np.multiply(x, x, out=w)
    np.multiply(w, x, out=TX)
    TX *= L
    np.multiply(w, L, out=T2)
    T2 *= L


def _q3_round(slabs: np.ndarray, sums: np.ndarray, place: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """One round of make_q3_quants' coordinate descent (`for (itry = 0; itry < 5; ++itry) { for (i = 0; i < n;
    ++i) ... }`, stopping after a pass that changed nothing) on m columns: slabs [7, 16, m] = x, the terms
    TX = w*x*L of sumlx and T2 = w*L*L of suml2, codes + MAGIC, then three work slabs; sums [2, m] = sumlx,
    suml2; C's place in its loops place[m] = 16*itry + i (columns outside `active` skipped). Applies at most one
    change per column, in place; returns the columns whose descent goes on.

    C's test (`new_l = nearest_int(x[i]*sl2/slx)` from the sums without element i, accepted if it differs and
    raises sumlx^2/suml2) is evaluated at all 16 positions at once, from the current sums: until the next
    accepted change those sums do not move, so each position's test is the one C makes when its loop gets there.
    The first accepted position after the column's place, wrapping into the next pass (there is one when this
    pass has changed something, i.e. i > 0, and itry < 4: place + distance < 80) is applied, and the column goes
    on after it; a column with none is finished. The dense part finds the positions where `new_l != L[i]`; those
    few get the rest of the test, exactly, on gathered values."""
    n, m = slabs.shape[1:]
    x, Lm, v = slabs[0], slabs[3], slabs[6]
    cand = _ws("q3_cand", (n, m), dtype=bool)
    np.subtract(sums[:, None, :], slabs[1:3], out=slabs[4:6])  # slx = sumlx - w*x[i]*L[i], sl2 = suml2 - w*L*L
    np.multiply(x, slabs[5], out=v)  # x[i] * sl2 / slx
    np.divide(v, slabs[4], out=v)
    np.add(v, MAGIC, out=v)
    bits = v.view(np.int32)
    bits &= 0x007FFFFF  # nearest_int(x[i]*sl2/slx) + _NI_BIAS
    _clip(bits, _NI_BIAS - 4, _NI_BIAS + 3, out=bits)  # MAX(-nmax, MIN(nmax-1, new_l))
    bits |= _MAGIC_BITS - _NI_BIAS  # now the float MAGIC + new_l, which compares with the code + MAGIC
    np.not_equal(bits, Lm.view(np.int32), out=cand)  # new_l != L[i]
    if active is not None:
        cand &= active
    f = cand.ravel().nonzero()[0]
    xf, slxf, sl2f, nlm = (slabs[i].ravel()[f] for i in (0, 4, 5, 6))
    j, b = np.divmod(f, m)
    nl = nlm - MAGIC
    wf = xf * xf
    tx = wf * xf
    tx *= nl  # the new terms w*x[i]*new_l
    t2 = wf * nl
    t2 *= nl  # and w*new_l*new_l
    slx2 = slxf + tx  # slx += w*x[i]*new_l
    sl22 = sl2f + t2  # sl2 += w*new_l*new_l
    sxb, s2b = sums[:, b]
    sxb *= sxb
    sxb *= sl22
    lhs = slx2 * slx2
    lhs *= s2b
    acc = lhs > sxb  # slx*slx*suml2 > sumlx*sumlx*sl2
    acc &= np.minimum(slxf, sl22) > 0  # slx > 0, sl2 > 0 (NaN: no)
    # the first accepted position after each column's place (distance key), if C's loops get there
    pb = place[b]
    key = j - pb
    key &= n - 1
    pb += key
    acc &= pb < 5 * n
    a = acc.nonzero()[0]
    key = key[a] << 32
    key |= a
    first = _ws("q3_first", (m,), dtype=np.int64)
    first.fill(_NO_KEY)
    np.minimum.at(first, b[a], key)
    wb = (first != _NO_KEY).nonzero()[0]
    key = first[wb]
    a = key & 0xFFFFFFFF
    fw = f[a]
    slabs[1].ravel()[fw] = tx[a]
    slabs[2].ravel()[fw] = t2[a]
    Lm.ravel()[fw] = nlm[a]
    sums[0, wb] = slx2[a]
    sums[1, wb] = sl22[a]
    pw = place[wb]
    pw += key >> 32
    pw += 1
    place[wb] = pw
    return wb[pw < 5 * n]


def _requant_codes(x: np.ndarray, dq: np.ndarray, search_codes: Callable[[np.ndarray], np.ndarray],
                   lo: int, hi: int) -> np.ndarray:
    """The final loop of quantize_row_q3_K/q6_K: `L = MAX(lo, MIN(hi, nearest_int(x/d))) - lo` with d = dq of the
    element's sub-block of 16, skipped (codes of the search kept) where d == 0. Same values as `_requant`, as
    uint8 [N, 256] (x [N, 256], dq [N, 16]; `search_codes(sub-block indices)` -> [16, k])."""
    n = x.shape[0]
    v = _ws("rq_v", x.shape)
    bits = v.view(np.int32)
    L = _ws("rq_codes", x.shape, dtype=np.uint8)
    np.divide(x.reshape(n, 16, 16), dq[:, :, None], out=v.reshape(n, 16, 16))
    v += MAGIC
    bits &= 0x007FFFFF  # nearest_int + _NI_BIAS
    _clip(bits, np.int32(_NI_BIAS + lo), np.int32(_NI_BIAS + hi), out=bits)
    np.copyto(L, bits, casting="unsafe")  # the low byte: clamp(...) mod 256, as _NI_BIAS is a multiple of 256
    L -= np.uint8(lo & 0xFF)
    kept = np.flatnonzero(dq == 0)
    if kept.size:
        L.reshape(-1, 16)[kept] = search_codes(kept).T
    return L


def _pack_q6_k(L: np.ndarray, dst: np.ndarray) -> None:
    """`pack_q6_k_codes` into dst [N, 192], for codes [N, 256] uint8 0..63 (quantize_row_q6_K's packing). The
    shifts run on 8 codes at a time (uint64 views): with codes in range no bit crosses into the next byte."""
    n = L.shape[0]
    q = L.reshape(n, 2, 4, 32).view(np.uint64)  # [n, 2, 4, 4]
    lo4 = q & np.uint64(0x0F0F0F0F0F0F0F0F)
    ql = lo4[:, :, 0:2] | (lo4[:, :, 2:4] << np.uint64(4))
    h = (q >> np.uint64(4)) & np.uint64(0x0303030303030303)
    qh = h[:, :, 0] | (h[:, :, 1] << np.uint64(2)) | (h[:, :, 2] << np.uint64(4)) | (h[:, :, 3] << np.uint64(6))
    dst[:, 0:128] = ql.view(np.uint8).reshape(n, 128)
    dst[:, 128:192] = qh.view(np.uint8).reshape(n, 64)


def pack_q6_k_codes(L: np.ndarray) -> np.ndarray:
    """codes [N, 256] 0..63 -> ql [N, 128] + qh [N, 64] (bytes 0..192 of the block)."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.stack([(q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4),
                   (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)], axis=2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql, qh.reshape(-1, 64)], axis=1)


def _pack_q3_k(L: np.ndarray, dst: np.ndarray) -> None:
    """`pack_q3_k_codes` into dst [N, 96], for codes [N, 256] uint8 0..7 (quantize_row_q3_K's packing: bit k of
    hmask[m] is L[32k + m] > 3, then the low 2 bits as Q2_K packs them). The shifts run on 8 codes at a time
    (uint64 views): with codes in range no bit crosses into the next byte."""
    n = L.shape[0]
    q = L.reshape(n, 8, 32).view(np.uint64)  # [n, 8, 4]
    h = (q >> np.uint64(2)) & np.uint64(0x0101010101010101)
    hm = h[:, 0].copy()
    for k in range(1, 8):
        hm |= h[:, k] << np.uint64(k)
    low = (q & np.uint64(0x0303030303030303)).reshape(n, 2, 4, 4)
    qs = low[:, :, 0] | (low[:, :, 1] << np.uint64(2)) | (low[:, :, 2] << np.uint64(4)) | (low[:, :, 3] << np.uint64(6))
    dst[:, 0:32] = hm.view(np.uint8).reshape(n, 32)
    dst[:, 32:96] = qs.view(np.uint8).reshape(n, 64)


def pack_q3_k_codes(L: np.ndarray) -> np.ndarray:
    """codes [N, 256] 0..7 (signed + 4) -> hmask [N, 32] + qs [N, 64] (bytes 0..96 of the block)."""
    n = L.shape[0]
    high = L > 3
    low = np.where(high, L - 4, L)
    hmask = np.bitwise_or.reduce(high.reshape(n, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None],
                                 axis=1)
    return np.concatenate([hmask, pack_2bit(low)], axis=1)


def _superblock_absmax(scales: np.ndarray) -> np.ndarray:
    """C's `if (fabsf(scales[j]) > amax) { amax = fabsf(scales[j]); max_scale = scales[j]; }` over the 16
    sub-block scales of each super-block: scales [N*16] -> [N] (`_signed_absmax` on the transposed scales)."""
    return _signed_absmax(np.ascontiguousarray(scales.reshape(-1, 16).T))


def _nearest_int_i8(v: np.ndarray) -> np.ndarray:
    """`int8_t l = nearest_int(v)`: ggml's bit trick, then C's narrowing to int8 (wraps)."""
    bits = (v + MAGIC).view(np.int32) & 0x007FFFFF
    bits -= _NI_BIAS
    return bits.astype(np.int8)


def q6_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """quantize_row_q6_K_ref (qw None) / quantize_row_q6_K_impl with quant_weights."""
    with np.errstate(all="ignore"):  # the C code's inf/NaN corner cases are reproduced, not reported
        return _q6_k(x, qw)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    n = x.shape[0]
    scales, iscale_best, all_zero = _qx_search(x.reshape(-1, 16).T, None if qw is None else qw.reshape(-1, 16).T, 32)
    max_scale = _superblock_absmax(scales)
    zero_block = np.abs(max_scale) < GROUP_MAX_EPS
    max_scale[zero_block] = 1
    iscale = F32(-128) / max_scale
    d16 = f32_to_f16(F32(1) / iscale)
    # y[i].scales[ib] = MIN(127, nearest_int(iscale*scales[ib])): an int8 field
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales.reshape(n, 16))).astype(np.int8)
    dq = f16_to_f32(d16)[:, None] * sc.astype(np.float32)
    search_codes = lambda groups: _qx_codes(x.reshape(-1, 16), iscale_best, all_zero, 32, groups)  # noqa: E731
    out = np.empty((n, 210), dtype=np.uint8)
    _pack_q6_k(_requant_codes(x, dq, search_codes, -32, 31), out)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16
    out[zero_block] = 0
    return out


def q3_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """quantize_row_q3_K_ref (qw None) / quantize_row_q3_K_impl with quant_weights."""
    with np.errstate(all="ignore"):  # the C code's inf/NaN corner cases are reproduced, not reported
        return _q3_k(x, qw)


def _q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    n = x.shape[0]
    if qw is None:
        scales, search_codes = _q3_search(x)
        max_scale = _superblock_absmax(scales)
        nonzero = max_scale != 0
        max_scale[~nonzero] = 1
        iscale = F32(-32) / max_scale
        # int8_t l = nearest_int(iscale*scales[j]); l = MAX(-32, MIN(31, l)) + 32
        ls = np.clip(_nearest_int_i8(iscale[:, None] * scales.reshape(n, 16)), -32, 31) + np.int8(32)
        scale_bytes = pack_q3_k_scales(ls)
        scale_bytes[~nonzero] = 0
        d16 = f32_to_f16(np.where(nonzero, F32(1) / iscale, F32(0)))
        # the 6-bit values unpack to ls (to 0 where all scales are 0, but d is 0 there: every d == 0)
        sc = ls.astype(np.float32) - F32(32)
    else:
        sigma2 = F32(2) * sumsq_rows(x) / F32(QK_K)
        w = qw * np.sqrt(sigma2[:, None] + x * x)
        sw = seqsum(_sub(w, 16))
        scales, iscale_best, all_zero = _qx_search(x.reshape(-1, 16).T, w.reshape(-1, 16).T, 4)
        search_codes = lambda groups: _qx_codes(x.reshape(-1, 16), iscale_best, all_zero, 4, groups)  # noqa: E731
        sc16 = scales.reshape(n, 16)
        d_block, ls_iscale, ls_zero = _qx_search(sc16.T, sw.reshape(n, 16).T, 32)
        ls = _qx_codes(sc16, ls_iscale, ls_zero, 32, np.arange(n))
        scale_bytes = pack_q3_k_scales(ls.T)
        d16 = f32_to_f16(d_block)
        sc = (q3_k_scales(scale_bytes).astype(np.int32) - 32).astype(np.float32)
    dq = f16_to_f32(d16)[:, None] * sc
    out = np.empty((n, 110), dtype=np.uint8)
    _pack_q3_k(_requant_codes(x, dq, search_codes, -4, 3), out)
    out[:, 96:108] = scale_bytes
    out[:, 108:110] = d16
    return out


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
        sigma2 = sumsq_rows(x) / F32(QK_K)
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
