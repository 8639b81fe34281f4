"""3-bit grid i-quant encoders: IQ3_XXS (3.0625 bits per weight) and IQ3_S (3.4375), super-blocks of 256.

Both split a super-block into 8 sub-blocks of 32 and each sub-block into 8 groups of 4 magnitudes stored as the
index of one point of a grid (`iq_lattice`: 256 points for IQ3_XXS, 512 for IQ3_S; levels 0..7, value 2l+1),
the signs apart, and a 4-bit scale per sub-block against one fp16 super-block scale.

- IQ3_XXS [98 bytes]: d (fp16), 64 grid indices, then per sub-block a uint32 holding the four 7-bit sign masks of
  its groups of 8 (an even number of minus signs per group: the eighth sign is implied) and the scale in bits
  28..31. When a group of 8 has an odd number of negative weights, the one with the least w*x^2 is stored with the
  wrong sign.
- IQ3_S [110 bytes]: d (fp16), qs[64] (grid index low bytes), qh[8] (bit 8 of each index: sub-block ib, group k
  in bit k of qh[ib]), signs[32] (8 sign bits per group of 8), scales[4] (two 4-bit scales per byte).

The result is ggml's `quantize_iq3_xxs` / `quantize_iq3_s` (what `llama-quantize` runs, with or without an
imatrix), byte for byte. Per sub-block: weights `qw * sqrt(sigma2 + x^2)` (sigma2 = 2*mean x^2 of the
super-block, nothing spans more than one super-block) or `x^2` without importance; a search over 31 (IQ3_XXS) or
19 (IQ3_S) trial steps `(15 + 0.2*is)/max`, each rounding the magnitudes to levels, replacing every off-grid group
by its best listed neighbour (weights sqrt(w); `_best_neighbours`, a direct slot-by-slot evaluation for IQ3's short
lists with the contract of `iq_lattice.nearest_neighbour`) and keeping the least-squares scale of the best fit;
then the off-grid groups of the winner (IQ3_S: all groups) are rounded again with the winning scale and the scale
refitted. Finally the sub-block scales are rounded to 4 bits against d = max_scale/31, and d is stored
times a fudge factor (1.0125, 1.033).

Two quirks of the C are reproduced: an IQ3_S sub-block whose magnitudes are all zero writes nothing and does not
advance the qs/signs write positions (later sub-blocks fill its slots; the last slots stay zero), and an IQ3_S
super-block whose scales are all zero keeps its grid and sign bytes with d = 0.
float32 arithmetic in C's order (`f32ops`), vectorized over sub-blocks, in chunks of super-blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from quantkit.ggml_types import f32_to_f16
from quantkit.gguf.f32ops import F32, MAGIC, nearest_int, seqsum, sumsq_rows
from quantkit.gguf.iq_lattice import encode_chunks, lattice

QK = 256
SUB = 32
GROUPS = SUB // 4  # grid groups of 4 per sub-block
MAX_LEVEL = 7  # levels 0..7 (ggml's kMaxQ - 1)
EPS_XXS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
CHUNK = 256  # super-blocks per pass: the work arrays ([32, 2048] float32, 256 KB) stay near the core

_TAIL_SHARE = 16  # `_best_neighbours` walks list slots while at least 1/16 of the groups have lists that long
_TWO_MAGIC = F32(2) * MAGIC  # adding it rounds to an even integer: 2*nearest_int(v/2) for small v
_FAST_BOUND = F32(1 << 20)  # |id*x| below this: the rounding trick above is exact


def _trial_step(i: int) -> np.float32:
    """ggml's `2*kMaxQ - 1 + is*0.2f` in float32."""
    return F32(15) + F32(i) * F32(0.2)


def _levels(idv: np.ndarray, xval: np.ndarray, mx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The clamped levels l = clamp(nearest_int(0.5*(id*x - 1)), 0, 7) of magnitudes `xval` [32, M] with one
    inverse step `idv` [M] per sub-block (`mx` [M]: the largest magnitude, bounding id*x).
    Returns (q = 2l+1 float32 [32, M], map index [8, M] int64)."""
    with np.errstate(over="ignore", invalid="ignore"):
        bound = idv * mx
        fast = bool(np.all(bound <= _FAST_BOUND))  # NaN/inf bounds fail this
    if fast:
        # 0.5*(a - 1) + 1.5*2^23 in float32 is the same rounding as (a - 1) + 3*2^23 with every value doubled
        q = idv * xval
        q -= F32(1)
        q += _TWO_MAGIC
        np.clip(q, _TWO_MAGIC, _TWO_MAGIC + F32(2 * MAX_LEVEL), out=q)
        q -= _TWO_MAGIC
        q += F32(1)
    else:  # some id*x huge or not finite: C's nearest_int bit trick, garbage included, then the clamp
        with np.errstate(over="ignore", invalid="ignore"):
            li = np.clip(nearest_int(F32(0.5) * (idv * xval - F32(1))), 0, MAX_LEVEL)
        q = (2 * li + 1).astype(np.float32)
    q4 = q.reshape(GROUPS, 4, -1)
    u = (q4[:, 0] + F32(8) * q4[:, 1] + F32(64) * q4[:, 2] + F32(512) * q4[:, 3] - F32(585)) * F32(0.5)
    return q, u.astype(np.int64)


def _coordinate_major(a: np.ndarray) -> np.ndarray:
    """[32, M] -> [4, 8*M]: column k*M + m holds group k of sub-block m (row i: its i-th element)."""
    m = a.shape[1]
    return np.ascontiguousarray(a.reshape(GROUPS, 4, m).transpose(1, 0, 2)).reshape(4, GROUPS * m)


def _element_major(q_groups: np.ndarray, m: int) -> np.ndarray:
    """[8, M, 4] -> [32, M]: group k of sub-block m, element i -> row 4k+i."""
    return np.ascontiguousarray(q_groups.transpose(0, 2, 1)).reshape(SUB, m)


@dataclass(frozen=True)
class _Lists:
    """An `iq_lattice.lattice`'s map and neighbour lists in the layouts the search reads."""

    grid_of_map: np.ndarray  # [map size] int32: grid index of an on-grid map index, else -1
    odd: np.ndarray  # [G, 4] float32: 2l+1 of every grid point
    count: np.ndarray  # [map size] int64: list length (0 on the grid)
    by_slot: np.ndarray  # [width, map size] int32: row j = every list's j-th entry
    flat: np.ndarray  # [total] int32: the lists end to end
    start: np.ndarray  # [map size] int64: where each list begins in `flat`
    odd_t: np.ndarray  # [4, G] float32: 2l+1 of every grid point, coordinate-major


@cache
def _lists(type_name: str) -> _Lists:
    lat = lattice(type_name)
    valid = lat.neighbours >= 0
    count = valid.sum(axis=1).astype(np.int64)
    odd = lat.odd
    return _Lists(lat.grid_of_map, odd, count, np.ascontiguousarray(lat.neighbours.T),
                  lat.neighbours[valid].astype(np.int32), np.cumsum(count) - count, np.ascontiguousarray(odd.T))


def _best_neighbours(lists: _Lists, index: np.ndarray, x_t: np.ndarray, w_t: np.ndarray,
                     scale: np.ndarray) -> np.ndarray:
    """ggml's `iq3_find_best_neighbour` for n groups at off-grid map indices `index` [n] (the contract of
    `iq_lattice.nearest_neighbour`, which tests/test_gguf_iq3.py checks this against): the listed grid point
    minimising sum_i w_i * (scale*(2l_i+1) - x_i)^2, summed in C's order, the first one strictly below the
    running best that starts at FLT_MAX (NaN and inf never win; -1 where nothing does, where ggml asserts).
    x_t, w_t [4, n] coordinate-major; scale [n]. Returns grid indices [n] int32.

    IQ3's lists are short (~8 points), so every distance is summed directly rather than tabulated per level:
    the groups are sorted by list length, longest first, and the lists walked slot by slot (slot j for the prefix
    of groups with lists longer than j, all at once); the few long lists left when that prefix gets short are
    finished in one unpadded pass (`_finish_lists`)."""
    n = len(index)
    best = np.full(n, np.finfo(np.float32).max, dtype=np.float32)
    pick = np.full(n, -1, dtype=np.int32)
    c = lists.count[index]
    order = np.argsort(-c.astype(np.int16), kind="stable")
    index, c = index[order], c[order]
    x_t, w_t, s = np.take(x_t, order, axis=1), np.take(w_t, order, axis=1), scale[order]
    longer = np.bincount(c, minlength=lists.by_slot.shape[0] + 1)[::-1].cumsum()[::-1]  # [j]: lists >= j long
    with np.errstate(over="ignore", invalid="ignore"):
        j = 0
        while j < c[0] and longer[j + 1] * _TAIL_SHARE >= n:
            m = int(longer[j + 1])
            cand = lists.by_slot[j].take(index[:m])
            diff = lists.odd_t.take(cand, axis=1)
            diff *= s[:m]
            diff -= x_t[:, :m]
            terms = w_t[:, :m] * diff
            terms *= diff
            d2 = terms[0] + terms[1]
            d2 += terms[2]
            d2 += terms[3]
            better = d2 < best[:m]
            np.copyto(best[:m], d2, where=better)
            np.copyto(pick[:m], cand, where=better)
            j += 1
        if j < c[0]:
            _finish_lists(lists, index, c, j, x_t, w_t, s, best, pick)
    out = np.empty(n, dtype=np.int32)
    out[order] = pick
    return out


def _finish_lists(lists: _Lists, index, c, j, x_t, w_t, s, best, pick) -> None:
    """Slots j.. of the (sorted, longest first) lists still that long, unpadded: one row per remaining candidate,
    each group's first least distance by segmented reductions, taken where strictly below its running best."""
    m = int(np.count_nonzero(c > j))
    rest = c[:m] - j
    first_row = np.cumsum(rest) - rest
    total = int(first_row[-1] + rest[-1])
    owner = np.repeat(np.arange(m), rest)
    rows = np.arange(total)
    cand = lists.flat[rows + (lists.start[index[:m]] + j - first_row)[owner]]
    sc = s[owner]
    d2 = None
    for i in range(4):
        diff = lists.odd_t[i].take(cand) * sc
        diff -= x_t[i].take(owner)
        term = w_t[i].take(owner) * diff
        term *= diff
        d2 = term if d2 is None else d2 + term
    least = np.fmin.reduceat(d2, first_row)  # fmin skips NaN, as C's `d2 < best_d2` does
    at_least = np.where(d2 == least[owner], rows, total - 1)
    first = cand[np.minimum.reduceat(at_least, first_row)]
    better = least < best[:m]
    np.copyto(best[:m], least, where=better)
    np.copyto(pick[:m], first, where=better)


def _to_grid(lists: _Lists, q: np.ndarray, u: np.ndarray, xc: np.ndarray, wc: np.ndarray,
             scale: np.ndarray, todo: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices [8, M] of the rounded groups: on-grid map indices directly, the others' best neighbours at
    `scale` [M] (`_best_neighbours`; xc, wc: magnitudes and sqrt weights, `_coordinate_major`), and `q` [32, M]
    updated to the chosen points. `todo` [8, M] (optional): only those groups are wanted (the others' result is
    -1 where off the grid, and their q is left as is). Also returns the mask of the groups that were off the grid
    (and wanted)."""
    m = u.shape[1]
    g = lists.grid_of_map[u]
    off = g < 0 if todo is None else (g < 0) & todo
    flat = np.flatnonzero(off)
    if flat.size:
        k, col = np.divmod(flat, m)
        best = _best_neighbours(lists, u.reshape(-1)[flat], np.take(xc, flat, axis=1), np.take(wc, flat, axis=1),
                                scale[col])
        g.reshape(-1)[flat] = best
        first = flat + 3 * m * k  # group k of sub-block col: element rows 4k.. of column col
        qf = q.reshape(-1)
        for i in range(4):
            qf[first + i * m] = lists.odd_t[i].take(best)
    return g, off


def _fit(wx: np.ndarray, w: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum w*x*q, sum w*q*q) over each sub-block, in element order."""
    return seqsum(wx * q), seqsum(w * q * q)


def _search(type_name: str, xval: np.ndarray, w: np.ndarray, waux: np.ndarray, mx: np.ndarray, n_try: int,
            regrid_all: bool) -> tuple[np.ndarray, np.ndarray]:
    """The scale search of live sub-blocks: xval (magnitudes), w, waux = sqrt(w) [32, M], mx [M] the largest
    magnitude. Returns (scale [M] float32, possibly negative; grid index [8, M] int32)."""
    lists = _lists(type_name)
    m = xval.shape[1]
    xc, wc = _coordinate_major(xval), _coordinate_major(waux)
    wx = w * xval
    best = np.zeros(m, dtype=np.float32)
    scale = mx / F32(15)
    grid = np.full((GROUPS, m), lists.grid_of_map[0], dtype=np.int32)  # all levels 0
    on_grid = np.full((GROUPS, m), not regrid_all)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for i in range(-n_try, n_try + 1):
            idv = _trial_step(i) / mx
            q, u = _levels(idv, xval, mx)
            g, off = _to_grid(lists, q, u, xc, wc, F32(1) / idv)
            sumqx, sumq2 = _fit(wx, w, q)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            if better.any():
                scale = np.where(better, sumqx / sumq2, scale)
                best = np.where(better, scale * sumqx, best)
                grid = np.where(better, g, grid)
                on_grid = np.where(better, ~off, on_grid)

        # round the off-grid groups again (IQ3_S: every group) with the winning scale, and refit it
        redo = (~on_grid).any(axis=0) & (scale > 0)
        if redo.any():
            cols = np.flatnonzero(redo)
            sub = lambda a: np.ascontiguousarray(a[:, cols])  # noqa: E731
            xs, ws, wxs, ms, ss = sub(xval), sub(w), sub(wx), mx[cols], scale[cols]
            q, u = _levels(F32(1) / ss, xs, ms)
            todo = None if regrid_all else ~on_grid[:, cols]
            g, _ = _to_grid(lists, q, u, _coordinate_major(xs), _coordinate_major(sub(waux)), ss, todo)
            if todo is not None:  # the groups that were on the grid keep their point
                g = np.where(todo, g, grid[:, cols])
                q = _element_major(lists.odd[g], len(cols))
            sumqx, sumq2 = _fit(wxs, ws, q)
            scale[cols] = np.where(sumq2 > 0, sumqx / sumq2, ss)
            grid[:, cols] = g
    return scale, grid


def _weights(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, qw [m, 256] -> (elements, weights, sqrt(weights)), each [32, m*8] (column = sub-block)."""
    xe = np.ascontiguousarray(x.reshape(-1, SUB).T)
    if qw is None:
        w = xe * xe
    else:
        sigma2 = np.repeat(F32(2) * sumsq_rows(x) / F32(QK), QK // SUB)
        with np.errstate(invalid="ignore"):
            w = np.ascontiguousarray(qw.reshape(-1, SUB).T) * np.sqrt(sigma2 + xe * xe)
    return xe, w, np.sqrt(w)


def _sign_bits(neg: np.ndarray) -> np.ndarray:
    """neg [32, M] bool -> the 8-bit sign mask of each group of 8: [4, M] int64."""
    bits = neg.reshape(4, 8, -1).astype(np.int64) << np.arange(8, dtype=np.int64)[None, :, None]
    return bits.sum(axis=1)


def _sub_blocks(x: np.ndarray, qw: np.ndarray | None, xxs: bool):
    """Search every sub-block of x [m, 256]. Returns (scale [m, 8] float32 >= 0, grid index [m, 8, 8] int32,
    sign masks [m, 8, 4] int64, live [m, 8]: the sub-blocks that write their codes)."""
    n = x.shape[0]
    xe, w, waux = _weights(x, qw)
    neg = ~(xe >= 0)
    xval = np.where(neg, -xe, xe)
    signs = _sign_bits(neg)
    if xxs:  # an odd count of minus signs in a group of 8: give the least important element the wrong sign
        with np.errstate(over="ignore", invalid="ignore"):
            ax = (w * xe * xe).reshape(4, 8, -1)
        nan = np.isnan(ax)
        if nan.any():  # C's `ax < min` never picks a NaN, and keeps a NaN in front
            imin = np.where(nan[:, 0], 0, np.argmin(np.where(nan, F32(np.inf), ax), axis=1))
        else:
            imin = np.argmin(ax, axis=1)  # [4, M]: the first least
        odd = (neg.reshape(4, 8, -1).sum(axis=1) % 2).astype(bool)
        row = 8 * np.arange(4)[:, None] + imin
        k, col = np.nonzero(odd)
        xval[row[k, col], col] = -xval[row[k, col], col]
        signs = np.where(odd, signs ^ (1 << imin), signs) & 127
    mx = xval.max(axis=0)
    live = ~(mx < EPS_XXS) if xxs else mx != 0

    m = xval.shape[1]
    scale = np.zeros(m, dtype=np.float32)
    grid = np.zeros((GROUPS, m), dtype=np.int32)
    cols = np.flatnonzero(live)
    if cols.size:
        sub = lambda a: np.ascontiguousarray(a[:, cols])  # noqa: E731
        s, g = _search("IQ3_XXS" if xxs else "IQ3_S", sub(xval), sub(w), sub(waux), mx[cols], 15 if xxs else 9,
                       regrid_all=not xxs)
        flip = s < 0  # never expected: store |scale| and the opposite signs
        scale[cols] = np.abs(s)
        signs[:, cols] = np.where(flip, ~signs[:, cols] & (127 if xxs else 255), signs[:, cols])
        grid[:, cols] = g
    signs = np.where(live, signs, 0)
    return (scale.reshape(n, 8), grid.T.reshape(n, 8, GROUPS), signs.T.reshape(n, 8, 4), live.reshape(n, 8))


def _scale_codes(scales: np.ndarray, fudge: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-block scales [m, 8] -> (fp16 d bytes [m, 2], 4-bit codes [m, 8], any scale nonzero [m])."""
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    nonzero = max_scale != 0
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        idv = F32(1) / d
        codes = np.clip(nearest_int(F32(0.5) * (idv[:, None] * scales - F32(1))), 0, 15)
    return f32_to_f16(np.where(nonzero, d * fudge, F32(0))), np.where(nonzero[:, None], codes, 0), nonzero


def _encode_xxs(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    scales, grid, signs, _ = _sub_blocks(x, qw, xxs=True)
    dh, codes, nonzero = _scale_codes(scales, F32(1.0125))
    words = signs[..., 0] | signs[..., 1] << 7 | signs[..., 2] << 14 | signs[..., 3] << 21 | codes << 28
    out = np.zeros((x.shape[0], 98), dtype=np.uint8)
    out[:, 0:2] = dh
    out[:, 2:66] = grid.reshape(-1, 64)
    out[:, 66:98] = words.astype("<u4").view(np.uint8).reshape(-1, 32)
    out[~nonzero] = 0
    return out


def _encode_s(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    n = x.shape[0]
    scales, grid, signs, live = _sub_blocks(x, qw, xxs=False)
    dh, codes, _ = _scale_codes(scales, F32(1.033))
    # a dead sub-block does not advance the qs/signs positions: the live ones are packed to the front
    order = np.argsort(~live, axis=1, kind="stable")
    packed = np.take_along_axis(live, order, axis=1)[..., None]
    qs = np.where(packed, np.take_along_axis(grid & 255, order[..., None], axis=1), 0)
    sg = np.where(packed, np.take_along_axis(signs, order[..., None], axis=1), 0)
    qh = ((grid >> 8) << np.arange(GROUPS)).sum(axis=2)  # indexed by the sub-block itself
    out = np.empty((n, 110), dtype=np.uint8)
    out[:, 0:2] = dh
    out[:, 2:66] = qs.reshape(n, 64)
    out[:, 66:74] = qh
    out[:, 74:106] = sg.reshape(n, 32)
    out[:, 106:110] = codes[:, 0::2] | codes[:, 1::2] << 4
    return out


def iq3_xxs(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """[n, 256] float32 -> IQ3_XXS blocks [n, 98]: d (fp16), grid indices[64], sign+scale words uint32[8]."""
    return encode_chunks(_encode_xxs, x, qw, 98, CHUNK)


def iq3_s(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """[n, 256] float32 -> IQ3_S blocks [n, 110]: d (fp16), qs[64], qh[8], signs[32], scales[4]."""
    return encode_chunks(_encode_s, x, qw, 110, CHUNK)


ENCODERS = {"IQ3_XXS": iq3_xxs, "IQ3_S": iq3_s}
