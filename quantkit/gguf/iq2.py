"""2-bit lattice i-quant encoders (super-blocks of 256): IQ2_XXS, IQ2_XS and IQ2_S.

Each group of 8 weights is stored as 8 signs and the index of one grid point of the E8-style lattice of
`iq_lattice` (levels l in 0..2, magnitude 2l+1), times a 4-bit sub-block scale against one fp16 super-block scale:

- IQ2_XXS (2.06 bits per weight): 256-point grid, sub-blocks of 32, 7 sign bits per group (the 8th makes the
  number of negative signs even), a block of 66 bytes: d (fp16), then per sub-block two uint32: four grid bytes,
  and four 7-bit sign fields with the scale in the top 4 bits;
- IQ2_XS (2.31 bits per weight): 512-point grid, sub-blocks of 16, 74 bytes: d, per group a uint16 (9-bit grid
  index | 7 sign bits << 9), 8 bytes of two 4-bit scales;
- IQ2_S (2.56 bits per weight): 1024-point grid, sub-blocks of 16, all 8 signs stored, 82 bytes: d, the low
  bytes of the 32 grid indices, the 32 sign bytes, the 2 high index bits of each group (qh[8]), 8 scale bytes.

The result is ggml's `quantize_iq2_xxs` / `quantize_iq2_xs` / `quantize_iq2_s` (what `llama-quantize` runs):
per sub-block, the weight of each element is `qw * sqrt(sigma2 + x^2)` (sigma2 the mean square of the
super-block, twice it for IQ2_S; IQ2_S without importance uses `sigma2/4 + x^2`); each group's magnitudes are
rounded to levels at a ladder of candidate scales (13 around a `make_qp_quants` estimate for IQ2_XXS, 19 around
max/5 for the others), an off-grid point is replaced by its best listed neighbour (`iq_lattice.nearest_neighbour`
with sqrt-weights), and the candidate with the largest `sumqx^2/sumq2` wins; one refinement pass re-rounds at the
chosen scale (every group for IQ2_XXS, the off-grid ones for the others); a negative scale flips every sign of
its sub-block. The sub-block scales are then rounded to 4 bits l, scale ~ (2l+1)*d with d = max_scale/31 (IQ2_S
stores 0.9875*d). For IQ2_XXS/IQ2_XS, a group with an odd number of negative weights flips the sign of its least
important weight (smallest `w x^2`) so the signs fit in 7 bits.

ggml refuses IQ2_XXS and IQ2_XS without importance (`ggml_quantize_requires_imatrix`; the row functions assert on
it); IQ2_S has both paths. Everything is per super-block: nothing depends on the rest of the row.

`x` is [n_superblocks, 256] float32, `qw` the importance of each element's column (same shape). float32
arithmetic in C's order (`f32ops`); the result is the block bytes [n, type_size] uint8.
"""

from __future__ import annotations

import numpy as np

from quantkit.ggml_types import f32_to_f16
from quantkit.gguf import search
from quantkit.gguf.f32ops import F32, GROUP_MAX_EPS, nearest_int, seqsum, sumsq_rows
from quantkit.gguf.iq_lattice import Lattice, encode_chunks, lattice, nearest_neighbour, require_importance

QK_K = 256
KMAXQ = 3  # levels 0..2: the odd magnitudes 1, 3, 5
GROUP_MAX_EPS_IQ2_S = F32(1e-8)
CHUNK = 1024  # super-blocks per pass: the work arrays stay around 1 MB


class _SubBlocks:
    """The sub-blocks of one chunk, element-major ([S, m]: element i of sub-block j at [i, j], so the C loops'
    sequential sums are row-by-row vector additions), with their groups of 8 as [groups, m, 8] for the
    neighbour search."""

    def __init__(self, w: np.ndarray, xval: np.ndarray, lat: Lattice):
        self.size, self.m = xval.shape
        self.groups = self.size // 8
        self.lat = lat
        self.xval = xval
        self.w = w
        self.wx = w * xval
        waux = np.sqrt(w)
        self.xg = np.ascontiguousarray(xval.reshape(self.groups, 8, self.m).transpose(0, 2, 1))
        self.wg = np.ascontiguousarray(waux.reshape(self.groups, 8, self.m).transpose(0, 2, 1))
        self.odd_t = np.ascontiguousarray(lat.odd.T)  # [8, G]: coordinate i of every grid point
        self.shifts = (2 * np.arange(8, dtype=np.int32))[None, :, None]

    def grid_points(self, inv_step: np.ndarray, scale: np.ndarray,
                    active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Round every group to levels at `inv_step` [m] and look the point up on the grid; off-grid points of the
        `active` groups [groups, m] take their best neighbour at `scale` [m]. Returns (grid index [groups, m],
        0 where off grid and inactive; on-grid mask [groups, m])."""
        with np.errstate(invalid="ignore", over="ignore"):
            levels = nearest_int(F32(0.5) * (inv_step * self.xval - F32(1)))
        np.clip(levels, 0, KMAXQ - 1, out=levels)
        index = (levels.reshape(self.groups, 8, self.m) << self.shifts).sum(axis=1)
        grid = self.lat.grid_of_map[index]
        on_grid = grid >= 0
        off = ~on_grid & active
        if off.any():
            scales = np.broadcast_to(scale, (self.groups, self.m))[off]
            grid[off] = nearest_neighbour(self.lat, index[off], self.xg[off], self.wg[off], scales)
        np.maximum(grid, 0, out=grid)
        return grid, on_grid

    def sums(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sum w*x*q, sum w*q*q) over each sub-block in element order, q = 2l+1 of the grid points [groups, m]."""
        q = self.odd_t[:, grid].transpose(1, 0, 2).reshape(self.size, self.m)
        return seqsum(self.wx * q), seqsum(self.w * q * q)


def _weights(x: np.ndarray, qw: np.ndarray | None, size: int, sigma_factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(element-major sub-blocks xe [size, m], weights [size, m]) of a chunk [n, 256]."""
    n = x.shape[0]
    xe = np.ascontiguousarray(x.reshape(-1, size).T)
    sigma2 = sumsq_rows(x)
    if sigma_factor != 1:
        sigma2 = F32(sigma_factor) * sigma2
    sigma2 = np.repeat(sigma2 / F32(QK_K), QK_K // size)[None, :]
    if qw is None:
        w = F32(0.25) * sigma2 + xe * xe
    else:
        w = np.ascontiguousarray(np.asarray(qw, dtype=np.float32).reshape(n * QK_K // size, size).T) \
            * np.sqrt(sigma2 + xe * xe)
    return xe, w


def _signs(xe: np.ndarray, w: np.ndarray, even: bool) -> tuple[np.ndarray, np.ndarray]:
    """(|x| with, when `even`, the least important weight of each odd-signed group negated back; the sign bytes
    [groups, m] uint8: bit i set where element i is negative, 7 bits when `even`)."""
    size, m = xe.shape
    neg = xe < 0
    xval = np.where(neg, -xe, xe)
    bits = neg.reshape(size // 8, 8, m).astype(np.uint8)
    if even:
        odd = (bits.sum(axis=1) & 1).astype(bool)  # [groups, m]
        if odd.any():
            imin = np.argmin(((w * xe) * xe).reshape(size // 8, 8, m), axis=1)  # first smallest w x^2
            k, j = np.nonzero(odd)
            i = imin[k, j]
            xval[8 * k + i, j] = -xval[8 * k + i, j]
            bits[k, i, j] ^= 1
    signs = (bits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return xval, (signs & 127) if even else signs


def _ladder(step: int, span: np.ndarray) -> np.ndarray:
    """The inverse scale of candidate `step`: (5 + step*0.1) / span."""
    return (F32(2 * KMAXQ - 1) + F32(step) * F32(0.1)) / span


def _search(sb: _SubBlocks, live: np.ndarray, scale: np.ndarray, span: np.ndarray, steps: int, init_grid: int,
            refine_all: bool) -> tuple[np.ndarray, np.ndarray]:
    """The scale ladder and the refinement pass of one chunk's live sub-blocks [m]: (scale [m], grid [groups, m])."""
    m, groups = sb.m, sb.groups
    best = np.zeros(m, dtype=np.float32)
    grid = np.full((groups, m), init_grid, dtype=np.int32)
    on_grid = np.ones((groups, m), dtype=bool)
    active = np.broadcast_to(live, (groups, m))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(-steps, steps + 1):
            inv_step = _ladder(step, span)
            cand, cand_on = sb.grid_points(inv_step, F32(1) / inv_step, active)
            sumqx, sumq2 = sb.sums(cand)
            better = live & (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(better, sumqx / sumq2, scale)
            best = np.where(better, scale * sumqx, best)
            grid = np.where(better, cand, grid)
            on_grid = np.where(better, cand_on, on_grid)
        redo = live & (scale > 0)
        again = np.broadcast_to(redo, (groups, m)) if refine_all else redo & ~on_grid
        if not refine_all:
            redo = redo & again.any(axis=0)
        if redo.any():
            cand, _ = sb.grid_points(F32(1) / scale, scale, again)
            grid = np.where(again, cand, grid)
            sumqx, sumq2 = sb.sums(grid)
            scale = np.where(redo & (sumq2 > 0), sumqx / sumq2, scale)
    return scale.astype(np.float32), grid


def _sub_blocks(x: np.ndarray, qw: np.ndarray | None, type_name: str):
    """Search one chunk [n, 256]: (scales [n, nsub] >= 0, grid indices [n, nsub, groups], signs [n, nsub, groups];
    grid and signs 0 in dead sub-blocks)."""
    n = x.shape[0]
    size = 32 if type_name == "IQ2_XXS" else 16
    lat = lattice(type_name)
    xe, w = _weights(x, qw, size, 2 if type_name == "IQ2_S" else 1)
    xval, signs = _signs(xe, w, even=type_name != "IQ2_S")
    sb = _SubBlocks(w, xval, lat)
    vmax = xval.max(axis=0)
    if type_name == "IQ2_XXS":
        scale, _ = search.make_qp_quants(xval, KMAXQ + 1, w)
        span = scale * F32(KMAXQ)
        live = (vmax >= GROUP_MAX_EPS) & (span > 0)
        scale, grid = _search(sb, live, scale, span, 6, 0, refine_all=True)
        sign_mask = 127
    else:
        live = vmax >= (GROUP_MAX_EPS if type_name == "IQ2_XS" else GROUP_MAX_EPS_IQ2_S)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = vmax / F32(2 * KMAXQ - 1)
        scale, grid = _search(sb, live, scale, vmax, 9, int(lat.grid_of_map[0]), refine_all=False)
        sign_mask = 127 if type_name == "IQ2_XS" else 255
    flip = live & (scale < 0)
    signs = np.where(flip, ~signs & sign_mask, signs)
    scale = np.where(flip, -scale, scale)
    scale = np.where(live, scale, F32(0)).astype(np.float32)
    grid = np.where(live, grid, 0)
    signs = np.where(live, signs, 0).astype(np.uint8)
    nsub = QK_K // size
    return (scale.reshape(n, nsub), grid.reshape(-1, n, nsub).transpose(1, 2, 0),
            signs.reshape(-1, n, nsub).transpose(1, 2, 0))


def _block_scale(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(max_scale [n], d = max_scale/31 [n], 4-bit sub-block scales [n, nsub] as uint32)."""
    max_scale = np.zeros(scales.shape[0], dtype=np.float32)
    for j in range(scales.shape[1]):  # MAX(max_scale, scale) in sub-block order
        max_scale = np.where(max_scale > scales[:, j], max_scale, scales[:, j])
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = F32(1) / d
        ls = nearest_int(F32(0.5) * (inv[:, None] * scales - F32(1)))
    return max_scale, d, np.clip(ls, 0, 15).astype(np.uint32)


def _iq2_xxs_chunk(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    scales, grid, signs = _sub_blocks(x, qw, "IQ2_XXS")  # [n, 8], [n, 8, 4], [n, 8, 4]
    max_scale, d, ls = _block_scale(scales)
    g = grid.astype(np.uint32)
    s = signs.astype(np.uint32)
    words = np.empty((x.shape[0], 8, 2), dtype="<u4")
    words[..., 0] = g[..., 0] | (g[..., 1] << 8) | (g[..., 2] << 16) | (g[..., 3] << 24)
    words[..., 1] = s[..., 0] | (s[..., 1] << 7) | (s[..., 2] << 14) | (s[..., 3] << 21) | (ls << 28)
    out = np.empty((x.shape[0], 66), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16(d)
    out[:, 2:66] = words.view(np.uint8).reshape(-1, 64)
    out[max_scale == 0] = 0
    return out


def _iq2_xs_chunk(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    scales, grid, signs = _sub_blocks(x, qw, "IQ2_XS")  # [n, 16], [n, 16, 2], [n, 16, 2]
    max_scale, d, ls = _block_scale(scales)
    qs = np.ascontiguousarray(grid.astype(np.uint16) | (signs.astype(np.uint16) << 9), dtype="<u2")
    out = np.empty((x.shape[0], 74), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16(d)
    out[:, 2:66] = qs.view(np.uint8).reshape(-1, 64)
    out[:, 66:74] = ls[:, 0::2] | (ls[:, 1::2] << 4)
    out[max_scale == 0] = 0
    return out


def _iq2_s_chunk(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    scales, grid, signs = _sub_blocks(x, qw, "IQ2_S")  # [n, 16], [n, 16, 2], [n, 16, 2]
    max_scale, d, ls = _block_scale(scales)
    n = x.shape[0]
    g = grid.reshape(n, 32)
    out = np.empty((n, 82), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16(d * F32(0.9875))
    out[:, 2:34] = g & 255
    out[:, 34:66] = signs.reshape(n, 32)
    high = (g >> 8).reshape(n, 8, 4) << (2 * np.arange(4))
    out[:, 66:74] = high[..., 0] | high[..., 1] | high[..., 2] | high[..., 3]
    out[:, 74:82] = ls[:, 0::2] | (ls[:, 1::2] << 4)
    dead = max_scale == 0  # ggml keeps the codes, with zero scales
    out[dead, 0:2] = 0
    out[dead, 74:82] = 0
    return out


def iq2_xxs(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """[n, 256] float32 -> IQ2_XXS blocks [n, 66]. `qw` is required."""
    require_importance("IQ2_XXS", qw)
    return encode_chunks(_iq2_xxs_chunk, x, qw, 66, CHUNK)


def iq2_xs(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """[n, 256] float32 -> IQ2_XS blocks [n, 74]. `qw` is required."""
    require_importance("IQ2_XS", qw)
    return encode_chunks(_iq2_xs_chunk, x, qw, 74, CHUNK)


def iq2_s(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """[n, 256] float32 -> IQ2_S blocks [n, 82], with or without importance."""
    return encode_chunks(_iq2_s_chunk, x, qw, 82, CHUNK)


ENCODERS = {"IQ2_XXS": iq2_xxs, "IQ2_XS": iq2_xs, "IQ2_S": iq2_s}
