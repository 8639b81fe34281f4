"""The ggml dequantizer: block bytes -> float32, bit-exact, in plain torch (any device).

Input is the raw bytes as a uint8 tensor [rows, bytes_per_row] (what GGUF stores, what `GGMLTensor.data` holds);
output is float32 [rows, cols]. Layouts: formats/gguf.md (block types); the arithmetic is that of ggml-quants.c's
`dequantize_row_*`: the same float32 products and differences in the same order, each a separate correctly
rounded torch op (no fused multiply-add), so every value equals ggml's — and gguf-py's, which
tests/test_kernels_ggml.py checks bit for bit for every type. Besides `SUPPORTED_TYPES` it decodes the
`DECODE_ONLY_TYPES` (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, TQ1_0, TQ2_0; layouts in ggml-common.h),
whose grid tables it takes from gguf-py at first use. `GGMLTensor.dequantize`, the torch runtime
(`runtime/qlinear.py`) and the Triton kernels' tests all use this one; the CPU fast paths (`cpu.py`, `cpu_ext.py`)
reuse its field decoders.
"""

from __future__ import annotations

import torch

from quantkit.errors import FormatError
from quantkit.ggml_types import (
    DECODED_TYPES,
    IQ4_VALUES,
    block_size,
    f16_to_f32,
    is_float_type,
    torch_dtype,
    type_size,
)

CHUNK_ELEMENTS = 1 << 20  # values decoded at once: bounds the int32/float32 temporaries of a large tensor


def _blocks(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """uint8 [rows, n * type_size] -> [rows, n, type_size]."""
    nbytes = type_size(type_name)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % nbytes:
        raise FormatError(f"{type_name}: expected uint8 [rows, n*{nbytes}] block bytes, got {data.dtype} "
                          f"{list(data.shape)}")
    return data.reshape(data.shape[0], -1, nbytes)


def _shifts(step: int, n: int, device) -> torch.Tensor:
    return torch.arange(0, step * n, step, device=device, dtype=torch.int32)


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32]: element j is the low nibble of byte j, element j+16 its high nibble."""
    q = qs.to(torch.int32)
    return torch.cat([q & 0xF, q >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[..., m] bytes -> [..., 8, m]: [.., k, l] is bit k of byte l."""
    return (b.to(torch.int32)[..., None, :] >> _shifts(1, 8, b.device)[:, None]) & 1


def _qh32(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 qh [..., 4] (a little-endian uint32) -> [..., 32]: element j is bit j."""
    return _bits(qh).transpose(-1, -2).flatten(-2)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K qs [..., 64] -> 2-bit codes [..., 256] in element order (bits 2j..2j+1 of byte 32h + l hold
    element 128h + 32j + l)."""
    q = qs.to(torch.int32).reshape(*qs.shape[:-1], 2, 1, 32)
    return ((q >> _shifts(2, 4, qs.device)[:, None]) & 3).reshape(*qs.shape[:-1], 256)


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packed 6-bit scales [..., 12] -> (sc, m) each int32 [..., 8] (get_scale_min_k4)."""
    s = scales.to(torch.int32)
    lo_sc, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], dim=-1)
    m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=-1)
    return sc, m


def _q4k_codes(qs: torch.Tensor) -> torch.Tensor:
    """qs [..., 128] -> 4-bit codes [..., 8, 32] (sub-block 2c: low nibbles of qs[32c:32c+32], 2c+1: high)."""
    q = qs.to(torch.int32).reshape(*qs.shape[:-1], 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=-2).reshape(*qs.shape[:-1], 8, 32)


# ---- one function per type: blocks [rows, nb, type_size] -> values [rows, nb, ...] (block_size in all) ----

def _q8_0(b):
    return f16_to_f32(b[..., 0:2])[..., None] * b[..., 2:34].view(torch.int8).float()


# the 32-value legacy blocks: byte offsets of the high bits (None: 4-bit codes) and of the nibbles, whether an fp16
# min follows the fp16 scale, and the offset taken from the codes
LEGACY_LAYOUT = {"Q4_0": (None, 2, False, 8), "Q4_1": (None, 4, True, 0), "Q5_0": (2, 6, False, 16),
                 "Q5_1": (4, 8, True, 0)}


def legacy_fields(b: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Q4_0/Q4_1/Q5_0/Q5_1 blocks [..., block bytes] -> (codes int [..., 32] in 0..31, d [...], m [...] or None,
    offset): w = d * (code - offset) (+ m)."""
    qh, qs, has_min, offset = LEGACY_LAYOUT[type_name]
    codes = _nibbles32(b[..., qs:qs + 16])
    if qh is not None:
        codes = codes | (_qh32(b[..., qh:qh + 4]) << 4)
    return codes, f16_to_f32(b[..., 0:2]), f16_to_f32(b[..., 2:4]) if has_min else None, offset


def _legacy(type_name: str):
    def dequantize(b):
        codes, d, m, offset = legacy_fields(b, type_name)
        w = d[..., None] * (codes - offset).float()
        return w if m is None else w + m[..., None]
    return dequantize


def _q2_k(b):
    sc = b[..., 0:16].to(torch.int32)
    dl = f16_to_f32(b[..., 80:82])[..., None] * (sc & 0xF)  # [.., 16] sub-block scales
    ml = f16_to_f32(b[..., 82:84])[..., None] * (sc >> 4)
    q = _crumbs(b[..., 16:80]).reshape(*b.shape[:-1], 16, 16)
    return dl[..., None] * q - ml[..., None]


def _q3_k(b):
    s = b[..., 96:108].to(torch.int32)
    low = torch.cat([s[..., 0:8] & 0xF, s[..., 0:8] >> 4], dim=-1)
    high = (s[..., None, 8:12] >> _shifts(2, 4, b.device)[:, None]) & 3  # [.., s // 4, s % 4]
    dl = f16_to_f32(b[..., 108:110])[..., None] * ((low | (high.flatten(-2) << 4)) - 32)
    q = _crumbs(b[..., 32:96]) - ((_bits(b[..., 0:32]).flatten(-2) ^ 1) << 2)  # hmask bit clear: -4
    return dl[..., None] * q.reshape(*b.shape[:-1], 16, 16)


def _k4(b, q):
    d, dmin = f16_to_f32(b[..., 0:2]), f16_to_f32(b[..., 2:4])
    sc, m = k_scale_min(b[..., 4:16])
    return (d[..., None] * sc)[..., None] * q - (dmin[..., None] * m)[..., None]


def _q4_k(b):
    return _k4(b, _q4k_codes(b[..., 16:144]))


def _q5_k(b):
    return _k4(b, _q4k_codes(b[..., 48:176]) | (_bits(b[..., 16:48]) << 4))  # bit 4 of 32s+l: qh[l] bit s


def _q6_k(b):
    ql = b[..., 0:128].to(torch.int32).reshape(*b.shape[:-1], 2, 64)  # [.., half, 64]
    qh = b[..., 128:192].to(torch.int32).reshape(*b.shape[:-1], 2, 1, 32)  # [.., half, 1, 32]
    low = torch.stack([ql[..., 0:32] & 0xF, ql[..., 32:64] & 0xF, ql[..., 0:32] >> 4, ql[..., 32:64] >> 4], dim=-2)
    q = (low | (((qh >> _shifts(2, 4, b.device)[:, None]) & 3) << 4)).reshape(*b.shape[:-1], 16, 16) - 32
    d = f16_to_f32(b[..., 208:210])[..., None] * b[..., 192:208].view(torch.int8).float()  # [.., 16]
    return d[..., None] * q.float()


def iq4_values(device) -> torch.Tensor:
    """`IQ4_VALUES` as float32 [16] on `device` (cached): the decoders, the Triton kernels and the GPTQ grids look
    4-bit indices up in it."""
    return _table("IQ4", device)


def _iq4_values(codes: torch.Tensor) -> torch.Tensor:
    return iq4_values(codes.device)[codes]


def _iq4_nl(b):
    return f16_to_f32(b[..., 0:2])[..., None] * _iq4_values(_nibbles32(b[..., 2:18]))


def iq4_xs_scales(b: torch.Tensor) -> torch.Tensor:
    """IQ4_XS scales_h (uint16 at byte 2) and scales_l[4] (byte 4) -> the 8 signed sub-block scales, int32."""
    s = b[..., 2:8].to(torch.int32)
    high = ((s[..., 0:1] | (s[..., 1:2] << 8)) >> _shifts(2, 8, b.device)) & 3
    low = (s[..., 2:6, None] >> _shifts(4, 2, b.device)).flatten(-2) & 0xF  # sub-block 2i: low nibble of byte i
    return (low | (high << 4)) - 32


def _iq4_xs(b):
    dl = f16_to_f32(b[..., 0:2])[..., None] * iq4_xs_scales(b).float()  # [.., 8]
    codes = _nibbles32(b[..., 8:136].reshape(*b.shape[:-1], 8, 16))
    return dl[..., None] * _iq4_values(codes)


# ---- the grid i-quants (IQ2_*, IQ3_*, IQ1_*): groups of 8 (or 4) values looked up in gguf-py's grid tables ----

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}  # (table, device) -> tensor, built at first use


def _table(name: str, device) -> torch.Tensor:
    """gguf-py's grid of type `name` as float32 [entries, 8 or 4] (`init_grid`'s values: exact small integers), for
    "ksigns" the ±1.0 signs [128, 8] that ggml's ksigns_iq2xs gives a 7-bit sign index, for "IQ4" the IQ4 values;
    cached per device."""
    key = (name, torch.device(device))
    if key not in _TABLES:
        from gguf import quants

        if name == "IQ4":
            t = torch.tensor(IQ4_VALUES, dtype=torch.float32)
        elif name == "ksigns":
            k = torch.tensor(list(quants.IQ2_XXS.ksigns), dtype=torch.int32)
            t = (1 - 2 * ((k[:, None] >> _shifts(1, 8, "cpu")) & 1)).float()
        else:
            cls = getattr(quants, name)
            cls.init_grid()
            t = torch.from_numpy(cls.grid.reshape(cls.grid_shape).copy())
        _TABLES[key] = t.to(device)
    return _TABLES[key]


# the tables each Triton-decoded type reads (kernels/ggml_matmul.py), concatenated in this order
KERNEL_TABLE_PARTS = {"IQ4_NL": ("IQ4",), "IQ4_XS": ("IQ4",),
                      "IQ2_XXS": ("IQ2_XXS", "ksigns"), "IQ2_XS": ("IQ2_XS", "ksigns"), "IQ2_S": ("IQ2_S",),
                      "IQ3_XXS": ("IQ3_XXS", "ksigns"), "IQ3_S": ("IQ3_S",), "IQ1_S": ("IQ1_S",), "IQ1_M": ("IQ1_M",)}


def kernel_table(type_name: str, device) -> torch.Tensor:
    """The lookup tables type `type_name`'s Triton kernel reads, as one flat float32 tensor on `device` (cached):
    `KERNEL_TABLE_PARTS[type_name]`'s `_table`s flattened and concatenated in that order (IQ2_XXS: its grid, 256×8
    values, then the 128×8 ksigns at offset 2048; IQ2_XS: grid 512×8, ksigns at 4096; IQ3_XXS: grid 256×4, ksigns
    at 1024; IQ2_S, IQ3_S, IQ1_S, IQ1_M: the grid alone; IQ4_NL, IQ4_XS: the 16 IQ4 values). float32 because these
    are the very values the reference multiplies (exact small integers and ±1), so the kernels need no conversion;
    a type without tables gets a single 0.0 (the kernels never read it)."""
    key = ("kernel:" + type_name, torch.device(device))
    if key not in _TABLES:
        parts = KERNEL_TABLE_PARTS.get(type_name)
        if parts is None:
            _TABLES[key] = torch.zeros(1, dtype=torch.float32, device=device)
        else:
            _TABLES[key] = torch.cat([_table(name, device).reshape(-1) for name in parts]).contiguous()
    return _TABLES[key]


def _u32(b: torch.Tensor) -> torch.Tensor:
    """[..., 4m] bytes -> the m little-endian uint32 they hold, int64 [..., m]."""
    q = b.to(torch.int64).reshape(*b.shape[:-1], -1, 4)
    return q[..., 0] | (q[..., 1] << 8) | (q[..., 2] << 16) | (q[..., 3] << 24)


def _u16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2m] bytes -> the m little-endian uint16 they hold, int32 [..., m]."""
    q = b.to(torch.int32).reshape(*b.shape[:-1], -1, 2)
    return q[..., 0] | (q[..., 1] << 8)


def _fields(x: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """int [..., m] -> [..., m * n]: element n*i + k is bits width*k .. width*k + width-1 of x[i]."""
    return ((x[..., None] >> _shifts(width, n, x.device)) & ((1 << width) - 1)).flatten(-2)


def _sign_bits(b: torch.Tensor) -> torch.Tensor:
    """Sign bytes [..., m] -> ±1.0 [..., 8m]: element 8l + k is -1 where bit k of byte l is set."""
    return (1 - 2 * _fields(b.to(torch.int32), 1, 8)).float()


def _ksigns(idx: torch.Tensor) -> torch.Tensor:
    """7-bit sign indices [...] -> ±1.0 [..., 8] (the 8th sign makes the count of minus signs even)."""
    return _table("ksigns", idx.device)[idx]


def _grid(name: str, idx: torch.Tensor) -> torch.Tensor:
    return _table(name, idx.device)[idx]


def _db(d: torch.Tensor, s: torch.Tensor, scale: float) -> torch.Tensor:
    """IQ2_* / IQ3_XXS sub-block scales: d * (0.5 + s) * scale, in that order (float32)."""
    return d[..., None] * (0.5 + s.float()) * scale


def _iq2_xxs(b):
    q = b[..., 2:66].reshape(*b.shape[:-1], 8, 8)  # 8 groups of 32: 4 grid indices, a uint32 of signs and scale
    aux = _u32(q[..., 4:8])[..., 0]  # [.., 8]
    db = _db(f16_to_f32(b[..., 0:2]), aux >> 28, 0.25)
    signs = _ksigns(_fields(aux, 7, 4).reshape(*aux.shape, 4))  # [.., 8, 4, 8]
    return db[..., None, None] * _grid("IQ2_XXS", q[..., 0:4].long()) * signs


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """[.., 32, 8] -> [.., 16, 2, 8]: the two groups of 8 under one IQ2_XS / IQ2_S sub-block scale."""
    return x.reshape(*x.shape[:-2], 16, 2, 8)


def _iq2_xs(b):
    q = _u16(b[..., 2:66])  # [.., 32]: grid index (9 bits), sign index (7 bits)
    db = _db(f16_to_f32(b[..., 0:2]), _fields(b[..., 66:74].to(torch.int32), 4, 2), 0.25)  # [.., 16]
    grid, signs = _grid("IQ2_XS", (q & 511).long()), _ksigns(q >> 9)  # [.., 32, 8] each
    return db[..., None, None] * _pairs(grid) * _pairs(signs)


def _iq2_s(b):
    db = _db(f16_to_f32(b[..., 0:2]), _fields(b[..., 74:82].to(torch.int32), 4, 2), 0.25)  # [.., 16]
    idx = b[..., 2:34].to(torch.int32) | (_fields(b[..., 66:74].to(torch.int32), 2, 4) << 8)  # [.., 32]
    signs = _sign_bits(b[..., 34:66]).reshape(*b.shape[:-1], 32, 8)
    return db[..., None, None] * _pairs(_grid("IQ2_S", idx.long())) * _pairs(signs)


def _quads(x: torch.Tensor) -> torch.Tensor:
    """[.., 256] -> [.., 8, 4, 8]: IQ3_* / IQ1_S sub-blocks of 32, each four groups of 8."""
    return x.reshape(*x.shape[:-1], 8, 4, 8)


def _iq3_xxs(b):
    aux = _u32(b[..., 66:98])  # [.., 8]: 4 sign indices of 7 bits, then the 4-bit scale
    db = _db(f16_to_f32(b[..., 0:2]), aux >> 28, 0.5)
    signs = _ksigns(_fields(aux, 7, 4).reshape(*aux.shape, 4))  # [.., 8, 4, 8]
    return db[..., None, None] * _quads(_grid("IQ3_XXS", b[..., 2:66].long()).flatten(-2)) * signs


def _iq3_s(b):
    db = f16_to_f32(b[..., 0:2])[..., None] * (1 + 2 * _fields(b[..., 106:110].to(torch.int32), 4, 2)).float()
    idx = b[..., 2:66].to(torch.int32) | (_fields(b[..., 66:74].to(torch.int32), 1, 8) << 8)  # [.., 64]
    grid = _quads(_grid("IQ3_S", idx.long()).flatten(-2))
    return db[..., None, None] * grid * _quads(_sign_bits(b[..., 74:106]))


IQ1_DELTA = 0.125  # gguf-py's IQ1_S.delta (ggml's IQ1S_DELTA): every IQ1 grid value shifted by ±delta


def _iq1_delta(negative: torch.Tensor) -> torch.Tensor:
    return torch.where(negative != 0, -IQ1_DELTA, IQ1_DELTA).float()


def _iq1_s(b):
    qh = _u16(b[..., 34:50])  # [.., 8]: 4x3 high index bits, 3-bit scale, delta sign
    dl = f16_to_f32(b[..., 0:2])[..., None] * (2 * ((qh >> 12) & 7) + 1).float()
    idx = b[..., 2:34].to(torch.int32) | (_fields(qh, 3, 4) << 8)  # [.., 32]
    grid = _grid("IQ1_S", idx.long()).reshape(*b.shape[:-1], 8, 4, 8)
    return dl[..., None, None] * (grid + _iq1_delta(qh >> 15)[..., None, None])


def iq1_m_scale(b: torch.Tensor) -> torch.Tensor:
    """IQ1_M's fp16 d, its 4 nibbles in the top 4 bits of the 4 uint16 scales (byte 48), lowest first -> float32."""
    top = _u16(b[..., 48:56]) >> 12  # [.., 4]
    bits = top[..., 0] | (top[..., 1] << 4) | (top[..., 2] << 8) | (top[..., 3] << 12)
    return bits.to(torch.int16).view(torch.float16).float()


def _iq1_m(b):
    sc = _fields(_u16(b[..., 48:56]), 3, 4)  # [.., 16]: a 3-bit scale per 16 values (bits 12-15: d)
    dl = iq1_m_scale(b)[..., None] * (2 * sc + 1).float()
    qh = _fields(b[..., 32:48].to(torch.int32), 4, 2)  # [.., 32]: 3 high index bits and a delta sign per 8 values
    grid = _grid("IQ1_M", (b[..., 0:32].to(torch.int32) | ((qh & 7) << 8)).long())  # [.., 32, 8]
    delta = _iq1_delta(qh & 8)[..., None]
    return dl[..., None, None] * _pairs(grid + delta)


# ---- ternary types: values d * {-1, 0, 1} ----

def _tq1_0(b):
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=b.device)[:, None]
    qs, qh = b[..., 0:48].to(torch.int32), b[..., 48:52].to(torch.int32)
    q = torch.cat([(qs[..., None, 0:32] * pow3).flatten(-2), (qs[..., None, 32:48] * pow3).flatten(-2),
                   (qh[..., None, :] * pow3[0:4]).flatten(-2)], dim=-1) & 0xFF  # [.., 256]: base-3 digit fixed point
    return f16_to_f32(b[..., 52:54])[..., None] * (((q * 3) >> 8) - 1).float()


def _tq2_0(b):
    return f16_to_f32(b[..., 64:66])[..., None] * (_crumbs(b[..., 0:64]) - 1).float()


DEQUANT = {"Q8_0": _q8_0, **{t: _legacy(t) for t in LEGACY_LAYOUT},
           "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
           "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
           "IQ2_XXS": _iq2_xxs, "IQ2_XS": _iq2_xs, "IQ2_S": _iq2_s, "IQ3_XXS": _iq3_xxs, "IQ3_S": _iq3_s,
           "IQ1_S": _iq1_s, "IQ1_M": _iq1_m, "TQ1_0": _tq1_0, "TQ2_0": _tq2_0}


def dequantize_rows(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """Block bytes, uint8 [rows, bytes_per_row] -> a new float32 tensor [rows, cols] on the same device."""
    if type_name not in DECODED_TYPES:
        raise FormatError(f"ggml type {type_name!r}: quantkit cannot decode it "
                          f"(decodable: {', '.join(DECODED_TYPES)})")
    if is_float_type(type_name):
        _blocks(data, type_name)
        return data.contiguous().view(torch_dtype(type_name)).to(torch.float32, copy=True)
    b, fn = _blocks(data, type_name), DEQUANT[type_name]
    rows, cols = b.shape[0], b.shape[1] * block_size(type_name)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    if rows <= step:
        return fn(b).reshape(rows, cols)
    out = torch.empty((rows, cols), dtype=torch.float32, device=data.device)
    for r0 in range(0, rows, step):
        out[r0:r0 + step] = fn(b[r0:r0 + step]).reshape(-1, cols)
    return out
