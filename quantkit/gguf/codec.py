"""One float weight -> the ggml bytes of a target type (float casts here; block types via the encoders).

Block types use engineer E1's vectorized encoders (`quantkit.gguf.quants.quantize_ggml`) when present, else the
`gguf` package's numpy reference for the legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). Float types are plain casts
(BF16 = round-to-nearest-even, as ggml's fp32->bf16).
"""

from __future__ import annotations

import numpy as np
import torch

from quantkit.errors import SchemeError
from quantkit.quant.tensor import GGMLTensor

LEGACY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def float_bytes(weight: torch.Tensor, type_name: str) -> np.ndarray:
    """uint8 [rows, bytes_per_row] of a float tensor cast to F32 / F16 / BF16."""
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_name]
    t = weight.detach().to("cpu")
    t = t.to(dtype) if t.dtype != dtype else t
    t = t.contiguous()
    rows = t.shape[0] if t.dim() > 1 else 1
    return t.view(torch.uint8).numpy().reshape(rows, -1) if t.dim() > 0 else t.view(torch.uint8).numpy().reshape(1, -1)


def _e1_encoder():
    try:
        from quantkit.gguf.quants import quantize_ggml  # engineer E1
    except ImportError:
        return None
    return quantize_ggml


def encode(weight: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> GGMLTensor:
    """Encode a float [out, in] (or 1-D) weight into `type_name`."""
    shape = tuple(weight.shape)
    if type_name in ("F32", "F16", "BF16"):
        return GGMLTensor(type_name, shape, float_bytes(weight, type_name))
    quantize_ggml = _e1_encoder()
    if quantize_ggml is not None:
        return quantize_ggml(weight, type_name, importance=importance)  # converts to float32 chunk by chunk
    if type_name in LEGACY_TYPES and importance is None:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        data = quantize(weight.to(torch.float32).numpy(), GGMLQuantizationType[type_name])
        return GGMLTensor(type_name, shape, data)
    raise SchemeError(f"no encoder for ggml type {type_name}" + (" with an importance matrix" if importance is not None else "")
                      + " (quantkit.gguf.quants is not available)")


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
