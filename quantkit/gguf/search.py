"""ggml's scale searches (`make_qx_quants`, `make_q3_quants`, `make_qkx2/3_quants`, `make_qp_quants`), vectorized.

Every function works on many groups at once: `x` is [n, B] float32 — element i of group b at x[i, b] (element-major,
so the sequential sums over the n elements of a group are n vector additions over B groups). The loops here run
over the n positions of a group or over the candidate scales, never over groups. Arithmetic follows the C code
operation by operation in float32 (see `f32ops`), so results are bit-identical to ggml's reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantkit.gguf.f32ops import F32, GROUP_MAX_EPS, first_absmax, nearest_int, seqsum, seqsum_first, wrap_u8


@dataclass(frozen=True)
class GridCodes:
    """The codes of a finished scale search, `clamp(nearest_int(iscale * (x - offset)), lo, hi) + shift` per
    group (0 for the `zero` groups), computed on demand.

    The k-quant encoders re-quantize every weight with the final fp16 scales and keep a search's own codes only
    for the rare sub-blocks whose quantized scale is 0, so materializing them for every group would be wasted
    passes over the chunk."""

    x: np.ndarray  # [n, B]
    iscale: np.ndarray  # [B]
    offset: np.ndarray | None  # [B], subtracted from x before scaling
    lo: int
    hi: int
    shift: int
    zero: np.ndarray  # [B] bool

    def take(self, groups: np.ndarray | slice = slice(None)) -> np.ndarray:
        """int32 codes [n, len(groups)] of the given groups (default: all)."""
        x = self.x[:, groups]
        if self.offset is not None:
            x = x - self.offset[groups]
        with np.errstate(invalid="ignore", over="ignore"):
            l = np.minimum(self.hi, np.maximum(self.lo, nearest_int(self.iscale[groups] * x))) + self.shift
        return np.where(self.zero[groups], 0, l).astype(np.int32)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, GridCodes]:
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`: symmetric scale search (19 candidates).

    Returns (scale [B] float32, the codes L [n, B] in 0..2*nmax-1 as `GridCodes`). Weights are `qw` or x^2 when
    None."""
    mx = first_absmax(x, axis=0)
    all_zero = np.abs(mx) < GROUP_MAX_EPS
    safe_max = np.where(all_zero, F32(1.0), mx).astype(np.float32)
    w = qw if qw is not None else x * x
    wx = w * x
    lf = np.empty_like(x)
    buf = np.empty_like(x)

    def codes(iscale):
        # |iscale * x| <= nmax + 0.9 (max is the largest |x|), so np.rint equals nearest_int here
        np.multiply(iscale, x, out=lf)
        np.rint(lf, out=lf)
        return np.clip(lf, -nmax, nmax - 1, out=lf)

    def sums(iscale):
        codes(iscale)
        np.multiply(wx, lf, out=buf)
        sumlx = seqsum(buf)
        np.multiply(w, lf, out=buf)
        np.multiply(buf, lf, out=buf)
        return sumlx, seqsum(buf)

    iscale = F32(-nmax) / safe_max
    best_iscale = iscale
    sumlx, suml2 = sums(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0)).astype(np.float32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / safe_max
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                new_scale = sumlx / suml2
            best_iscale = np.where(better, iscale, best_iscale)
            scale = np.where(better, new_scale, scale)
            best = np.where(better, scale * sumlx, best)
    # the winner's codes are recomputed from its iscale with the same float32 operations, when needed
    scale = np.where(all_zero, F32(0.0), scale).astype(np.float32)
    return scale, GridCodes(x, best_iscale, None, -nmax, nmax - 1, nmax, all_zero)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """`make_q3_quants(n, nmax, x, L, do_rmse=true)`: RTN at -nmax/max, then up to 5 coordinate-descent passes
    (weights x^2). Returns (scale [B], L [n, B] int32 in 0..2*nmax-1)."""
    n, B = x.shape
    mx = first_absmax(x, axis=0)
    all_zero = np.abs(mx) < GROUP_MAX_EPS
    safe_max = np.where(all_zero, F32(1.0), mx).astype(np.float32)
    iscale = F32(-nmax) / safe_max
    # nearest_int, not np.rint: the same for |iscale * x| <= nmax, but C's bit trick makes a NaN 0
    with np.errstate(invalid="ignore"):
        Lf = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(np.float32)
    w = x * x
    wx = w * x
    sumlx = seqsum(wx * Lf)
    suml2 = seqsum(w * Lf * Lf)
    # C stops a group's passes when a pass changes nothing: passes 2.. only visit the groups changed last pass.
    active = None
    for _ in range(5):
        if active is None:
            xa, wa, wxa, La, sx, s2 = x, w, wx, Lf, sumlx, suml2
        else:
            xa, wa, wxa, La = x[:, active], w[:, active], wx[:, active], Lf[:, active]
            sx, s2 = sumlx[active], suml2[active]
        changed = np.zeros(xa.shape[1], dtype=bool)
        for i in range(n):
            li = La[i]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                slx = sx - wxa[i] * li
                sl2 = s2 - wa[i] * li * li
                v = xa[i] * sl2 / slx
                live = slx > 0
                nl = np.clip(nearest_int(v), -nmax, nmax - 1).astype(np.float32)  # v may be huge: the bit trick
                slx2 = slx + wxa[i] * nl
                sl22 = sl2 + wa[i] * nl * nl
                acc = live & (nl != li) & (sl22 > 0) & (slx2 * slx2 * s2 > sx * sx * sl22)
            np.copyto(li, nl, where=acc)
            sx = np.where(acc, slx2, sx)
            s2 = np.where(acc, sl22, s2)
            changed |= acc
        if active is None:
            sumlx, suml2 = sx, s2
            active = np.flatnonzero(changed)
        else:
            Lf[:, active] = La
            sumlx[active], suml2[active] = sx, s2
            active = active[changed]
        if active.size == 0:
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0)).astype(np.float32)
    L = np.where(all_zero, 0, Lf.astype(np.int32) + nmax)
    scale = np.where(all_zero, F32(0.0), scale).astype(np.float32)
    return scale, L


NEAREST_SAFE = F32(4194303.0)  # nearest_int is exact round-half-even below this magnitude


def _rounded(v: np.ndarray, lo: int, hi: int, exact: bool) -> np.ndarray:
    """clamp(nearest_int(v), lo, hi) as float32, in place. `exact=False` (all |v| known to be below 2^22) uses
    np.rint, which then equals ggml's bit trick; otherwise the bit trick itself."""
    if exact:
        v[...] = np.minimum(hi, np.maximum(lo, nearest_int(v)))
        return v
    np.rint(v, out=v)
    return np.clip(v, lo, hi, out=v)


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min and max over axis 0 as C's `if (x[i] < min) min = x[i]` scan keeps them: the values are np.min/np.max;
    only a zero extreme can differ (its sign is that of the first zero met), so those groups are redone exactly."""
    mn, mx = x.min(axis=0), x.max(axis=0)
    for ext, arg in ((mn, np.argmin), (mx, np.argmax)):
        cols = np.flatnonzero(ext == 0)
        if cols.size:
            sub = x[:, cols]
            ext[cols] = np.take_along_axis(sub, arg(sub, axis=0)[None, :], axis=0)[0]
    return mn, mx


def make_qkx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, degenerate_if_le: bool = False) -> tuple[np.ndarray, np.ndarray, GridCodes]:
    """`make_qkx2_quants` (degenerate_if_le=False) / `make_qkx3_quants` (True; weights default to x^2):
    asymmetric scale + min search over `nstep+1` candidate ranges with a weighted least-squares refit.

    Returns (scale [B], the_min [B] (the positive amount subtracted), the codes L [n, B] in 0..nmax as
    `GridCodes`)."""
    w = weights if weights is not None else x * x
    mn, mx = _first_min_max(x)
    x_lo = mn.copy()
    sum_w = seqsum_first(w)
    sum_x = seqsum_first(w * x)
    mn = np.where(mn > 0, F32(0.0), mn).astype(np.float32)
    degenerate = (mx <= mn) if degenerate_if_le else (mx == mn)
    rng = np.where(degenerate, F32(1.0), mx - mn).astype(np.float32)
    xm = x - mn
    lf = np.empty_like(x)
    buf = np.empty_like(x)
    wl = np.empty_like(x)

    def codes(iscale, span_lo, span_hi, xm):
        # v = iscale*(x - min) lies between iscale*(x_lo - min) and iscale*(max - min) (rounding is monotonic);
        # span_lo/span_hi are those differences for the current min
        with np.errstate(invalid="ignore", over="ignore"):
            lo, hi = (iscale * span_lo).min(), (iscale * span_hi).max()
            safe = iscale.min() >= 0 and lo >= -NEAREST_SAFE and hi <= NEAREST_SAFE  # False on NaN
            np.multiply(iscale, xm, out=lf)
        if safe and lo >= F32(-0.5) and hi < F32(nmax + 0.5):
            return np.rint(lf, out=lf)  # already inside [0, nmax] after rounding: no clamp needed
        return _rounded(lf, 0, nmax, exact=not safe)

    def error(scale, the_min, out):
        np.multiply(scale, lf, out=out)
        out += the_min
        out -= x
        if use_mad:
            np.abs(out, out=out)
        else:
            np.multiply(out, out, out=out)
        out *= w
        return seqsum(out)

    with np.errstate(divide="ignore"):
        iscale = F32(nmax) / rng
        scale = F32(1.0) / iscale
    span_lo, span_hi = x_lo - mn, mx - mn
    codes(iscale, span_lo, span_hi, xm)
    best_error = error(scale, mn, buf)
    # The codes of the winning candidate are recomputed on demand from its (iscale, min) — the same float32
    # operations — instead of being copied out at every improvement.
    best_iscale, best_codes_min = iscale, mn
    # C updates `min` when a candidate wins, and later candidates use the updated min (in `max - min` and
    # `x - min`): keep that.
    mn_best = mn.copy()
    min_moved = False
    if nstep >= 1:
        for step in range(nstep + 1):
            if min_moved:
                span_lo, span_hi = x_lo - mn_best, mx - mn_best
                rng = np.where(degenerate, F32(1.0), span_hi)
                np.subtract(x, mn_best, out=xm)
                min_moved = False
            mn_cur = mn_best
            with np.errstate(divide="ignore"):
                iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / rng
            codes(iscale, span_lo, span_hi, xm)
            np.multiply(w, lf, out=wl)
            sum_l = seqsum(wl)
            np.multiply(wl, lf, out=buf)
            sum_l2 = seqsum(buf)
            np.multiply(wl, x, out=buf)
            sum_xl = seqsum(buf)
            D = sum_w * sum_l2 - sum_l * sum_l
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                pos = this_min > 0
                if pos.any():
                    this_min = np.where(pos, F32(0.0), this_min)
                    this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
                cur_error = error(this_scale, this_min, buf)
            better = (D > 0) & (cur_error < best_error)
            if better.any():
                best_iscale = np.where(better, iscale, best_iscale)
                best_codes_min = np.where(better, mn_cur, best_codes_min)
                best_error = np.where(better, cur_error, best_error)
                scale = np.where(better, this_scale, scale)
                mn_best = np.where(better, this_min, mn_best)
                min_moved = True
    scale = np.where(degenerate, F32(0.0), scale).astype(np.float32)
    the_min = -np.where(degenerate, mn, mn_best).astype(np.float32)
    return scale, the_min, GridCodes(x, best_iscale, best_codes_min, 0, nmax, 0, degenerate)


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
