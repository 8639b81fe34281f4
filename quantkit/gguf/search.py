"""ggml's scale searches (`make_qx_quants`, `make_q3_quants`, `make_qkx2/3_quants`, `make_qp_quants`), vectorized.

Every function works on many groups at once: `x` is [n, B] float32 — element i of group b at x[i, b] (element-major,
so the sequential sums over the n elements of a group are n vector additions over B groups). The loops here run
over the n positions of a group or over the candidate scales, never over groups. Arithmetic follows the C code
operation by operation in float32 (see `f32ops`), so results are bit-identical to ggml's reference.
"""

from __future__ import annotations

import numpy as np

from quantkit.gguf.f32ops import F32, GROUP_MAX_EPS, first_absmax, nearest_int, seq_min_max, seqsum, wrap_u8


def _clamp(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.minimum(hi, np.maximum(lo, v))


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`: symmetric scale search (19 candidates).

    Returns (scale [B] float32, L [n, B] int32 in 0..2*nmax-1). Weights are `qw` or x^2 when None."""
    mx = first_absmax(x, axis=0)
    all_zero = np.abs(mx) < GROUP_MAX_EPS
    safe_max = np.where(all_zero, F32(1.0), mx).astype(np.float32)
    w = qw if qw is not None else x * x
    wx = w * x

    def candidate(iscale):
        l = _clamp(nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(np.float32)
        return l, seqsum(wx * lf), seqsum(w * lf * lf)

    iscale = F32(-nmax) / safe_max
    l, sumlx, suml2 = candidate(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0)).astype(np.float32)
    best = scale * sumlx
    L = l + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / safe_max
        l, sumlx, suml2 = candidate(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                new_scale = sumlx / suml2
            L = np.where(better, l + nmax, L)
            scale = np.where(better, new_scale, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(all_zero, 0, L)
    scale = np.where(all_zero, F32(0.0), scale).astype(np.float32)
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """`make_q3_quants(n, nmax, x, L, do_rmse=true)`: RTN at -nmax/max, then up to 5 coordinate-descent passes
    (weights x^2). Returns (scale [B], L [n, B] int32 in 0..2*nmax-1)."""
    n = x.shape[0]
    mx = first_absmax(x, axis=0)
    all_zero = np.abs(mx) < GROUP_MAX_EPS
    safe_max = np.where(all_zero, F32(1.0), mx).astype(np.float32)
    iscale = F32(-nmax) / safe_max
    L = _clamp(nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    Lf = L.astype(np.float32)
    sumlx = seqsum(wx * Lf)
    suml2 = seqsum(w * Lf * Lf)
    # A pass without any change leaves the state as it was, so running all 5 passes equals C's early break.
    for _ in range(5):
        for i in range(n):
            li = L[i].astype(np.float32)
            slx = sumlx - wx[i] * li
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                sl2 = suml2 - w[i] * li * li
                new_l = _clamp(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
                nlf = new_l.astype(np.float32)
                slx2 = slx + wx[i] * nlf
                sl22 = sl2 + w[i] * nlf * nlf
                accept = (slx > 0) & (new_l != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(accept, new_l, L[i])
            sumlx = np.where(accept, slx2, sumlx)
            suml2 = np.where(accept, sl22, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0)).astype(np.float32)
    L = np.where(all_zero, 0, L + nmax)
    scale = np.where(all_zero, F32(0.0), scale).astype(np.float32)
    return scale, L


def make_qkx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, degenerate_if_le: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`make_qkx2_quants` (degenerate_if_le=False) / `make_qkx3_quants` (True; weights default to x^2):
    asymmetric scale + min search over `nstep+1` candidate ranges with a weighted least-squares refit.

    Returns (scale [B], the_min [B] (the positive amount subtracted), L [n, B] int32 in 0..nmax)."""
    w = weights if weights is not None else x * x
    mn, mx = seq_min_max(x)
    sum_w = w[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        sum_w += w[i]
        sum_x += w[i] * x[i]
    mn = np.where(mn > 0, F32(0.0), mn).astype(np.float32)
    degenerate = (mx <= mn) if degenerate_if_le else (mx == mn)
    rng = np.where(degenerate, F32(1.0), mx - mn).astype(np.float32)
    xm = x - mn

    def err(diff):
        return np.abs(diff) if use_mad else diff * diff

    iscale = F32(nmax) / rng
    scale = F32(1.0) / iscale
    L = _clamp(nearest_int(iscale * xm), 0, nmax)
    best_error = seqsum(w * err(scale * L.astype(np.float32) + mn - x))
    # C updates `min` when a candidate wins, and later candidates use the updated min (in `max - min` and
    # `x - min`): keep that.
    mn_best = mn.copy()
    if nstep >= 1:
        for step in range(nstep + 1):
            if step:
                rng = np.where(degenerate, F32(1.0), mx - mn_best).astype(np.float32)
                xm = x - mn_best
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / rng
            laux = _clamp(nearest_int(iscale * xm), 0, nmax)
            lf = laux.astype(np.float32)
            wl = w * lf
            sum_l = seqsum(wl)
            sum_l2 = seqsum(wl * lf)
            sum_xl = seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                pos = this_min > 0
                this_min = np.where(pos, F32(0.0), this_min).astype(np.float32)
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(np.float32)
                cur_error = seqsum(w * err(this_scale * lf + this_min - x))
            better = (D > 0) & (cur_error < best_error)
            if better.any():
                L = np.where(better, laux, L)
                best_error = np.where(better, cur_error, best_error)
                scale = np.where(better, this_scale, scale)
                mn_best = np.where(better, this_min, mn_best)
    L = np.where(degenerate, 0, L)
    scale = np.where(degenerate, F32(0.0), scale).astype(np.float32)
    the_min = -np.where(degenerate, mn, mn_best).astype(np.float32)
    return scale, the_min, L


def make_qp_quants(x: np.ndarray, nmax: int, quant_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`make_qp_quants(n, nmax, x, L, quant_weights)`: unsigned scale for non-negative values (sub-block scales
    or mins), search over 9 candidates then 5 coordinate-descent passes. Returns (scale [B], L [n, B] 0..nmax)."""
    n = x.shape[0]
    w = quant_weights
    mx = np.zeros(x.shape[1:], dtype=np.float32)
    for i in range(n):
        mx = np.maximum(mx, x[i])  # MAX(max, x[i]) with max starting at 0
    all_zero = mx < GROUP_MAX_EPS
    safe_max = np.where(all_zero, F32(1.0), mx).astype(np.float32)
    iscale = F32(nmax) / safe_max
    L0 = wrap_u8(nearest_int(iscale * x))  # stored into uint8 L[] without clamp
    scale = F32(1.0) / iscale
    d0 = x - scale * L0.astype(np.float32)
    best_mse = seqsum(w * d0 * d0)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / safe_max
        scale_is = F32(1.0) / iscale_is
        l = np.minimum(nmax, nearest_int(iscale_is * x))
        diff = x - scale_is * l.astype(np.float32)
        mse = seqsum(w * diff * diff)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, iscale_is, iscale).astype(np.float32)
    l = np.minimum(nmax, nearest_int(iscale * x))
    L = wrap_u8(l)  # uint8 L[], but the sums use the int l
    lf = l.astype(np.float32)
    wx = w * x
    sumlx = seqsum(wx * lf)
    suml2 = seqsum(w * lf * lf)
    for _ in range(5):
        for i in range(n):
            li = L[i].astype(np.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                new_l = np.minimum(nmax, nearest_int(x[i] * sl2 / slx))
                nlf = new_l.astype(np.float32)
                slx2 = slx + wx[i] * nlf
                sl22 = sl2 + w[i] * nlf * nlf
                accept = (slx > 0) & (sl2 > 0) & (new_l != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(accept, wrap_u8(new_l), L[i])
            sumlx = np.where(accept, slx2, sumlx)
            suml2 = np.where(accept, sl22, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = np.where(suml2 > 0, sumlx / suml2, F32(0.0)).astype(np.float32)
    L = np.where(all_zero, 0, L)
    result = np.where(all_zero, F32(0.0), result).astype(np.float32)
    return result, L
