"""ggml block encoders and decoders: float weights <-> the bytes llama.cpp stores, for every type quantkit writes.

    quantize_ggml(weight [rows, cols] fp32 (torch or numpy), "Q4_K", importance=None) -> GGMLTensor
    dequantize_ggml(GGMLTensor) -> torch.float32 [rows, cols]

Types: F32, F16, BF16; Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32); Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256).

Without `importance` the bytes are ggml's reference quantizers (`quantize_row_qX_ref`, what `llama-quantize` and
`gguf.quants.quantize` produce). With `importance` (an imatrix: mean x^2 per input column, length cols) they are
ggml's importance-weighted quantizers `quantize_qX(…, quant_weights)` as `llama-quantize --imatrix` runs them.
Everything is vectorized over blocks (numpy, float32 arithmetic in C's order, see `f32ops`); rows are processed
in chunks to keep the working set in cache.

`GGMLTensor.data` is uint8 [rows, bytes_per_row] for every type (F32/F16/BF16: the little-endian values).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from quantkit.errors import FormatError, SchemeError
from quantkit.gguf import dequant
from quantkit.gguf.encode import (BLOCK_SIZES, CHUNK_ELEMENTS, FLOAT_TYPES, K_TYPES, LEGACY_TYPES, SUPPORTED_TYPES,
                                   chunk_starts, encode_rows, row_bytes, widen)
from quantkit.gguf.f32ops import bf16_bits
from quantkit.quant.tensor import GGMLTensor

if TYPE_CHECKING:
    from quantkit.gguf.encode_pool import ProcessEncoder

__all__ = ["BLOCK_SIZES", "CHUNK_ELEMENTS", "FLOAT_TYPES", "K_TYPES", "LEGACY_TYPES", "SUPPORTED_TYPES", "row_bytes",
           "stored_rows", "quantize_ggml", "dequantize_array", "dequantize_ggml"]


def _as_f32(weight) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(weight, dtype=np.float32)


def stored_rows(weight) -> tuple[np.ndarray, str]:
    """A CPU float weight as a 2-D-able numpy array in its stored width plus its `encode.SOURCE_DTYPES` kind, so
    the encoders widen it to float32 chunk by chunk, in numpy (torch's own conversion in each encoder thread
    would start its intra-op thread pool there, whose spinning costs ~15% of the encode time on 2 cores)."""
    if isinstance(weight, torch.Tensor):
        t = weight.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16), "bf16"
        if t.dtype == torch.float16:
            return t.numpy(), "f16"
        return t.to(torch.float32).numpy(), "f32"
    arr = np.asarray(weight)
    if arr.dtype == np.float16:
        return arr, "f16"
    return np.asarray(arr, dtype=np.float32), "f32"


def _check(type_name: str, shape: tuple[int, ...], name: str) -> None:
    if type_name not in BLOCK_SIZES:
        raise SchemeError(f"{name}: unsupported ggml type {type_name!r} (supported: {', '.join(SUPPORTED_TYPES)})")
    block = BLOCK_SIZES[type_name][0]
    if shape[-1] % block:
        raise SchemeError(f"{name}: row length {shape[-1]} is not a multiple of the {type_name} block size {block}")


def quantize_ggml(weight, type_name: str, importance=None, name: str = "tensor",
                  threads: int | None = None, pool: ProcessEncoder | None = None) -> GGMLTensor:
    """Encode a float weight [rows, cols] (or 1-D) into ggml `type_name` blocks.

    `importance` ([cols], mean squared activation per input column, e.g. an imatrix entry) switches the legacy
    and k-quant searches to llama.cpp's importance-weighted versions; Q8_0 and the float types ignore it.
    Row chunks are encoded in parallel: in `pool`'s worker processes when given (`encode_pool.ProcessEncoder`,
    what the GGUF writer uses), else in `threads` threads (default: all CPUs). A bf16/f16 weight is widened to
    float32 chunk by chunk inside the workers (no full float32 copy)."""
    shape = tuple(weight.shape)
    _check(type_name, shape, name)
    cols = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if type_name in FLOAT_TYPES:
        x2 = _as_f32(weight).reshape(rows, cols)
        if type_name == "F32":
            data = x2.view(np.uint8)
        elif type_name == "F16":
            data = x2.astype(np.float16).view(np.uint8)
        else:
            data = bf16_bits(x2).view(np.uint8)
        return GGMLTensor(type_name, shape, np.ascontiguousarray(data).reshape(rows, -1))
    qw = None
    if importance is not None and type_name != "Q8_0":
        qw = _as_f32(importance).reshape(-1)
        if qw.shape[0] != cols:
            raise SchemeError(f"{name}: importance has {qw.shape[0]} entries for {cols} input columns")
    src, kind = stored_rows(weight)
    src = src.reshape(rows, cols)
    if pool is not None:
        data = pool.run(src, kind, type_name, qw, name)
        if data is not None:
            return GGMLTensor(type_name, shape, data)
    out = np.empty((rows, row_bytes(type_name, cols)), dtype=np.uint8)
    step, starts = chunk_starts(rows, cols)

    def encode_chunk(r0: int) -> None:
        r1 = min(rows, r0 + step)
        out[r0:r1] = encode_rows(widen(src[r0:r1], kind), type_name, qw, name, r0)

    n_threads = min(len(starts), threads or os.cpu_count() or 1)
    if n_threads <= 1:
        for r0 in starts:
            encode_chunk(r0)
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(encode_chunk, starts))
    return GGMLTensor(type_name, shape, out)


def dequantize_array(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Block bytes (any shape, uint8) -> float32 array of `shape`."""
    if type_name not in BLOCK_SIZES:
        raise FormatError(f"ggml type {type_name!r}: cannot decode (supported: {', '.join(SUPPORTED_TYPES)})")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    n = int(np.prod(shape)) if len(shape) else 1
    block, size = BLOCK_SIZES[type_name]
    if raw.size != n // block * size or n % block:
        raise FormatError(f"ggml {type_name} data of {raw.size} bytes does not hold a tensor of shape {list(shape)}")
    if type_name == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if type_name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    out = np.empty(n, dtype=np.float32)
    blocks = raw.reshape(-1, size)
    step = max(1, (1 << 16) // block)
    for b0 in range(0, blocks.shape[0], step):
        b1 = min(blocks.shape[0], b0 + step)
        out[b0 * block:b1 * block] = dequant.decode_blocks(blocks[b0:b1], type_name).reshape(-1)
    return out.reshape(shape)


def dequantize_ggml(t: GGMLTensor) -> torch.Tensor:
    """GGMLTensor -> torch.float32 tensor of `t.shape`."""
    return torch.from_numpy(dequantize_array(t.data, t.type_name, tuple(t.shape)))
