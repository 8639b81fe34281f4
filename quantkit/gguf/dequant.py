"""Decoders for ggml block types: block bytes -> float32, vectorized, with the C dequantizers' float32 arithmetic
(so the values equal `ggml-quants.c` and `gguf.quants.dequantize` bit for bit).

Also holds the unpacking of k-quant sub-block scales, shared with the encoders and the GPTQ grids.
"""

from __future__ import annotations

import numpy as np

from quantkit.errors import FormatError

QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K `scales[12]` -> (sc [n, 8], m [n, 8]) 6-bit values (get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    lo_sc, lo_m, mixed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (mixed & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 63, (mixed >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, m


def pack_scale_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Inverse of `scale_min_k4`: 6-bit sc, m [n, 8] -> scales[12] bytes [n, 12]."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out


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


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[n, 16] -> [n, 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """[n, 4] little-endian uint32 -> [n, 32] bits."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def q8_0(b):
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, 0:2])


def q4_0(b):
    return _f16(b[:, 0:2]) * (_nibbles32(b[:, 2:18]).astype(np.int8) - np.int8(8)).astype(np.float32)


def q4_1(b):
    return _f16(b[:, 0:2]) * _nibbles32(b[:, 4:20]).astype(np.float32) + _f16(b[:, 2:4])


def q5_0(b):
    q = _nibbles32(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)
    return _f16(b[:, 0:2]) * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


def q5_1(b):
    q = _nibbles32(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)
    return _f16(b[:, 0:2]) * q.astype(np.float32) + _f16(b[:, 2:4])


def q2_k_codes(b):
    """[n, 84] -> codes [n, 256] in 0..3 (element order)."""
    qs = b[:, 16:80].reshape(-1, 2, 1, 32)
    return ((qs >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3).reshape(-1, QK_K)


def q2_k(b):
    n = b.shape[0]
    sc = b[:, 0:16]
    dl = _f16(b[:, 80:82]) * (sc & 0x0F).astype(np.float32)
    ml = _f16(b[:, 82:84]) * (sc >> 4).astype(np.float32)
    q = q2_k_codes(b).reshape(n, 16, 16).astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, QK_K)


def q3_k_codes(b):
    """[n, 110] -> signed codes [n, 256] in -4..3."""
    low = q2_k_codes(np.concatenate([np.zeros((b.shape[0], 16), np.uint8), b[:, 32:96]], axis=1))
    hbit = ((b[:, 0:32][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(-1, QK_K)
    return low.astype(np.int8) - ((hbit ^ 1) << 2).astype(np.int8)


def q3_k(b):
    n = b.shape[0]
    sc = (q3_k_scales(b[:, 96:108]).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = _f16(b[:, 108:110]) * sc
    q = q3_k_codes(b).reshape(n, 16, 16).astype(np.float32)
    return (dl[:, :, None] * q).reshape(n, QK_K)


def q4_k_codes(qs):
    """qs [n, 128] -> [n, 256] 4-bit codes."""
    return ((qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8)[None, None, :, None]) & 0x0F).reshape(-1, QK_K)


def _k4_dequant(b, q):
    n = b.shape[0]
    sc, m = scale_min_k4(b[:, 4:16])
    d = _f16(b[:, 0:2]) * sc.astype(np.float32)
    dm = _f16(b[:, 2:4]) * m.astype(np.float32)
    return (d[:, :, None] * q.reshape(n, 8, 32).astype(np.float32) - dm[:, :, None]).reshape(n, QK_K)


def q4_k(b):
    return _k4_dequant(b, q4_k_codes(b[:, 16:144]))


def q5_k_codes(b):
    high = ((b[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(-1, QK_K)
    return q4_k_codes(b[:, 48:176]) | (high << 4)


def q5_k(b):
    return _k4_dequant(b, q5_k_codes(b))


def q6_k_codes(b):
    """[n, 210] -> unsigned codes [n, 256] in 0..63."""
    ql = b[:, 0:128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8)[None, None, :, None]
    ql = (ql & 0x0F).reshape(-1, 2, 128)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    qh = (qh & 3).reshape(-1, 2, 128)
    return (ql | (qh << 4)).reshape(-1, QK_K)


def q6_k(b):
    n = b.shape[0]
    d = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
    q = (q6_k_codes(b).astype(np.int8) - np.int8(32)).astype(np.float32).reshape(n, 16, 16)
    return (d[:, :, None] * q).reshape(n, QK_K)


BLOCK_DECODERS = {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1,
                  "Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


def decode_blocks(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """[n_blocks, type_size] uint8 -> [n_blocks, block_size] float32."""
    try:
        fn = BLOCK_DECODERS[type_name]
    except KeyError:
        raise FormatError(f"ggml type {type_name}: no decoder (supported: {', '.join(BLOCK_DECODERS)})") from None
    return fn(np.ascontiguousarray(blocks, dtype=np.uint8))
