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

import numpy as np
import torch

from quantkit.errors import FormatError, SchemeError
from quantkit.gguf import dequant, kquants, legacy
from quantkit.gguf.f32ops import F32, bf16_bits, seqsum_rows
from quantkit.quant.tensor import GGMLTensor

# type name -> (elements per block, bytes per block)
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
LEGACY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES

# elements per chunk: big enough to amortize numpy's per-call cost, small enough to stay in L2
CHUNK_ELEMENTS = 1 << 18


def row_bytes(type_name: str, cols: int) -> int:
    block, size = BLOCK_SIZES[type_name]
    return cols // block * size


def _as_f32(weight) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(weight, dtype=np.float32)


def _numpy_rows_f32(src: torch.Tensor):
    """A function (r0, r1) -> float32 numpy rows of a CPU tensor, converted in numpy only.

    The encoder threads call it concurrently; torch's own dtype conversion would start its intra-op thread pool in
    each of them, whose spinning threads cost ~15% of the encode time on a 2-core machine. bf16 -> f32 is exact
    as a 16-bit shift; f16 -> f32 is exact in numpy."""
    if src.dtype == torch.bfloat16:
        bits = src.view(torch.int16).numpy().view(np.uint16)
        return lambda r0, r1: (bits[r0:r1].astype(np.uint32) << 16).view(np.float32)
    if src.dtype in (torch.float16, torch.float32, torch.float64):
        arr = src.numpy()
        return lambda r0, r1: np.asarray(arr[r0:r1], dtype=np.float32)
    arr = src.to(torch.float32).numpy()
    return lambda r0, r1: arr[r0:r1]


def _check(type_name: str, shape: tuple[int, ...], name: str) -> None:
    if type_name not in BLOCK_SIZES:
        raise SchemeError(f"{name}: unsupported ggml type {type_name!r} (supported: {', '.join(SUPPORTED_TYPES)})")
    block = BLOCK_SIZES[type_name][0]
    if shape[-1] % block:
        raise SchemeError(f"{name}: row length {shape[-1]} is not a multiple of the {type_name} block size {block}")


def quantize_ggml(weight, type_name: str, importance=None, name: str = "tensor",
                  threads: int | None = None) -> GGMLTensor:
    """Encode a float weight [rows, cols] (or 1-D) into ggml `type_name` blocks.

    `importance` ([cols], mean squared activation per input column, e.g. an imatrix entry) switches the legacy
    and k-quant searches to llama.cpp's importance-weighted versions; Q8_0 and the float types ignore it.
    `threads`: row chunks are encoded in parallel (numpy releases the GIL); default: all CPUs. A bf16/f16 torch
    weight is converted to float32 chunk by chunk inside the workers (no full float32 copy)."""
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
    out = np.empty((rows, row_bytes(type_name, cols)), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    starts = range(0, rows, step)

    if isinstance(weight, torch.Tensor):
        rows_f32 = _numpy_rows_f32(weight.detach().to("cpu").reshape(rows, cols))
    else:
        x2 = _as_f32(weight).reshape(rows, cols)
        rows_f32 = lambda r0, r1: x2[r0:r1]  # noqa: E731

    def encode_chunk(r0: int) -> None:
        r1 = min(rows, r0 + step)
        chunk = np.ascontiguousarray(rows_f32(r0, r1))
        if not np.isfinite(chunk).all():
            bad = (np.argwhere(~np.isfinite(chunk))[0] + [r0, 0]).tolist()
            raise SchemeError(f"{name}: weight contains NaN or Inf (first at index {bad}); refusing to quantize it")
        out[r0:r1] = _encode_rows(chunk, type_name, qw).reshape(r1 - r0, -1)

    n_threads = min(len(starts), threads or os.cpu_count() or 1)
    if n_threads <= 1:
        for r0 in starts:
            encode_chunk(r0)
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(encode_chunk, starts))
    return GGMLTensor(type_name, shape, out)


def _encode_rows(x: np.ndarray, type_name: str, qw: np.ndarray | None) -> np.ndarray:
    rows, cols = x.shape
    block = BLOCK_SIZES[type_name][0]
    blocks = x.reshape(-1, block)
    if type_name in K_TYPES:
        qwb = None if qw is None else np.broadcast_to(qw.reshape(1, -1), (rows, cols)).reshape(-1, block)
        return kquants.ENCODERS[type_name](blocks, qwb)
    if qw is None or type_name == "Q8_0":
        return legacy.REF[type_name](blocks)
    sigma2 = seqsum_rows(x * x) / F32(cols)  # per row
    xb = blocks.reshape(rows, cols // block, block)
    w = qw.reshape(1, -1, block) * np.sqrt(sigma2[:, None, None] + xb * xb)
    return legacy.WEIGHTED[type_name](blocks, w.reshape(-1, block))


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
