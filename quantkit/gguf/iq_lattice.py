"""The grids of the lattice i-quants (IQ2_*, IQ3_*, IQ1_*) and ggml's neighbour lists for points off the grid.

A grid i-quant stores each group of 8 (IQ2, IQ1) or 4 (IQ3) weights as the index of one grid point: a vector of
small levels l (0..2 for IQ2/IQ1, 0..7 for IQ3). ggml's encoders round each weight to a level, pack the levels
into a map index (`map_index`, 2 or 3 bits per coordinate) and, when that point is not on the grid, search only
its precomputed neighbours: the grid points at the `nwant` smallest squared distances in (2l+1) coordinates,
ordered by distance then grid index (ggml's `iq2xs_init_impl` / `iq3xs_init_impl`).

The grids come from gguf-py (the decoders' tables): a grid index means the same point to the encoder and the
decoder, and a coordinate's level is the rank of its value among the table's values.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cache

import numpy as np

from quantkit.errors import SchemeError

F32 = np.float32

# type -> (gguf-py table, bits per coordinate in the map index, map size, nwant: distinct distances kept)
_SPECS = {
    "IQ2_XXS": ("IQ2_XXS", 2, 43692, 2),
    "IQ2_XS": ("IQ2_XS", 2, 43692, 2),
    "IQ2_S": ("IQ2_S", 2, 43692, 1),
    "IQ1_S": ("IQ1_S", 2, 43692, 3),
    "IQ1_M": ("IQ1_S", 2, 43692, 3),
    "IQ3_XXS": ("IQ3_XXS", 3, 4096, 2),
    "IQ3_S": ("IQ3_S", 3, 4096, 3),
}


@dataclass(frozen=True)
class Lattice:
    levels: np.ndarray  # [G, dim] int8: each grid point's levels l (ggml's grid bytes are 2l+1)
    grid_of_map: np.ndarray  # [map size] int32: the grid index of an on-grid map index, else -1
    neighbours: np.ndarray  # [map size, width] int32: the neighbour list of an off-grid map index, -1 padded
    bits: int  # bits per coordinate in a map index

    @property
    def dim(self) -> int:
        return self.levels.shape[1]

    @property
    def odd(self) -> np.ndarray:
        """[G, dim] float32: 2l+1, the coordinates ggml's searches scale and compare."""
        return (F32(2) * self.levels + F32(1)).astype(np.float32)

    def map_index(self, levels: np.ndarray) -> np.ndarray:
        """levels [..., dim] (ints in range) -> map index [...] int64 (coordinate k in bits k*bits..)."""
        shifts = (self.bits * np.arange(self.dim)).astype(np.int64)
        return (levels.astype(np.int64) << shifts).sum(axis=-1)


def _grid_levels(table: str) -> np.ndarray:
    from gguf import quants

    cls = getattr(quants, table)
    cls.init_grid()
    values = cls.grid.reshape(cls.grid_shape)
    return np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), values).astype(np.int8)


def lattice(type_name: str) -> Lattice:
    """The grid, map and neighbour lists of `type_name`, built once per process (about a second for the
    2048-point IQ1 grid) even when encoder threads ask for it at the same time."""
    with _BUILD_LOCK:
        return _build_lattice(type_name)


_BUILD_LOCK = threading.Lock()


@cache
def _build_lattice(type_name: str) -> Lattice:
    table, bits, map_size, nwant = _SPECS[type_name]
    levels = _grid_levels(table)
    dim = levels.shape[1]
    grid_of_map = np.full(map_size, -1, dtype=np.int32)
    shifts = (bits * np.arange(dim)).astype(np.int64)
    grid_of_map[(levels.astype(np.int64) << shifts).sum(axis=1)] = np.arange(len(levels), dtype=np.int32)

    off = np.flatnonzero(grid_of_map < 0)
    point_odd = (2 * ((off[:, None] >> shifts) & ((1 << bits) - 1)) + 1).astype(np.float32)  # [n_off, dim]
    grid_odd = (2 * levels + 1).astype(np.float32)
    lists = [_nearest_lists(point_odd[i:i + 4096], grid_odd, nwant) for i in range(0, len(off), 4096)]
    width = max(w.shape[1] for w in lists)
    neighbours = np.full((map_size, width), -1, dtype=np.int32)
    for i, w in zip(range(0, len(off), 4096), lists):
        neighbours[off[i:i + len(w)], :w.shape[1]] = w
    return Lattice(levels, grid_of_map, neighbours, bits)


def _nearest_lists(points: np.ndarray, grid: np.ndarray, nwant: int) -> np.ndarray:
    """For each point [n, dim] (odd coordinates), the grid indices at its `nwant` smallest distinct squared
    distances, ordered by distance then index: [n, width] int32, -1 padded."""
    g = len(grid)
    # squared distances are small integers: exact in float32 through the matrix product
    d2 = ((points ** 2).sum(1)[:, None] + (grid ** 2).sum(1)[None, :] - 2 * points @ grid.T).astype(np.int32)
    present = np.zeros((len(points), int(d2.max()) + 1), dtype=bool)
    present[np.arange(len(points))[:, None], d2] = True
    kth = np.argmax(np.cumsum(present, axis=1) >= nwant, axis=1)  # the nwant-th distinct distance
    kept = d2 <= kth[:, None]
    width = int(kept.sum(axis=1).max())
    key = np.where(kept, d2 * g + np.arange(g, dtype=np.int32), np.iinfo(np.int32).max)
    first = np.argpartition(key, width - 1, axis=1)[:, :width] if width < g else np.argsort(key, axis=1)
    first = np.take_along_axis(first, np.argsort(np.take_along_axis(key, first, axis=1), axis=1), axis=1)
    return np.where(np.take_along_axis(kept, first, axis=1), first, -1).astype(np.int32)


@dataclass(frozen=True)
class _Codes:
    """Per grid point, table offsets (times SEARCH_ROWS) for `nearest_neighbour`: of each coordinate's level in the
    term table, and of the level codes of the first `split` coordinates and of the rest (coordinate order most
    significant first) in the partial-sum tables. The last entry (index -1, where the -1 padding of
    `Lattice.neighbours` lands) points at a padding row."""

    term: np.ndarray  # [dim, G+1] intp: (i*nlev + l_i) * SEARCH_ROWS
    head: np.ndarray  # [G+1] intp
    tail: np.ndarray  # [G+1] intp
    count: np.ndarray  # [map size] intp: the length of each neighbour list (0 on the grid)
    nlev: int
    split: int


SEARCH_ROWS = 2048  # groups scored together: their tables (2 x 82 x 2048 floats for IQ2) stay in cache
DIRECT_WIDTH = 16  # lists up to this long are summed exactly outright; longer ones are pruned first
PRUNE_MARGIN = np.float32(2.0 ** -14)  # far above the 28 ulps two summation orders of the same terms can differ by
_CODES: dict[int, tuple[np.ndarray, _Codes]] = {}  # id(neighbours) -> (the neighbours, their codes)


def _codes(lat: Lattice) -> _Codes:
    key = id(lat.neighbours)  # each entry holds its array alive, so the id names that array while it is listed
    known = _CODES.get(key)
    if known is None:
        nlev, split, dim = int(lat.levels.max()) + 1, lat.dim // 2, lat.dim
        lv = lat.levels.astype(np.intp)

        def code(cols: slice, width: int) -> np.ndarray:
            weights = nlev ** np.arange(width - 1, -1, -1, dtype=np.intp)
            return np.append((lv[:, cols] * weights).sum(axis=1), nlev ** width) * SEARCH_ROWS

        term = (np.arange(dim, dtype=np.intp)[:, None] * nlev + lv.T) * SEARCH_ROWS
        term = np.concatenate([term, term[:, :1]], axis=1)  # padding: any valid offset, masked by the caller
        count = (lat.neighbours >= 0).sum(axis=1).astype(np.intp)
        known = lat.neighbours, _Codes(term, code(slice(0, split), split), code(slice(split, dim), dim - split),
                                       count, nlev, split)
        _CODES[key] = known
    return known[1]


def _table(terms: np.ndarray, pad: float, out: np.ndarray) -> np.ndarray:
    """terms [k, nlev, m] (m <= SEARCH_ROWS) -> `out` [(nlev^k + 1) * SEARCH_ROWS] float32: at code*SEARCH_ROWS +
    row the in-order sum ((0 + t_0) + t_1) + ... of that level combination, then a row of `pad`."""
    k, nlev, m = terms.shape
    table = out.reshape(-1, SEARCH_ROWS)
    acc = terms[0] + F32(0)
    for i in range(1, k - 1):
        acc = (acc[:, None, :] + terms[i][None, :, :]).reshape(-1, m)
    if k > 1:
        np.add(acc[:, None, :], terms[k - 1][None, :, :], out=table[:-1, :m].reshape(-1, nlev, m))
    else:
        table[:-1, :m] = acc
    table[-1] = pad
    return out


class _Work:
    """Scratch arrays for one `nearest_neighbour` call, reused by every batch (fresh large temporaries would cost
    a page fault per 4 KiB, more than the lookups themselves)."""

    def __init__(self, width: int, dim: int, nlev: int, split: int):
        size = SEARCH_ROWS * width
        self.cand = np.empty(size, dtype=np.intp)
        self.at = np.empty(size, dtype=np.intp)
        self.est = np.empty(size, dtype=np.float32)
        self.part = np.empty(size, dtype=np.float32)
        self.terms = np.empty((dim, nlev, SEARCH_ROWS), dtype=np.float32)
        self.head = np.empty((nlev ** split + 1) * SEARCH_ROWS, dtype=np.float32)
        self.tail = np.empty((nlev ** (dim - split) + 1) * SEARCH_ROWS, dtype=np.float32)

    def lookup(self, table: np.ndarray, offsets: np.ndarray, cand: np.ndarray, r: np.ndarray,
               out: np.ndarray) -> np.ndarray:
        """out[j, c] = table[offsets[cand[j, c]] + r[j]] (index -1 of `offsets` is the padding entry)."""
        at = self.at[:cand.size].reshape(cand.shape)
        np.take(offsets, cand, out=at, mode="wrap")
        at += r
        return np.take(table, at, out=out, mode="wrap")

    def exact(self, term: np.ndarray, cand: np.ndarray, r: np.ndarray) -> np.ndarray:
        """C's in-order distance of every candidate [m, w] (padding -1 gives inf; NaN gives inf: never chosen)."""
        table = self.terms.reshape(-1)
        d2 = np.zeros(cand.shape, dtype=np.float32)
        part = self.part[:cand.size].reshape(cand.shape)
        for offsets in term:
            d2 += self.lookup(table, offsets, cand, r, part)
        d2[np.isnan(d2) | (cand < 0)] = np.inf
        return d2


def nearest_neighbour(lat: Lattice, index: np.ndarray, xval: np.ndarray, weight: np.ndarray,
                      scale: np.ndarray) -> np.ndarray:
    """ggml's `iq2_find_best_neighbour` / `iq3_find_best_neighbour` for n groups at off-grid map indices `index`
    [n]: the neighbour minimising sum_i weight_i * (scale*(2l_i+1) - xval_i)^2 (float32, summed in order; the first
    of equal minima; C never picks a NaN). xval, weight [n, dim]; scale [n]. Returns grid indices [n] int32.

    A term depends only on the coordinate and its level, so each group's terms are computed once ([dim, nlev])
    and a candidate's distance is a sum of lookups. Groups are taken SEARCH_ROWS at a time, sorted by list length,
    each list padded to the longest of its batch. Short lists are summed exactly in C's order. Long lists are
    first estimated with two lookups, in tables of the sums over the first and over the second half of the
    coordinates for every level combination, and only the candidates within PRUNE_MARGIN of their group's smallest
    estimate are summed exactly. When every term is finite and >= 0 (non-negative weights), both sums are within
    14 ulps of the true sum, so no candidate that could be C's choice is pruned; a group with any other term has
    all of its candidates summed."""
    index = np.asarray(index, dtype=np.intp)
    n = index.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    codes = _codes(lat)
    nlev, split = codes.nlev, codes.split
    count = codes.count[index]
    order = np.argsort(count.astype(np.int16), kind="stable")  # lists are < 2^15 long: a radix sort
    index, count = index[order], count[order]
    odd = F32(2) * np.arange(nlev, dtype=np.float32) + F32(1)
    xval = np.asarray(xval, dtype=np.float32)[order]
    weight = np.asarray(weight, dtype=np.float32)[order]
    scale = np.asarray(scale, dtype=np.float32)[order]
    out = np.empty(n, dtype=np.int32)
    rows = np.arange(SEARCH_ROWS)
    work = _Work(int(count[-1]), lat.dim, nlev, split)
    for c0 in range(0, n, SEARCH_ROWS):
        c1 = min(n, c0 + SEARCH_ROWS)
        m = c1 - c0
        listed = lat.neighbours[index[c0:c1], :int(count[c1 - 1])]  # -1 padded
        if listed.shape[1] <= 1:  # single candidates (or, misused on grid points, none: -1)
            out[c0:c1] = listed[:, 0] if listed.shape[1] else -1
            continue
        cand = work.cand[:listed.size].reshape(listed.shape)
        np.copyto(cand, listed)
        r = rows[:m, None]
        chunk = work.terms[:, :, :m]  # the terms w*(scale*q - x)*(scale*q - x), as C computes each
        with np.errstate(invalid="ignore", over="ignore"):
            np.subtract(scale[c0:c1] * odd[:, None], xval[c0:c1].T[:, None, :], out=chunk)
            np.multiply(weight[c0:c1].T[:, None, :] * chunk, chunk, out=chunk)
            flat_terms = work.terms.reshape(-1, SEARCH_ROWS)[:, :m]
            safe = (flat_terms.min(axis=0) >= 0) & (flat_terms.max(axis=0) < np.inf)  # a NaN fails both
        with np.errstate(invalid="ignore", over="ignore"):
            if cand.shape[1] <= DIRECT_WIDTH:
                out[c0:c1] = listed[rows[:m], np.argmin(work.exact(codes.term, cand, r), axis=1)]
                continue
            est = work.lookup(_table(chunk[:split], np.inf, work.head), codes.head, cand, r,
                              work.est[:cand.size].reshape(cand.shape))
            est += work.lookup(_table(chunk[split:], 0.0, work.tail), codes.tail, cand, r,
                               work.part[:cand.size].reshape(cand.shape))
            best = np.argmin(est, axis=1)
            near = est <= (est[rows[:m], best] * (F32(1) + PRUNE_MARGIN))[:, None]
        one = (near.sum(axis=1) == 1) & safe
        out[c0:c1][one] = listed[one, best[one]]
        many = np.flatnonzero(~one)
        if many.size:
            keep = (near[many] | ~safe[many][:, None]) & (listed[many] >= 0)
            kept = np.where(keep, cand[many], -1)  # the kept candidates, in list order
            with np.errstate(invalid="ignore", over="ignore"):
                d2 = work.exact(codes.term, kept, r[many])
            chosen = kept[np.arange(many.size), np.argmin(d2, axis=1)]
            out[c0 + many] = np.where(chosen >= 0, chosen, listed[many, 0])  # (all NaN: C asserts)
    result = np.empty(n, dtype=np.int32)
    result[order] = out
    return result


def require_importance(type_name: str, qw) -> None:
    """Refuse, as ggml does, to encode a type that needs importance (`ggml_types.IMPORTANCE_TYPES`) without it."""
    if qw is None:
        raise SchemeError(f"{type_name} needs an importance matrix (imatrix): llama.cpp refuses to quantize "
                          f"{type_name} without one")


def encode_chunks(encode, x: np.ndarray, qw: np.ndarray | None, nbytes: int, chunk: int) -> np.ndarray:
    """`encode(x_part, qw_part) -> [part, nbytes] uint8` over `chunk` super-blocks at a time, so that an encoder's
    work arrays stay near the core. x, qw (or None): [n, 256] (or anything that reshapes to it)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 256)
    if qw is not None:
        qw = np.asarray(qw, dtype=np.float32).reshape(-1, 256)
    out = np.empty((len(x), nbytes), dtype=np.uint8)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = encode(x[i:i + chunk], None if qw is None else qw[i:i + chunk])
    return out
