"""ggml block encoders: float weights -> the bytes llama.cpp stores, for every type quantkit writes.

    quantize_ggml(weight [rows, cols] fp32 (torch or numpy), "Q4_K", importance=None) -> GGMLTensor

and back with `GGMLTensor.dequantize()` (bit-exact, `kernels/ggml_ref.py`).
Types (`ggml_types.SUPPORTED_TYPES`): F32, F16, BF16; Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32); Q2_K, Q3_K,
Q4_K, Q5_K, Q6_K (256); IQ4_NL (32), IQ4_XS (256).

Without `importance` the bytes are ggml's reference quantizers (`quantize_row_qX_ref`, what `llama-quantize` and
`gguf.quants.quantize` produce; for the i-quants `quantize_iq4_nl/xs`, which llama-quantize runs). With
`importance` (an imatrix: mean x^2 per input column, length cols) they are ggml's importance-weighted quantizers
`quantize_qX(…, quant_weights)` as `llama-quantize --imatrix` runs them.
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

from quantkit.errors import SchemeError
from quantkit.ggml_types import block_size, check_type, f32_to_f16, is_float_type, row_nbytes
from quantkit.gguf.encode import chunk_starts, encode_rows, widen
from quantkit.gguf.f32ops import bf16_bits
from quantkit.tensors import GGMLTensor

if TYPE_CHECKING:
    from quantkit.gguf.encode_pool import ProcessEncoder

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
    block = block_size(check_type(type_name, name))
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
    if is_float_type(type_name):
        x2 = _as_f32(weight).reshape(rows, cols)
        if type_name == "F32":
            data = x2.view(np.uint8)
        elif type_name == "F16":
            data = f32_to_f16(x2)
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
    out = np.empty((rows, row_nbytes(type_name, cols)), dtype=np.uint8)
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
