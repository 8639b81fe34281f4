"""One float weight -> the ggml bytes of a target type (float casts here; block types via the encoders).

Block types go through `quantkit.gguf.quants.quantize_ggml` (vectorized, byte-identical to ggml's quantizers).
Float types are plain casts (BF16 = round-to-nearest-even, as ggml's fp32->bf16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from quantkit.ggml_types import is_float_type, torch_dtype
from quantkit.gguf.encode import is_searched
from quantkit.gguf.quants import quantize_ggml
from quantkit.tensors import GGMLTensor

if TYPE_CHECKING:
    from quantkit.gguf.encode_pool import ProcessEncoder


def float_bytes(weight: torch.Tensor, type_name: str) -> np.ndarray:
    """uint8 [rows, bytes_per_row] of a float tensor cast to F32 / F16 / BF16."""
    dtype = torch_dtype(type_name)
    t = weight.detach().to("cpu")
    t = t.to(dtype) if t.dtype != dtype else t
    t = t.contiguous()
    rows = t.shape[0] if t.dim() > 1 else 1
    return t.view(torch.uint8).numpy().reshape(rows, -1) if t.dim() > 0 else t.view(torch.uint8).numpy().reshape(1, -1)


def encode(weight: torch.Tensor, type_name: str, importance: torch.Tensor | None = None, name: str = "tensor",
           pool: ProcessEncoder | None = None) -> GGMLTensor:
    """Encode a float [out, in] (or 1-D) weight into `type_name`.

    Searched types (k-quants; legacy types with an importance matrix) run in `pool`'s processes when one is given;
    the legacy reference rounding is a few passes per block, cheaper than moving the rows to another process, so it
    stays in threads (measured on a 7B-shaped Q8_0/Q4_0 conversion: 41.3/38.9 s in threads, 42.9/42.0 s in the
    pool)."""
    if is_float_type(type_name):
        return GGMLTensor(type_name, tuple(weight.shape), float_bytes(weight, type_name))
    searched = is_searched(type_name, importance is not None)
    return quantize_ggml(weight, type_name, importance=importance, name=name, pool=pool if searched else None)


def raw_bytes(t: GGMLTensor) -> np.ndarray:
    """The block bytes of a GGMLTensor as uint8 [rows, bytes_per_row], whatever array type `data` holds."""
    data = t.data
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous()
        data = data.view(torch.uint8).numpy() if data.dtype != torch.uint8 else data.numpy()
    data = np.ascontiguousarray(data)
    rows = 1
    for d in t.shape[:-1]:
        rows *= d
    return data.view(np.uint8).reshape(rows, -1)
