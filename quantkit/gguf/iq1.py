"""The 1-bit grid i-quants IQ1_S (1.5625 bits per weight) and IQ1_M (1.75 bits per weight).

Both store every group of 8 weights as one point of a 2048-point grid whose coordinates are the levels
-1, 0, 1 (`iq_lattice.lattice("IQ1_S")`, IQ1_M uses the same grid), shifted by +delta or -delta
(delta = 1/8) and scaled:
- IQ1_S: super-blocks of 256 in sub-blocks of 32; a 3-bit scale l and a delta sign per sub-block, one fp16 d
  (value = d * (2l+1) * (level ± delta)). Block: d, qs[32] (low 8 bits of the grid indices), qh[8] (uint16: three
  high index bits per group, l in bits 12-14, the minus-delta flag in bit 15); 50 bytes.
- IQ1_M: sub-blocks of 16 with a 3-bit scale each and a delta sign per group of 8; the fp16 d is spread over
  the top nibbles of the 4 uint16 scale words. Block: qs[32], qh[16] (per group three high index bits and the
  minus flag, two groups per byte), scales[8]; 56 bytes.

The result is what ggml's `quantize_iq1_s` / `quantize_iq1_m` write (what `llama-quantize` runs; it requires an
importance matrix for both types, and so do these encoders). Per sub-block:
1. weights w = qw * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2) over the super-block (nothing depends on the
   whole row);
2. an exhaustive search over the splits of the sorted values into three groups (levels 0, 1, 2) and the
   delta signs (IQ1_S: one sign; IQ1_M: one per half), maximising sumqx^2 / sumq2 (`_choose`);
3. each group of 8 levels looked up on the grid; a group off the grid takes the neighbour (ggml's precomputed
   list) of least weighted squared error at the searched scale, and the scale is then refitted;
4. the sub-block scales rounded to 3 bits against max_scale/15; IQ1_M finally refits d over the whole
   super-block.
float32 arithmetic in C's order throughout (`f32ops`): every sum sequential, no fused multiply-adds.

Vectorized over sub-blocks (numpy; loops only over the split points and small chunks):
- the split search runs candidate-major ([candidates, sub-blocks] ratios, chunks of SEARCH_ELEMENTS). ggml keeps
  the winner of a sequential scan (`sumqx^2 > best * sumq2`, strict: the first of equals wins). Its result is
  the candidate of largest ratio whenever that is clear of all others by GAP, far more than the comparison's
  rounding; near or exact ties (zero-weight elements that cross a split without changing the sums), tiny or
  non-finite values are resolved by replaying the scan exactly, over the tied candidates or over all (`_choose`);
- the neighbour search scores a group's neighbours from tables of in-order partial sums over coordinates 0..3
  and 4..7; a clear best is ggml's choice, near ties are scored exactly in ggml's order (`_best_neighbours`).
Nothing depends on more than one super-block: callers may split the rows anywhere on super-block boundaries.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from quantkit.errors import SchemeError
from quantkit.ggml_types import f32_to_f16
from quantkit.gguf.f32ops import F32, nearest_int, seqsum, sumsq_rows
from quantkit.gguf.iq_lattice import lattice, require_importance

QK = 256
FLT_MAX = np.float32(np.finfo(np.float32).max)
DELTA = F32(0.125)  # ggml's IQ1S_DELTA == IQ1M_DELTA
X_P = np.array([F32(-1) + DELTA, DELTA, F32(1) + DELTA], dtype=np.float32)  # levels 0, 1, 2 shifted by +delta
X_M = np.array([F32(-1) - DELTA, -DELTA, F32(1) - DELTA], dtype=np.float32)  # ... by -delta
EPS_S = F32(1e-12)  # GROUP_MAX_EPS_IQ1_S: a sub-block whose max |x| is below this is stored as zero
EPS_M = F32(1e-7)  # GROUP_MAX_EPS_IQ1_M
FUDGE_S = F32(1.125)  # ggml's factors on the stored d
FUDGE_M = F32(1.1125)

# the search's winner is taken without replaying the scan when no other candidate's ratio is within GAP of it
# (relative): the scan's comparison and the ratio itself each round by a few float32 ulps (~6e-8), far below GAP
GAP = 2e-6
WIDE = 1e-4  # the ratios this close to the largest (relative) are ranked to find the first gap
TINY, HUGE = 1e-30, 1e30  # ratios outside (or sums whose squares fall below TINY): replay the scan
SEARCH_ELEMENTS = 1 << 19  # candidates x sub-blocks per search chunk (2 MB of float32 ratios)


def _pairs(block: int) -> tuple[np.ndarray, np.ndarray]:
    """The split points (i1, i2), 0 <= i1 <= i2 <= block, in ggml's loop order."""
    i1, i2 = np.triu_indices(block + 1)
    return i1.astype(np.int32), i2.astype(np.int32)


PAIRS_S = _pairs(32)  # 561 splits, 2 delta signs each
PAIRS_M = _pairs(16)  # 153 splits, 4 delta sign combinations each


def _require(x: np.ndarray, qw, type_name: str) -> None:
    require_importance(type_name, qw)
    if x.ndim != 2 or x.shape[1] != QK or np.shape(qw) != x.shape:
        raise SchemeError(f"{type_name}: expected super-blocks [n, {QK}] and an importance of the same shape, got "
                          f"{list(x.shape)} and {list(np.shape(qw))}")


def _weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """qw * sqrt(sigma2 + x^2) with sigma2 = 2 * sum(x^2) / 256 per super-block (sum in order): [n, 256]."""
    sigma2 = F32(2) * sumsq_rows(x) / F32(QK)
    return (np.asarray(qw, dtype=np.float32) * np.sqrt(sigma2[:, None] + x * x)).astype(np.float32)


def _sorted(xb: np.ndarray, wb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort every sub-block's values ascending (stable: equal values keep their order, like glibc's merge-sort
    qsort). Returns (order [m, B], rank of each element [m, B], w*x and w in sorted order, each [B, m])."""
    m, block = xb.shape
    order = np.argsort(xb, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(block)[None, :], axis=1)
    wx = np.take_along_axis(wb * xb, order, axis=1)
    ws = np.take_along_axis(wb, order, axis=1)
    return order, rank, np.ascontiguousarray(wx.T), np.ascontiguousarray(ws.T)


def _prefix(terms: np.ndarray) -> np.ndarray:
    """[B, m] -> [B+1, m]: 0, t0, t0+t1, ... (C: s[0] = 0; s[j+1] = s[j] + t[j])."""
    out = np.empty((terms.shape[0] + 1, terms.shape[1]), dtype=np.float32)
    out[0] = 0
    out[1:] = terms
    return np.add.accumulate(out, axis=0, dtype=np.float32)


# ------------------------------------------------------------------ the split search

class _SplitsS:
    """IQ1_S's 1122 candidates per sub-block of 32: the splits i1 <= i2 of the sorted values into levels 0, 1, 2
    (ggml's loop order), each with delta sign + then -; candidate c = 2 * split + (sign is -).
    From the prefix sums sx = sum w*x, sw = sum w over the sorted values ([33, m]), ggml's
    sumqx = (S_i1 - S_0)*v0 + (S_i2 - S_i1)*v1 + (S_32 - S_i2)*v2 and sumq2 likewise with (W..)*v*v."""

    count = 2 * len(PAIRS_S[0])

    def __init__(self, sx: np.ndarray, sw: np.ndarray):
        block = sx.shape[0] - 1
        p0, p2, m0, m2 = X_P[0], X_P[2], X_M[0], X_M[2]
        low_x, low_w = sx - sx[0], sw - sw[0]
        high_x, high_w = sx[block] - sx, sw[block] - sw
        self.sx, self.sw = sx, sw
        self.ax = (low_x * p0, low_x * m0)  # the terms on i1 only, for + and -
        self.aw = ((low_w * p0) * p0, (low_w * m0) * m0)
        self.cx = (high_x * p2, high_x * m2)  # on i2 only
        self.cw = ((high_w * p2) * p2, (high_w * m2) * m2)

    def ratios(self, out: np.ndarray) -> np.ndarray:
        """Fill out [1122, m] with every candidate's sumqx^2 / sumq2; return the largest per sub-block (NaN where
        any is NaN). The four sums (sumqx +, -, sumq2 +, -) of the splits (i1, i2 >= i1) run stacked [k, 4, m]."""
        sx, sw = self.sx, self.sw
        block, m = sx.shape[0] - 1, sx.shape[1]
        p1 = X_P[1]
        first = np.stack([self.ax[0], self.ax[1], self.aw[0], self.aw[1]], axis=1)  # [33, 4, m]
        last = np.stack([self.cx[0], self.cx[1], self.cw[0], self.cw[1]], axis=1)
        # the middle terms: x_m[1] == -x_p[1], a power of two, so the minus sign's are exactly -mid_x and mid_w.
        # Scaling by p1 commutes with the rounding of the differences unless a value is within 2^-100 of zero
        # (subnormal results): then the differences of the scaled prefix sums give the same bits
        big = F32(2.0 ** -100)
        scaled = bool(((np.abs(sx) >= big) | (sx == 0)).all() and ((np.abs(sw) >= big) | (sw == 0)).all())
        if scaled:
            sx1, sw2 = sx * p1, (sw * p1) * p1
            prefix = np.stack([sx1, -sx1, sw2, sw2], axis=1)
        mid = np.empty((block + 1, 4, m), dtype=np.float32)
        sums = np.empty_like(mid)
        r_all = out.reshape(-1, 2, m)
        rmax = np.full(m, -np.inf, dtype=np.float32)
        start = 0
        for i1 in range(block + 1):
            k = block + 1 - i1
            if scaled:
                np.subtract(prefix[i1:], prefix[i1], out=mid[:k])
            else:
                np.multiply(sx[i1:] - sx[i1], p1, out=mid[:k, 0])
                np.negative(mid[:k, 0], out=mid[:k, 1])
                np.multiply((sw[i1:] - sw[i1]) * p1, p1, out=mid[:k, 2])
                mid[:k, 3] = mid[:k, 2]
            np.add(first[i1], mid[:k], out=sums[:k])
            sums[:k] += last[i1:]
            r = r_all[start:start + k]
            np.multiply(sums[:k, 0:2], sums[:k, 0:2], out=r)
            np.divide(r, sums[:k, 2:4], out=r)
            np.maximum(rmax, r.reshape(-1, m).max(axis=0), out=rmax)
            start += k
        return rmax

    def sums(self, col: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sumqx, sumq2) of candidates `cand` of sub-blocks `col` (same arithmetic as `ratios`)."""
        pair, minus = cand >> 1, (cand & 1).astype(bool)
        i1, i2 = PAIRS_S[0][pair], PAIRS_S[1][pair]
        p1 = X_P[1]
        mid_x = (self.sx[i2, col] - self.sx[i1, col]) * p1
        mid_w = ((self.sw[i2, col] - self.sw[i1, col]) * p1) * p1
        qx = np.where(minus, (self.ax[1][i1, col] - mid_x) + self.cx[1][i2, col],
                      (self.ax[0][i1, col] + mid_x) + self.cx[0][i2, col])
        q2 = np.where(minus, (self.aw[1][i1, col] + mid_w) + self.cw[1][i2, col],
                      (self.aw[0][i1, col] + mid_w) + self.cw[0][i2, col])
        return qx.astype(np.float32), q2.astype(np.float32)


class _SplitsM:
    """IQ1_M's 612 candidates per sub-block of 16: the splits i1 <= i2, each with the delta signs of the two halves
    ++, +-, -+, -- (candidate c = 4 * split + 2 * (1st half -) + (2nd half -)). From the per-half prefix sums
    px, pw [2, 17, m] (a half's sums grow only at its own elements), ggml's collapsed form per half
    sumqx = T*v2 - S_i1 - S_i2, sumq2 = W*v2*v2 + W_i1*(v0^2 - v1^2) + W_i2*(v1^2 - v2^2), the halves added."""

    count = 4 * len(PAIRS_M[0])

    def __init__(self, px: np.ndarray, pw: np.ndarray):
        block = px.shape[1] - 1
        p2, m2 = X_P[2], X_M[2]
        cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]
        cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]
        tx, tw = px[:, block], pw[:, block]  # [2, m] totals per half
        self.px = px
        self.tx = (tx * p2, tx * m2)
        self.a = (((tw * p2) * p2)[:, None] + pw * cp1, ((tw * m2) * m2)[:, None] + pw * cm1)  # on i1 only
        self.b = (pw * cp2, pw * cm2)  # on i2 only

    def ratios(self, out: np.ndarray) -> np.ndarray:
        """Fill out [612, m] with every candidate's sumqx^2 / sumq2; return the largest per sub-block. Per i1 the
        halves' sums for both signs run stacked [sign, half, k, m], then every sign pair is added at once."""
        px = self.px
        block, m = px.shape[1] - 1, px.shape[2]
        totals = np.stack(self.tx)[:, :, None, :]  # [sign, half, 1, m]
        first, last = np.stack(self.a), np.stack(self.b)  # [sign, half, 17, m]
        half_x = np.empty((2, 2, block + 1, m), dtype=np.float32)
        half_w = np.empty_like(half_x)
        qx = np.empty((block + 1, 2, 2, m), dtype=np.float32)  # [k, sign of half 0, sign of half 1, m]
        q2 = np.empty_like(qx)
        r_all = out.reshape(-1, 4, m)
        rmax = np.full(m, -np.inf, dtype=np.float32)
        start = 0
        for i1 in range(block + 1):
            k = block + 1 - i1
            s = px[:, i1:i1 + 1] + px[:, i1:]  # [half, k, m]
            np.subtract(totals, s, out=half_x[:, :, :k])
            np.add(first[:, :, i1:i1 + 1], last[:, :, i1:], out=half_w[:, :, :k])
            # candidate sums: half 0's (sign a) + half 1's (sign b), written as [k, a, b, m]
            np.add(half_x[:, None, 0, :k], half_x[None, :, 1, :k], out=qx[:k].transpose(1, 2, 0, 3))
            np.add(half_w[:, None, 0, :k], half_w[None, :, 1, :k], out=q2[:k].transpose(1, 2, 0, 3))
            r = r_all[start:start + k]
            np.multiply(qx[:k].reshape(k, 4, m), qx[:k].reshape(k, 4, m), out=r)
            np.divide(r, q2[:k].reshape(k, 4, m), out=r)
            np.maximum(rmax, r.reshape(-1, m).max(axis=0), out=rmax)
            start += k
        return rmax

    def sums(self, col: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sumqx, sumq2) of candidates `cand` of sub-blocks `col` (same arithmetic as `ratios`)."""
        pair = cand >> 2
        i1, i2 = PAIRS_M[0][pair], PAIRS_M[1][pair]
        halves_x, halves_w = [], []
        for h, minus in ((0, (cand & 2).astype(bool)), (1, (cand & 1).astype(bool))):
            s = self.px[h, i1, col] + self.px[h, i2, col]
            halves_x.append(np.where(minus, self.tx[1][h, col] - s, self.tx[0][h, col] - s))
            halves_w.append(np.where(minus, self.a[1][h, i1, col] + self.b[1][h, i2, col],
                                     self.a[0][h, i1, col] + self.b[0][h, i2, col]))
        return ((halves_x[0] + halves_x[1]).astype(np.float32),
                (halves_w[0] + halves_w[1]).astype(np.float32))


def _replay(cols: np.ndarray, cands: np.ndarray, xs: np.ndarray, ws: np.ndarray, m: int) -> np.ndarray:
    """ggml's sequential scan over lists of candidates: entries (sub-block col, candidate index cand, its sumqx
    and sumq2), sorted by col then cand. A candidate replaces the best when sumq2 > 0 and sumqx^2 > best * sumq2
    (best starts at -FLT_MAX and becomes (sumqx/sumq2)*sumqx). Returns the last replacement of each of the m
    sub-blocks [m] int64 (-1: none, or no entries)."""
    choice = np.full(m, -1, dtype=np.int64)
    if not len(cols):
        return choice
    starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
    counts = np.diff(np.r_[starts, len(cols)])
    owner = cols[starts]
    slot = np.arange(len(cols)) - np.repeat(starts, counts)
    lane = np.repeat(np.arange(len(starts)), counts)
    depth = int(counts.max())
    table_x = np.zeros((depth, len(starts)), dtype=np.float32)
    table_w = np.zeros_like(table_x)  # padding: sumq2 = 0 never replaces
    table_c = np.full((depth, len(starts)), -1, dtype=np.int64)
    table_x[slot, lane], table_w[slot, lane], table_c[slot, lane] = xs, ws, cands
    best = np.full(len(starts), -FLT_MAX, dtype=np.float32)
    last = np.full(len(starts), -1, dtype=np.int64)
    with np.errstate(all="ignore"):
        for j in range(depth):
            x, w = table_x[j], table_w[j]
            take = (w > 0) & (x * x > best * w)
            best = np.where(take, (x / w) * x, best)
            last = np.where(take, table_c[j], last)
    choice[owner] = last
    return choice


def _choose(r: np.ndarray, rmax: np.ndarray, splits) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read ggml's scan result off the ratios r [C, m] where that is safe. Returns (choice [m] int64, -1 for the
    sub-blocks to replay; sumqx, sumq2 of the choices; and the (col, cand) entries to replay, by col then cand).

    The ratios within WIDE of the largest are collected and ranked. If the largest is normal and finite and the
    next is more than GAP below it, it is the scan's result: it replaces any earlier best, and nothing later
    replaces it. If the first gap of more than GAP comes after a few (near or exact ties, e.g. zero-weight elements
    that move across a split without changing the sums), the scan restricted to those gives the result. Otherwise
    (no such gap, NaN, tiny or huge values) all candidates are replayed."""
    count, m = r.shape
    with np.errstate(all="ignore"):
        thr = rmax * F32(1 - WIDE)
        flat = np.flatnonzero(r >= thr)  # NaN never
    row, col = np.divmod(flat, m)
    val = r.reshape(-1)[flat]
    order = np.lexsort((row, -val, col))  # by sub-block, ratio descending, candidate
    row, col, val = row[order], col[order], val[order]
    n = len(col)
    last_of_col = np.ones(n, dtype=bool)
    np.not_equal(col[1:], col[:-1], out=last_of_col[:-1])
    with np.errstate(all="ignore"):
        below = val * F32(1 - GAP)
        gap_after = below > thr[col]  # the last entry of a sub-block: clear of every ratio not collected
        gap_after[:-1] = np.where(last_of_col[:-1], gap_after[:-1], val[1:] < below[:-1])
    starts = np.flatnonzero(np.concatenate([[True], last_of_col[:-1]])) if n else np.zeros(0, dtype=np.int64)
    owner = col[starts]
    size = np.zeros(m, dtype=np.int64)  # the ratios above the first gap; 0: no gap (or none), replay all
    top = np.zeros(m, dtype=np.int64)
    if n:
        first_gap = np.minimum.reduceat(np.where(gap_after, np.arange(n), n), starts)
        size[owner] = np.where(first_gap < n, first_gap - starts + 1, 0)
        top[owner] = row[starts]
    sel_x, sel_w = splits.sums(np.arange(m), top)
    with np.errstate(all="ignore"):
        safe = np.isfinite(rmax) & (rmax >= TINY) & (rmax <= HUGE) & (sel_x * sel_x >= TINY) & (sel_w > 0)
    fast = safe & (size == 1)
    choice = np.where(fast, top, -1)
    if fast.all():
        return choice, sel_x, sel_w, ()
    # near ties: the entries above the gap, replayed in candidate order (when all are normal)
    tie = safe & (size > 1)
    rank = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    keep = tie[col] & (rank < size[col])
    o = np.lexsort((row[keep], col[keep]))
    t_col, t_row = col[keep][o], row[keep][o]
    t_x, t_w = splits.sums(t_col, t_row)
    with np.errstate(all="ignore"):
        tie[t_col[~(t_x * t_x >= TINY)]] = False
    ok = tie[t_col]
    # everything else: all candidates (those with sumq2 <= 0 never replace: left out)
    full = np.flatnonzero(~fast & ~tie)
    f_col, f_row = np.repeat(full, count), np.tile(np.arange(count), len(full))
    f_x, f_w = splits.sums(f_col, f_row)
    live = f_w > 0
    e_col = np.concatenate([t_col[ok], f_col[live]])
    e_row = np.concatenate([t_row[ok], f_row[live]])
    o = np.lexsort((e_row, e_col))
    entries = (e_col[o], e_row[o], np.concatenate([t_x[ok], f_x[live]])[o],
               np.concatenate([t_w[ok], f_w[live]])[o])
    return choice, sel_x, sel_w, entries


def _search(splits_cls, sums: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the candidate search over the sub-blocks (last axis of `sums`) in chunks; the sub-blocks to replay are
    collected over all chunks and replayed together. Returns (choice [m] int64, -1 where no candidate qualified;
    sumqx and sumq2 of the choice [m] float32)."""
    m = sums[0].shape[-1]
    per_chunk = max(1, SEARCH_ELEMENTS // splits_cls.count)
    choice = np.empty(m, dtype=np.int64)
    sel_x = np.zeros(m, dtype=np.float32)
    sel_w = np.zeros(m, dtype=np.float32)
    buffer = np.empty(splits_cls.count * min(m, per_chunk), dtype=np.float32)
    replay = []  # entries (sub-block, candidate, sumqx, sumq2) to replay, in scan order
    for a in range(0, m, per_chunk):
        b = min(m, a + per_chunk)
        splits = splits_cls(*(np.ascontiguousarray(s[..., a:b]) for s in sums))
        r = buffer[:splits_cls.count * (b - a)].reshape(splits_cls.count, b - a)
        with np.errstate(all="ignore"):
            rmax = splits.ratios(r)
        c, x, w, entries = _choose(r, rmax, splits)
        choice[a:b], sel_x[a:b], sel_w[a:b] = c, x, w
        if entries and len(entries[0]):
            col, cand, xs, ws = entries
            replay.append((a + col, cand, xs, ws))
    if replay:
        col, cand, xs, ws = (np.concatenate(parts) for parts in zip(*replay))
        redo = np.unique(col)
        local = np.searchsorted(redo, col)
        c = _replay(local, cand, xs, ws, len(redo))
        choice[redo] = c
        hit = np.flatnonzero(cand == c[local])  # each (sub-block, candidate) entry is unique
        sel_x[col[hit]], sel_w[col[hit]] = xs[hit], ws[hit]
    # sub-blocks that are neither fast nor replayed had no candidate with sumq2 > 0
    return choice, sel_x, sel_w


# ------------------------------------------------------------------ grid points

@cache
def _grid_tables() -> tuple[np.ndarray, np.ndarray]:
    """(the value of every grid coordinate for delta +/- [2, 2048, 8] float32, neighbour count per map index)."""
    lat = lattice("IQ1_S")
    values = np.stack([X_P, X_M])[:, lat.levels.astype(np.int64)]
    counts = (lat.neighbours >= 0).sum(axis=1).astype(np.int32)
    return values, counts


# A group's score table, slot-major [175, groups]: the in-order partial sums over coordinates 0..3 of every level
# combination (81 slots), the same over coordinates 4..7 (81), the 12 single terms of coordinates 4..7, then +inf
# (the slot of the list padding). Groups are scored in chunks of NB_CHUNK.
_HEAD, _TAIL, _TERMS, _INF_SLOT = 0, 81, 162, 174
NB_CHUNK = 4096
NEAR_TIE = 1e-6  # relative: scores this close to the best are compared exactly (the sums round by < 1e-6)


@cache
def _neighbour_slots() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Index tables for the neighbour lists, slots pre-multiplied by NB_CHUNK (a table entry's offset is
    slot * NB_CHUNK + group): (the compact row of each reachable off-grid map index [map size] int32; per compact
    row, neighbour-major [width, rows] int32, the offsets of each neighbour's partial sums over coordinates 0..3
    and over 4..7; per grid point the offsets of its single terms 4..7 [4, 2049] int32). A -1 list entry (padding)
    maps to the +inf slot."""
    lat = lattice("IQ1_S")
    levels = lat.levels.astype(np.int32)

    def code(lv):
        return ((lv[:, 0] * 3 + lv[:, 1]) * 3 + lv[:, 2]) * 3 + lv[:, 3]

    head = np.append(_HEAD + code(levels[:, :4]), _INF_SLOT) * NB_CHUNK
    tail = np.append(_TAIL + code(levels[:, 4:]), _INF_SLOT) * NB_CHUNK
    terms = np.concatenate([_TERMS + 3 * np.arange(4)[:, None] + levels[:, 4:].T, np.full((4, 1), _INF_SLOT)],
                           axis=1) * NB_CHUNK
    # the off-grid map indices that level vectors (0..2 per coordinate) can reach
    reach = lat.map_index(np.stack(np.meshgrid(*[np.arange(3)] * 8, indexing="ij"), axis=-1).reshape(-1, 8))
    rows = np.sort(reach[lat.grid_of_map[reach] < 0])
    compact = np.full(len(lat.neighbours), -1, dtype=np.int32)
    compact[rows] = np.arange(len(rows), dtype=np.int32)
    lists = lat.neighbours[rows].T
    return (compact, np.ascontiguousarray(head[lists], dtype=np.int32),
            np.ascontiguousarray(tail[lists], dtype=np.int32), terms.astype(np.int32))


def _group_tables(xg: np.ndarray, wg: np.ndarray, scale: np.ndarray, minus: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Score tables of k <= NB_CHUNK groups, [175, NB_CHUNK] float32 (layout above; columns past k unused), of the
    terms (w_j * diff) * diff, diff = scale * v - x_j; and whether all of a group's terms are >= 0 (not NaN): then
    the partial sums round by a relative few ulps."""
    k = len(xg)
    values = np.ascontiguousarray(np.stack([X_P, X_M])[minus.astype(np.int64)].T)  # [3, k]
    table = np.empty((_INF_SLOT + 1, NB_CHUNK), dtype=np.float32)
    with np.errstate(all="ignore"):
        diff = (scale * values)[None, :, :] - np.ascontiguousarray(xg.T)[:, None, :]  # [8, 3, k]
        terms = (np.ascontiguousarray(wg.T)[:, None, :] * diff) * diff
        for start, first in ((_HEAD, 0), (_TAIL, 4)):
            part = terms[first]
            for j in range(first + 1, first + 3):
                part = (part[:, None, :] + terms[j][None, :, :]).reshape(-1, k)
            np.add(part[:, None, :], terms[first + 3][None, :, :], out=table[start:start + 81, :k].reshape(27, 3, k))
    table[_TERMS:_INF_SLOT, :k] = terms[4:].reshape(12, k)
    table[_INF_SLOT] = np.inf
    return table, (terms >= 0).all(axis=(0, 1))


def _best_neighbours(u: np.ndarray, xg: np.ndarray, wg: np.ndarray, scale: np.ndarray,
                     minus: np.ndarray) -> np.ndarray:
    """ggml's `iq1_find_best_neighbour2` for groups of 8 at off-grid map indices u [g]: the first neighbour of
    least sum_j w_j * (scale * v_j - x_j)^2 (float32, summed in order), v the neighbour's coordinate values for
    the group's delta sign (minus [g] bool). Returns grid indices [g] int64, -1 where no neighbour scores below
    FLT_MAX.

    Each coordinate has 3 possible terms, so a table per group holds the in-order partial sums of every level
    combination of coordinates 0..3 and of 4..7: their sum scores a neighbour to within a few ulps. Where that
    leaves a single best by more than NEAR_TIE it is ggml's choice (all terms are >= 0, so the rounding is
    relative); the other groups are scored exactly, in C's order: partial sum 0..3, then terms 4..7 one by one."""
    lat = lattice("IQ1_S")
    _, counts = _grid_tables()
    compact, head, tail, _ = _neighbour_slots()
    # similar list lengths together (little padding), equal lists side by side (the gathers then run along rows)
    order = np.lexsort((u, counts[u]))
    u = u[order]
    found = np.empty(len(u), dtype=np.int64)
    for a in range(0, len(u), NB_CHUNK):  # neighbour-major [width, k]: the reductions run over the long axis
        b = min(len(u), a + NB_CHUNK)
        k, width, idx = b - a, int(counts[u[b - 1]]), order[a:b]
        table, clean = _group_tables(xg[idx], wg[idx], scale[idx], minus[idx])
        flat = table.reshape(-1)
        rows_u = compact[u[a:b]]
        local = np.arange(k, dtype=np.int32)
        d2 = flat[head[:width, rows_u] + local]
        d2 += flat[tail[:width, rows_u] + local]
        best = d2.min(axis=0)  # NaN if any: then nothing is near it and the group is scored exactly
        with np.errstate(all="ignore"):
            hit = np.flatnonzero(d2 <= best * F32(1 + NEAR_TIE))
        pick, group = np.divmod(hit, k)
        at = np.zeros(k, dtype=np.int64)
        at[group] = pick
        found[a:b] = lat.neighbours[u[a:b], at]
        ok = (np.bincount(group, minlength=k) == 1) & clean & (best >= TINY) & (best <= F32(1e37))
        redo = np.flatnonzero(~ok)
        if len(redo):
            found[a + redo] = _exact_neighbours(u[a + redo], flat, redo)
    out = np.empty(len(u), dtype=np.int64)
    out[order] = found
    return out


def _exact_neighbours(u: np.ndarray, flat: np.ndarray, local: np.ndarray) -> np.ndarray:
    """The neighbour search with the scores summed exactly in ggml's order (see `_best_neighbours`), for groups
    at columns `local` of a chunk's score table (`flat`)."""
    lat = lattice("IQ1_S")
    _, counts = _grid_tables()
    compact, head, _, terms = _neighbour_slots()
    width = int(counts[u].max())
    cand = lat.neighbours[u, :width]  # -1 padded: the last entry of `terms`, the +inf slot
    local = local.astype(np.int64)[:, None]
    d2 = flat[head[:width, compact[u]].T + local]
    for j in range(4):
        d2 += flat[terms[j][cand] + local]
    d2[~(d2 < FLT_MAX)] = np.inf  # NaN and >= FLT_MAX never win
    pick = np.argmin(d2, axis=1)
    rows = np.arange(len(u))
    return np.where(np.isfinite(d2[rows, pick]), cand[rows, pick], -1)


def _full_grid_fallback(flat_x: np.ndarray, start: int, wg: np.ndarray, scale: np.float32,
                        minus: bool) -> int:
    """ggml's last resort when no neighbour scored below FLT_MAX (only with overflowing magnitudes): a scan of the
    whole grid that, as written in ggml, reads the data value at grid-point offset i from the group start
    (`xval[i]`, not `xval[j]`). Reproduced where that memory lies within this call's input; ggml aborts when
    nothing qualifies, and so does this."""
    values, _ = _grid_tables()
    n = values.shape[1]
    xv = np.full(n, np.nan, dtype=np.float32)
    avail = min(n, len(flat_x) - start)
    xv[:avail] = flat_x[start:start + avail]
    with np.errstate(all="ignore"):
        diff = scale * values[int(minus)] - xv[:, None]
        terms = (wg[None, :] * diff) * diff
        d2 = np.zeros(n, dtype=np.float32)
        for j in range(8):
            d2 += terms[:, j]
    ok = np.flatnonzero(d2 < FLT_MAX)
    if not len(ok):
        raise SchemeError("IQ1: a group of weights too large to quantize (llama.cpp aborts on it too)")
    return int(ok[np.argmin(d2[ok])])


def _grid_indices(levels: np.ndarray, xb: np.ndarray, wb: np.ndarray, scale: np.ndarray, minus: np.ndarray,
                  live: np.ndarray, flat_x: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grid point of every group of 8 levels [m, B] of the live sub-blocks: on the grid directly, else the best
    neighbour at the sub-block's scale; minus [m, B/8] the groups' delta signs. The scale is refitted,
    sum w*v*x / sum w*v*v over the sub-block in order, where a group moved (and both sums are positive).
    Returns (grid indices [m, B/8] int64, 0 for dead sub-blocks; scales [m])."""
    lat = lattice("IQ1_S")
    m, block = levels.shape
    groups = block // 8
    u = lat.map_index(levels.reshape(m, groups, 8))  # [m, groups]
    index = lat.grid_of_map[u].astype(np.int64)
    index[~live] = 0
    moved = index < 0
    if moved.any():
        sb, gr = np.nonzero(moved)
        xg = xb.reshape(m, groups, 8)[sb, gr]
        wg = wb.reshape(m, groups, 8)[sb, gr]
        found = _best_neighbours(u[sb, gr], xg, wg, scale[sb], minus[sb, gr])
        for i in np.flatnonzero(found < 0):
            found[i] = _full_grid_fallback(flat_x, int(offsets[sb[i]]) + 8 * int(gr[i]), wg[i], scale[sb[i]],
                                           bool(minus[sb[i], gr[i]]))
        index[sb, gr] = found
        redo = np.flatnonzero(moved.any(axis=1))
        values, _ = _grid_tables()
        v = values[minus[redo].astype(np.int64), index[redo]].reshape(len(redo), block)  # [r, B]
        wv = wb[redo] * v
        sumqx = seqsum(np.ascontiguousarray((wv * xb[redo]).T))
        sumq2 = seqsum(np.ascontiguousarray((wv * v).T))
        with np.errstate(all="ignore"):
            refit = np.where((sumqx > 0) & (sumq2 > 0), sumqx / sumq2, scale[redo])
        scale = scale.copy()
        scale[redo] = refit
    return index, scale


def _levels(rank: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """Level of every element [m, B] from its rank in the sorted sub-block: 0 below i1, 1 below i2, else 2."""
    return (rank >= i1[:, None]).astype(np.int8) + (rank >= i2[:, None]).astype(np.int8)


def _prepare(x: np.ndarray, qw: np.ndarray, block: int, eps: np.float32):
    """Shared first steps: weights, sub-blocks [m, block], which are live (max |x| >= eps), their sort."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = _weights(x, qw)
    xb, wb = x.reshape(-1, block), w.reshape(-1, block)
    live = np.abs(xb).max(axis=1) >= eps
    order, rank, wx, ws = _sorted(xb, wb)
    return x, w, xb, wb, live, order, rank, wx, ws


# ------------------------------------------------------------------ the encoders

@np.errstate(all="ignore")  # ggml's float semantics, overflow and NaN included, without warnings
def iq1_s(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """[n, 256] float32 (consecutive super-blocks) and per-element importance [n, 256] -> IQ1_S blocks [n, 50]:
    d (fp16), qs[32], qh[8] (uint16). Raises SchemeError without importance (llama.cpp requires an imatrix)."""
    x = np.asarray(x)
    _require(x, qw, "IQ1_S")
    block = 32
    x, w, xb, wb, live, _, rank, wx, ws = _prepare(x, qw, block, EPS_S)
    n, m = x.shape[0], xb.shape[0]
    choice, sel_x, sel_w = _search(_SplitsS, (_prefix(wx), _prefix(ws)))
    live &= choice >= 0
    with np.errstate(all="ignore"):
        scale = np.where(live, sel_x / sel_w, F32(0)).astype(np.float32)
    pair, minus = choice // 2, (choice % 2) == 1
    levels = _levels(rank, PAIRS_S[0][pair], PAIRS_S[1][pair])
    flip = scale < 0
    levels[flip] = 2 - levels[flip]
    scale = np.abs(scale)
    minus = np.where(live, minus ^ flip, False)  # dead sub-blocks: shift +1, scale 0
    index, scale = _grid_indices(levels, xb, wb, scale, np.repeat(minus[:, None], 4, axis=1), live, x.reshape(-1),
                                 np.arange(m) * block)
    scale = np.where(live, scale, F32(0)).astype(np.float32).reshape(n, 8)
    index = index.reshape(n, 8, 4)

    max_scale = scale.max(axis=1)
    has = max_scale > 0
    d = max_scale / F32(15)
    with np.errstate(all="ignore"):
        inv = F32(1) / d
        lscale = np.clip(nearest_int(F32(0.5) * (inv[:, None] * scale - F32(1))), 0, 7)
    qh = ((index >> 8) << (3 * np.arange(4))).sum(axis=2)  # [n, 8]
    qh |= np.where(has[:, None], (lscale << 12) | (minus.reshape(n, 8).astype(np.int64) << 15), 0)
    out = np.empty((n, 50), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16(np.where(has, d * FUDGE_S, F32(0)))
    out[:, 2:34] = (index & 255).reshape(n, 32)
    out[:, 34:50] = qh.astype("<u2").view(np.uint8).reshape(n, 16)
    return out


@np.errstate(all="ignore")
def iq1_m(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """[n, 256] float32 (consecutive super-blocks) and per-element importance [n, 256] -> IQ1_M blocks [n, 56]:
    qs[32], qh[16], scales[8] (4 uint16: 3-bit sub-block scales, d's fp16 nibbles on top). Raises SchemeError
    without importance (llama.cpp requires an imatrix)."""
    x = np.asarray(x)
    _require(x, qw, "IQ1_M")
    block = 16
    x, w, xb, wb, live, order, rank, wx, ws = _prepare(x, qw, block, EPS_M)
    n, m = x.shape[0], xb.shape[0]
    half = (order >= block // 2).T  # [16, m]: sorted element in the 2nd half
    px = np.stack([_prefix(np.where(half, F32(0), wx)), _prefix(np.where(half, wx, F32(0)))])
    pw = np.stack([_prefix(np.where(half, F32(0), ws)), _prefix(np.where(half, ws, F32(0)))])
    choice, sel_x, sel_w = _search(_SplitsM, (px, pw))
    live &= choice >= 0
    with np.errstate(all="ignore"):
        scale = np.where(live, sel_x / sel_w, F32(0)).astype(np.float32)
    pair, signs = choice // 4, np.where(live, choice % 4, 0)  # signs: 2 * (1st half minus) + (2nd half minus)
    levels = _levels(rank, PAIRS_M[0][pair], PAIRS_M[1][pair])
    flip = scale < 0
    levels[flip] = 2 - levels[flip]
    scale = np.abs(scale)
    signs = np.where(flip, 3 - signs, signs)
    minus = np.stack([signs >= 2, signs % 2 == 1], axis=1)  # [m, 2]
    index, scale = _grid_indices(levels, xb, wb, scale, minus, live, x.reshape(-1), np.arange(m) * block)
    scale = np.where(live, scale, F32(0)).astype(np.float32).reshape(n, 16)

    max_scale = scale.max(axis=1)
    has = max_scale > 0
    d = max_scale / F32(15)
    with np.errstate(all="ignore"):
        inv = F32(1) / d
        lscale = np.clip(nearest_int(F32(0.5) * (inv[:, None] * scale - F32(1))), 0, 7)  # [n, 16]
        # refit d over the super-block with the rounded scales, in order over all 256 values
        values, _ = _grid_tables()
        v = values[minus.astype(np.int64), index].reshape(n, 16, 16)
        v = v * (F32(2) * lscale.astype(np.float32) + F32(1))[:, :, None]
        v = v.reshape(n, QK)
        wv = w * v
        sumqx = seqsum(np.ascontiguousarray((wv * x).T))
        sumq2 = seqsum(np.ascontiguousarray((wv * v).T))
        d = np.where(sumq2 > 0, sumqx / sumq2, d).astype(np.float32)
    index = index.reshape(n, 16, 2)
    qh = (index[..., 0] >> 8) | ((index[..., 1] >> 8) << 4)
    mask = minus.reshape(n, 16, 2).astype(np.int64)
    qh |= np.where(has[:, None], (mask[..., 0] << 3) | (mask[..., 1] << 7), 0)
    sc = (np.where(has[:, None], lscale, 0).reshape(n, 4, 4) << (3 * np.arange(4))).sum(axis=2)  # [n, 4]
    f16 = f32_to_f16(np.where(has, d * FUDGE_M, F32(0))).view("<u2").reshape(n).astype(np.int64)
    sc |= np.where(has[:, None], ((f16[:, None] >> (4 * np.arange(4))) & 0xF) << 12, 0)
    out = np.empty((n, 56), dtype=np.uint8)
    out[:, 0:32] = (index & 255).reshape(n, 32)
    out[:, 32:48] = qh
    out[:, 48:56] = sc.astype("<u2").view(np.uint8).reshape(n, 8)
    return out


ENCODERS = {"IQ1_S": iq1_s, "IQ1_M": iq1_m}
