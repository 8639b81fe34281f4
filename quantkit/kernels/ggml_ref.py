"""Plain torch dequantization of ggml block types: the CPU path and the reference for the Triton kernels.

Input is the raw block bytes as a uint8 tensor [rows, bytes_per_row] (what GGUF stores, what `GGMLTensor.data`
holds); output is float32 [rows, cols]. Layouts follow formats.md §2 (the C dequantizers in ggml-quants.c).
Types without a function here fall back to gguf-py's numpy dequantizer (`dequantize_rows`).
"""

from __future__ import annotations

import torch

# type name -> (elements per block, bytes per block)
BLOCK_SIZES = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
               "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian -> float32 [...]"""
    return (b[..., 0].to(torch.int32) | (b[..., 1].to(torch.int32) << 8)).to(torch.int16).view(torch.float16).float()


def _blocks(data: torch.Tensor, type_name: str) -> torch.Tensor:
    qk, nbytes = BLOCK_SIZES[type_name]
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % nbytes:
        raise ValueError(f"{type_name}: expected uint8 [rows, n*{nbytes}] block bytes, got {data.dtype} {list(data.shape)}")
    return data.reshape(data.shape[0], -1, nbytes)  # [rows, nb, nbytes]


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packed 6-bit scales [..., 12] -> (sc, m) each int32 [..., 8] (get_scale_min_k4)."""
    s = scales.to(torch.int32)
    lo_sc, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], dim=-1)
    m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=-1)
    return sc, m


def dequant_q8_0(data: torch.Tensor) -> torch.Tensor:
    b = _blocks(data, "Q8_0")
    return (_f16(b[..., 0:2])[..., None] * b[..., 2:].view(torch.int8).float()).reshape(b.shape[0], -1)


def dequant_q4_0(data: torch.Tensor) -> torch.Tensor:
    b = _blocks(data, "Q4_0")
    qs = b[..., 2:18].to(torch.int32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1) - 8  # element j: low nibble of byte j, j+16: high nibble
    return (_f16(b[..., 0:2])[..., None] * q.float()).reshape(b.shape[0], -1)


def dequant_q4_1(data: torch.Tensor) -> torch.Tensor:
    b = _blocks(data, "Q4_1")
    qs = b[..., 4:20].to(torch.int32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1)
    return (_f16(b[..., 0:2])[..., None] * q.float() + _f16(b[..., 2:4])[..., None]).reshape(b.shape[0], -1)


def _q5_high(qh_bytes: torch.Tensor) -> torch.Tensor:
    qh = qh_bytes.to(torch.int64)
    qh = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
    return ((qh[..., None] >> torch.arange(32, device=qh.device)) & 1).to(torch.int32) << 4


def dequant_q5_0(data: torch.Tensor) -> torch.Tensor:
    b = _blocks(data, "Q5_0")
    qs = b[..., 6:22].to(torch.int32)
    q = (torch.cat([qs & 0xF, qs >> 4], dim=-1) | _q5_high(b[..., 2:6])) - 16
    return (_f16(b[..., 0:2])[..., None] * q.float()).reshape(b.shape[0], -1)


def dequant_q5_1(data: torch.Tensor) -> torch.Tensor:
    b = _blocks(data, "Q5_1")
    qs = b[..., 8:24].to(torch.int32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1) | _q5_high(b[..., 4:8])
    return (_f16(b[..., 0:2])[..., None] * q.float() + _f16(b[..., 2:4])[..., None]).reshape(b.shape[0], -1)


def _q4k_codes(qs: torch.Tensor) -> torch.Tensor:
    """qs [..., 128] -> 4-bit codes [..., 8, 32] (sub-block 2c: low nibbles of qs[32c:32c+32], 2c+1: high)."""
    q = qs.to(torch.int32).reshape(*qs.shape[:-1], 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=-2).reshape(*qs.shape[:-1], 8, 32)


def dequant_q4_k(data: torch.Tensor) -> torch.Tensor:
    b = _blocks(data, "Q4_K")
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, m = k_scale_min(b[..., 4:16])
    q = _q4k_codes(b[..., 16:144])
    w = (d[..., None] * sc)[..., None] * q - (dmin[..., None] * m)[..., None]
    return w.reshape(b.shape[0], -1)


def dequant_q5_k(data: torch.Tensor) -> torch.Tensor:
    b = _blocks(data, "Q5_K")
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, m = k_scale_min(b[..., 4:16])
    qh = b[..., 16:48].to(torch.int32)  # element 32s+l has bit 4 at (qh[l] >> s) & 1
    high = ((qh[..., None, :] >> torch.arange(8, device=data.device)[:, None]) & 1) << 4
    q = _q4k_codes(b[..., 48:176]) | high
    w = (d[..., None] * sc)[..., None] * q - (dmin[..., None] * m)[..., None]
    return w.reshape(b.shape[0], -1)


def dequant_q6_k(data: torch.Tensor) -> torch.Tensor:
    b = _blocks(data, "Q6_K")
    ql = b[..., 0:128].to(torch.int32).reshape(*b.shape[:2], 2, 64)  # [.., half, 64]
    qh = b[..., 128:192].to(torch.int32).reshape(*b.shape[:2], 2, 1, 32)  # [.., half, 1, 32]
    low = torch.stack([ql[..., 0:32] & 0xF, ql[..., 32:64] & 0xF, ql[..., 0:32] >> 4, ql[..., 32:64] >> 4], dim=-2)
    shifts = torch.tensor([0, 2, 4, 6], device=data.device, dtype=torch.int32)[:, None]
    q = low | (((qh >> shifts) & 3) << 4)  # [.., half, 4, 32] in element order
    q = q.reshape(*b.shape[:2], 16, 16) - 32
    scales = b[..., 192:208].contiguous().view(torch.int8).float()  # [.., 16]
    d = _f16(b[..., 208:210])
    return ((d[..., None] * scales)[..., None] * q.float()).reshape(b.shape[0], -1)


DEQUANT = {"Q8_0": dequant_q8_0, "Q4_0": dequant_q4_0, "Q4_1": dequant_q4_1, "Q5_0": dequant_q5_0,
           "Q5_1": dequant_q5_1, "Q4_K": dequant_q4_k, "Q5_K": dequant_q5_k, "Q6_K": dequant_q6_k}


def dequantize_rows(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """Block bytes [rows, bytes_per_row] -> float32 [rows, cols] (gguf-py numpy fallback for other types)."""
    fn = DEQUANT.get(type_name)
    if fn is not None:
        return fn(data)
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if type_name in ("F32", "F16", "BF16"):
        raise ValueError("float ggml types are not block types")
    out = dequantize(data.cpu().numpy(), GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(data.shape[0], -1).to(data.device)
