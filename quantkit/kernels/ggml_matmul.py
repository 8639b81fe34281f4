"""Triton kernels for ggml block types (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS and the lattice i-quants IQ2_XXS,
IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) read straight from the GGUF block bytes.

  - `ggml_dequant(data, type, rows)`: block bytes [R, bytes_per_row] -> float [R, cols] (used in row chunks for
    prefill: `x @ chunk^T`, so the full matrix never exists at once).
  - `ggml_matvec(x, data, type)`: fused dequant + matmul for decode (batch 1-8), split-K over the columns.
Each program decodes 32-element chunks of BR rows with `_chunk` (layouts: formats/gguf.md, block types; the i-quants:
ggml-common.h). The value/grid/sign tables a type needs come in one flat float32 tensor, `ggml_ref.kernel_table`
(the same values the reference decoder looks up), through the kernels' `kv_ptr`.
References: `quantkit.kernels.ggml_ref.dequantize_rows(data, type)` and `x.float() @ dequantize_rows(...).T`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.ggml_types import block_size, type_size
from quantkit.kernels import tune
from quantkit.kernels.ggml_ref import kernel_table

TYPE_IDS = {"Q8_0": 0, "Q4_0": 1, "Q4_K": 2, "Q5_K": 3, "Q6_K": 4, "IQ4_NL": 5, "IQ4_XS": 6,
            "IQ2_XXS": 7, "IQ2_XS": 8, "IQ2_S": 9, "IQ3_XXS": 10, "IQ3_S": 11, "IQ1_S": 12, "IQ1_M": 13}
SUPPORTED = tuple(TYPE_IDS)
# where the ksigns table starts in `kernel_table(type)`: after the grid, entries × values per entry
# (tests/test_kernels_ggml.py checks them against the table builder)
_SIGNS_IQ2_XXS = tl.constexpr(256 * 8)
_SIGNS_IQ2_XS = tl.constexpr(512 * 8)
_SIGNS_IQ3_XXS = tl.constexpr(256 * 4)
KSIGNS_AT = {"IQ2_XXS": _SIGNS_IQ2_XXS.value, "IQ2_XS": _SIGNS_IQ2_XS.value, "IQ3_XXS": _SIGNS_IQ3_XXS.value}


@triton.jit
def _u16_at(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return lo | (hi << 8)


@triton.jit
def _f16_at(ptr, mask):
    return _u16_at(ptr, mask).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _chunk(data_ptr, kv_ptr, row_off, row_ok, c, TYPE: tl.constexpr):
    """Elements 32c .. 32c+31 of each row as fp32 [BR, 32]; row_off = row * bytes_per_row (int64 [BR]); kv_ptr:
    the type's tables (`ggml_ref.kernel_table`: the IQ4 values, or an i-quant's grid, then ksigns where it uses them).
    The i-quants (TYPE 7..13) have 256-element super-blocks: chunk c is sub-block c % 8 of block c // 8, four groups
    of 8 values (g = l // 8, lane k = l % 8) each looked up in the grid (IQ3_*: two 4-value entries per group) and
    multiplied by signs; the products are the reference's, in its order (d * (0.5 + s) * f, then * grid, then * sign;
    IQ1_*: dl * (grid + delta)), with no a * b + c that could fuse into an fma."""
    l = tl.arange(0, 32)
    m2 = row_ok[:, None]
    g = l // 8
    k = l % 8
    if TYPE == 7:  # IQ2_XXS (66 B): d f16, then per sub-block 4 grid bytes + u32 (4x7-bit sign index, 4-bit scale)
        blk = row_off + (c // 8) * 66
        j = c % 8
        d = _f16_at(data_ptr + blk, row_ok)
        aux = _u16_at(data_ptr + blk + 6 + 8 * j, row_ok) | (_u16_at(data_ptr + blk + 8 + 8 * j, row_ok) << 16)
        db = d * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.25
        gi = tl.load(data_ptr + blk[:, None] + 2 + 8 * j + g[None, :], mask=m2, other=0).to(tl.int32)
        si = (aux[:, None] >> (7 * g)[None, :]) & 127
        w = (db[:, None] * tl.load(kv_ptr + gi * 8 + k[None, :])
             * tl.load(kv_ptr + _SIGNS_IQ2_XXS + si * 8 + k[None, :]))
    elif TYPE == 8:  # IQ2_XS (74 B): d f16, qs u16[32] (9-bit grid index | 7-bit sign index << 9), scales u8[8]
        blk = row_off + (c // 8) * 74
        j = c % 8
        d = _f16_at(data_ptr + blk, row_ok)
        sc = tl.load(data_ptr + blk + 66 + j, mask=row_ok, other=0).to(tl.int32)
        db = d[:, None] * (0.5 + tl.where((g < 2)[None, :], sc[:, None] & 15, sc[:, None] >> 4).to(tl.float32)) * 0.25
        q = _u16_at(data_ptr + blk[:, None] + 2 + 2 * (4 * j + g)[None, :], m2)
        w = db * tl.load(kv_ptr + (q & 511) * 8 + k[None, :]) * tl.load(kv_ptr + _SIGNS_IQ2_XS + (q >> 9) * 8 + k)
    elif TYPE == 9:  # IQ2_S (82 B): d f16, qs u8[32] grid low bytes, signs u8[32], qh u8[8] (2 bits each), scales u8[8]
        blk = row_off + (c // 8) * 82
        j = c % 8
        d = _f16_at(data_ptr + blk, row_ok)
        sc = tl.load(data_ptr + blk + 74 + j, mask=row_ok, other=0).to(tl.int32)
        db = d[:, None] * (0.5 + tl.where((g < 2)[None, :], sc[:, None] & 15, sc[:, None] >> 4).to(tl.float32)) * 0.25
        qh = tl.load(data_ptr + blk + 66 + j, mask=row_ok, other=0).to(tl.int32)
        gi = tl.load(data_ptr + blk[:, None] + 2 + 4 * j + g[None, :], mask=m2, other=0).to(tl.int32)
        gi = gi | (((qh[:, None] >> (2 * g)[None, :]) & 3) << 8)
        sb = tl.load(data_ptr + blk[:, None] + 34 + 4 * j + g[None, :], mask=m2, other=0).to(tl.int32)
        sign = 1.0 - 2.0 * ((sb >> k[None, :]) & 1).to(tl.float32)
        w = db * tl.load(kv_ptr + gi * 8 + k[None, :]) * sign
    elif TYPE == 10:  # IQ3_XXS (98 B): d f16, qs u8[64] (4-value grid indices), u32[8] (4x7-bit sign index, scale)
        blk = row_off + (c // 8) * 98
        j = c % 8
        d = _f16_at(data_ptr + blk, row_ok)
        aux = _u16_at(data_ptr + blk + 66 + 4 * j, row_ok) | (_u16_at(data_ptr + blk + 68 + 4 * j, row_ok) << 16)
        db = d * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.5
        gi = tl.load(data_ptr + blk[:, None] + 2 + 8 * j + (l // 4)[None, :], mask=m2, other=0).to(tl.int32)
        si = (aux[:, None] >> (7 * g)[None, :]) & 127
        w = (db[:, None] * tl.load(kv_ptr + gi * 4 + (l % 4)[None, :])
             * tl.load(kv_ptr + _SIGNS_IQ3_XXS + si * 8 + k[None, :]))
    elif TYPE == 11:  # IQ3_S (110 B): d f16, qs u8[64], qh u8[8] (bit 8 of each index), signs u8[32], scales u8[4]
        blk = row_off + (c // 8) * 110
        j = c % 8
        d = _f16_at(data_ptr + blk, row_ok)
        sc = tl.load(data_ptr + blk + 106 + j // 2, mask=row_ok, other=0).to(tl.int32)
        db = d * (1 + 2 * ((sc >> (4 * (j % 2))) & 15)).to(tl.float32)
        qh = tl.load(data_ptr + blk + 66 + j, mask=row_ok, other=0).to(tl.int32)
        gi = tl.load(data_ptr + blk[:, None] + 2 + 8 * j + (l // 4)[None, :], mask=m2, other=0).to(tl.int32)
        gi = gi | (((qh[:, None] >> (l // 4)[None, :]) & 1) << 8)
        sb = tl.load(data_ptr + blk[:, None] + 74 + 4 * j + g[None, :], mask=m2, other=0).to(tl.int32)
        sign = 1.0 - 2.0 * ((sb >> k[None, :]) & 1).to(tl.float32)
        w = db[:, None] * tl.load(kv_ptr + gi * 4 + (l % 4)[None, :]) * sign
    elif TYPE == 12:  # IQ1_S (50 B): d f16, qs u8[32], qh u16[8] (4x3 high index bits, 3-bit scale, delta sign)
        blk = row_off + (c // 8) * 50
        j = c % 8
        d = _f16_at(data_ptr + blk, row_ok)
        qh = _u16_at(data_ptr + blk + 34 + 2 * j, row_ok)
        dl = d * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
        delta = tl.where((qh >> 15) != 0, -0.125, 0.125)
        gi = tl.load(data_ptr + blk[:, None] + 2 + 4 * j + g[None, :], mask=m2, other=0).to(tl.int32)
        gi = gi | (((qh[:, None] >> (3 * g)[None, :]) & 7) << 8)
        w = dl[:, None] * (tl.load(kv_ptr + gi * 8 + k[None, :]) + delta[:, None])
    elif TYPE == 13:  # IQ1_M (56 B): qs u8[32], qh u8[16] (3 high index bits + delta sign per group), scales u16[4]
        blk = row_off + (c // 8) * 56
        j = c % 8
        dbits = ((tl.load(data_ptr + blk + 49, mask=row_ok, other=0).to(tl.int32) >> 4)
                 | ((tl.load(data_ptr + blk + 51, mask=row_ok, other=0).to(tl.int32) >> 4) << 4)
                 | ((tl.load(data_ptr + blk + 53, mask=row_ok, other=0).to(tl.int32) >> 4) << 8)
                 | ((tl.load(data_ptr + blk + 55, mask=row_ok, other=0).to(tl.int32) >> 4) << 12))
        d = dbits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)  # the 4 top nibbles of the scale words
        sw = _u16_at(data_ptr + blk + 48 + 2 * (j // 2), row_ok)
        sc = (sw[:, None] >> (3 * (2 * (j % 2) + g // 2))[None, :]) & 7
        dl = d[:, None] * (2 * sc + 1).to(tl.float32)
        qh = tl.load(data_ptr + blk[:, None] + 32 + 2 * j + (g // 2)[None, :], mask=m2, other=0).to(tl.int32)
        qh = (qh >> (4 * (g % 2))[None, :]) & 15
        gi = tl.load(data_ptr + blk[:, None] + 4 * j + g[None, :], mask=m2, other=0).to(tl.int32) | ((qh & 7) << 8)
        delta = tl.where((qh & 8) != 0, -0.125, 0.125)
        w = dl * (tl.load(kv_ptr + gi * 8 + k[None, :]) + delta)
    elif TYPE == 5:  # IQ4_NL: d f16, qs u8[16] (nibbles as Q4_0) indexing the value table
        base = row_off + c * 18
        d = _f16_at(data_ptr + base, row_ok)
        b = tl.load(data_ptr + base[:, None] + 2 + (l % 16)[None, :], mask=m2, other=0).to(tl.int32)
        w = d[:, None] * tl.load(kv_ptr + tl.where((l < 16)[None, :], b & 0xF, b >> 4))
    elif TYPE == 6:  # IQ4_XS: d f16, scales_h u16, scales_l u8[4], qs u8[128]; 8 chunks of 32 per 256-block
        blk = c // 8
        j = c % 8
        base = row_off + blk * 136
        d = _f16_at(data_ptr + base, row_ok)
        sh = _u16_at(data_ptr + base + 2, row_ok)
        sl = tl.load(data_ptr + base + 4 + j // 2, mask=row_ok, other=0).to(tl.int32)
        ls = ((sl >> (4 * (j % 2))) & 0xF) | (((sh >> (2 * j)) & 3) << 4)
        b = tl.load(data_ptr + base[:, None] + 8 + 16 * j + (l % 16)[None, :], mask=m2, other=0).to(tl.int32)
        dl = d * (ls - 32).to(tl.float32)
        w = dl[:, None] * tl.load(kv_ptr + tl.where((l < 16)[None, :], b & 0xF, b >> 4))
    elif TYPE == 0:  # Q8_0: d f16, qs int8[32]
        base = row_off + c * 34
        d = _f16_at(data_ptr + base, row_ok)
        q = tl.load(data_ptr + base[:, None] + 2 + l[None, :], mask=m2, other=0).to(tl.int8, bitcast=True)
        w = d[:, None] * q.to(tl.float32)
    elif TYPE == 1:  # Q4_0: d f16, qs u8[16]: element j low nibble of byte j, j+16 high nibble
        base = row_off + c * 18
        d = _f16_at(data_ptr + base, row_ok)
        b = tl.load(data_ptr + base[:, None] + 2 + (l % 16)[None, :], mask=m2, other=0).to(tl.int32)
        q = tl.where((l < 16)[None, :], b & 0xF, b >> 4) - 8
        w = d[:, None] * q.to(tl.float32)
    elif TYPE == 4:  # Q6_K: ql[128] qh[64] scales i8[16] d f16 @208; 8 chunks of 32 per 256-block
        blk = c // 8
        j = c % 8
        h = j // 4
        jj = j % 4
        base = row_off + blk * 210
        ql = tl.load(data_ptr + base[:, None] + 64 * h + 32 * (jj % 2) + l[None, :], mask=m2, other=0).to(tl.int32)
        qh = tl.load(data_ptr + base[:, None] + 128 + 32 * h + l[None, :], mask=m2, other=0).to(tl.int32)
        q = ((ql >> (4 * (jj // 2))) & 0xF) | (((qh >> (2 * jj)) & 3) << 4)
        sc = tl.load(data_ptr + base[:, None] + 192 + 2 * j + (l // 16)[None, :], mask=m2, other=0)
        d = _f16_at(data_ptr + base + 208, row_ok)
        w = (d[:, None] * sc.to(tl.int8, bitcast=True).to(tl.float32)) * (q - 32).to(tl.float32)
    else:  # Q4_K (144 B) / Q5_K (176 B): d, dmin f16, scales[12] 6-bit packed, (qh[32]), qs[128]
        if TYPE == 2:
            BLK = 144
            QS = 16
        else:
            BLK = 176
            QS = 48
        blk = c // 8
        j = c % 8
        base = row_off + blk * BLK
        d = _f16_at(data_ptr + base, row_ok)
        dmin = _f16_at(data_ptr + base + 2, row_ok)
        lo = j < 4
        s_j = tl.load(data_ptr + base + 4 + j, mask=row_ok, other=0).to(tl.int32)
        s_j4 = tl.load(data_ptr + base + 8 + j, mask=row_ok, other=0).to(tl.int32)
        s_jm4 = tl.load(data_ptr + base + 4 + tl.where(lo, j, j - 4), mask=row_ok, other=0).to(tl.int32)
        sc = tl.where(lo, s_j & 63, (s_j4 & 0xF) | ((s_jm4 >> 6) << 4))
        mn = tl.where(lo, s_j4 & 63, (s_j4 >> 4) | ((s_j >> 6) << 4))
        b = tl.load(data_ptr + base[:, None] + QS + 32 * (j // 2) + l[None, :], mask=m2, other=0).to(tl.int32)
        q = (b >> (4 * (j % 2))) & 0xF
        if TYPE == 3:
            qh = tl.load(data_ptr + base[:, None] + 16 + l[None, :], mask=m2, other=0).to(tl.int32)
            q = q | (((qh >> j) & 1) << 4)
        w = (d * sc.to(tl.float32))[:, None] * q.to(tl.float32) - (dmin * mn.to(tl.float32))[:, None]
    return w


@triton.jit
def _ggml_dequant_kernel(data_ptr, kv_ptr, out_ptr, R, row_bytes, cols, TYPE: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1)
    ok = rows < R
    w = _chunk(data_ptr, kv_ptr, rows.to(tl.int64) * row_bytes, ok, c, TYPE)
    l = tl.arange(0, 32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * cols + c * 32 + l[None, :], w.to(out_ptr.dtype.element_ty),
             mask=ok[:, None])


@triton.jit
def _ggml_matvec_kernel(x_ptr, data_ptr, kv_ptr, out_ptr, M, R, row_bytes, stride_xm, chunks, chunks_per_split,
                        TYPE: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    pid_k = tl.program_id(1)
    ok = rows < R
    row_off = rows.to(tl.int64) * row_bytes
    offs_m = tl.arange(0, BM)
    m_ok = offs_m < M
    l = tl.arange(0, 32)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(chunks, c0 + chunks_per_split)
    for c in range(c0, c1):
        w = _chunk(data_ptr, kv_ptr, row_off, ok, c, TYPE)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + c * 32 + l[None, :], mask=m_ok[:, None], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    omask = m_ok[:, None] & ok[None, :]
    if SPLIT > 1:
        tl.store(out_ptr + pid_k * M * R + offs_m[:, None] * R + rows[None, :], acc, mask=omask)
    else:
        tl.store(out_ptr + offs_m[:, None] * R + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


def _check(data: torch.Tensor, type_name: str) -> tuple[int, int]:
    if type_name not in TYPE_IDS:
        raise ValueError(f"no Triton kernel for ggml type {type_name}; supported: {', '.join(SUPPORTED)}")
    qk, nbytes = block_size(type_name), type_size(type_name)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % nbytes:
        raise ValueError(f"{type_name}: expected uint8 [rows, n*{nbytes}], got {data.dtype} {list(data.shape)}")
    return data.shape[0], data.shape[1] // nbytes * qk


def ggml_dequant(data: torch.Tensor, type_name: str, dtype=torch.float32,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Block bytes [R, bytes_per_row] -> [R, cols] in `dtype` (reference: ggml_ref.dequantize_rows)."""
    r, cols = _check(data, type_name)
    if out is None:
        out = torch.empty((r, cols), device=data.device, dtype=dtype)
    br = 32
    grid = (triton.cdiv(r, br), cols // 32)
    _ggml_dequant_kernel[grid](data, kernel_table(type_name, data.device), out, r, data.shape[1], cols,
                               TYPE=TYPE_IDS[type_name], BR=br)
    return out


def ggml_matvec(x: torch.Tensor, data: torch.Tensor, type_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M <= 8, cols] @ dequant(data)^T -> [M, R] in x.dtype, dequantizing in registers."""
    from quantkit.kernels.int_matmul import sum_splits

    r, cols = _check(data, type_name)
    m = x.shape[0]
    if x.shape[1] != cols or m > 8:
        raise ValueError(f"ggml_matvec: x {list(x.shape)} does not fit [<=8, {cols}]")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if out is None:
        out = torch.empty((m, r), device=x.device, dtype=x.dtype)
    chunks = cols // 32
    bm = triton.next_power_of_2(m)

    def launch(cfg, dst):
        br, warps, mul = cfg
        tiles = triton.cdiv(r, br)
        want = max(1, (2 * tune.sm_count(x.device)) // tiles) * mul
        split = max(1, min(want, chunks // 8 if chunks >= 16 else 1, 16))
        per = triton.cdiv(chunks, split)
        split = triton.cdiv(chunks, per)
        target = dst if split == 1 else torch.empty((split, m, r), device=x.device, dtype=torch.float32)
        _ggml_matvec_kernel[(tiles, split)](x, data, kernel_table(type_name, data.device), target, m, r,
                                            data.shape[1], x.stride(0), chunks, per, TYPE=TYPE_IDS[type_name],
                                            SPLIT=split, BM=bm, BR=br, num_warps=warps)
        if split > 1:
            sum_splits(target, dst)

    if tune.interpreting():
        cands = [(16, 4, 1)]
    else:
        cands = [(br, w, mul) for br, w in ((32, 4), (64, 4), (128, 8), (16, 2)) if bm * br <= 512 for mul in (1, 2)]
    key = ("ggml", type_name, bm, r, cols, x.dtype, x.device.type)
    cfg = tune.pick(key, cands, lambda c: launch(c, torch.empty_like(out)))
    launch(cfg, out)
    return out


def ggml_matmul(x: torch.Tensor, data: torch.Tensor, type_name: str, max_chunk_elems: int = 1 << 24) -> torch.Tensor:
    """x [..., cols] @ dequant(W)^T: fused matvec for <= 8 rows, else dequantize row chunks and use torch matmul."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    r, cols = _check(data, type_name)
    if x2.shape[0] <= 8:
        return ggml_matvec(x2, data, type_name).view(*lead, r)
    out = torch.empty((x2.shape[0], r), device=x.device, dtype=x.dtype)
    step = max(32, max_chunk_elems // cols)
    for r0 in range(0, r, step):
        w = ggml_dequant(data[r0:r0 + step], type_name, dtype=x.dtype)
        out[:, r0:r0 + step] = x2 @ w.t()
    return out.view(*lead, r)
