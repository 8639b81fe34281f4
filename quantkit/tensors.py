"""Format-neutral quantized tensors: what quantizers produce, writers encode, readers return, kernels consume.

Two kinds:
- `QuantTensor`: integer group-affine weights (RTN/GPTQ/AWQ; the GPTQ/AWQ/compressed-tensors formats).
  Unsigned codes in [0, 2^bits), integer zero points, one scale per (output row, group):
      W[o, i] = (codes[o, i] - zeros[o, g_idx[i]]) * scales[o, g_idx[i]]
  Symmetric schemes have every zero = 2^(bits-1). Codes are stored unpacked (uint8) in the original column
  order; act-order quantization is expressed by a non-monotonic `g_idx` (as in GPTQ checkpoints).
- `GGMLTensor`: the raw bytes of a ggml block type (Q4_K, Q8_0, ...), as GGUF stores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from quantkit.errors import CheckpointError


FINITE_CHUNK = 1 << 20  # elements tested at once: isfinite's temporaries are ~1.75x what it tests in fp32


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of `t` is finite (non-float: True). Tested in blocks of rows of <= FINITE_CHUNK
    elements: `torch.isfinite(t).all()` makes temporaries 1.75x the size of an fp32 tensor (at 7B's down_proj
    Hessian, 1.4 GB)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if t.dim() == 0:
        return bool(torch.isfinite(t))
    if t.dim() == 2 and not t.is_contiguous() and t.mT.is_contiguous():
        t = t.mT  # a column-major matrix: its rows are its columns
    step = max(1, FINITE_CHUNK // max(1, t[0].numel())) if t.shape[0] else 1
    return all(bool(torch.isfinite(t[i:i + step]).all()) for i in range(0, t.shape[0], step))


def first_nonfinite(t: torch.Tensor) -> list[int] | None:
    """The index of the first NaN/Inf element of `t`, or None when every element is finite (non-float: None)."""
    if all_finite(t):
        return None
    return (~torch.isfinite(t)).nonzero()[0].tolist()


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Raise CheckpointError naming the tensor and the first bad index when it holds NaN or Inf (quantizing it would
    spread garbage into every value of its groups)."""
    bad = first_nonfinite(weight)
    if bad is not None:
        raise CheckpointError(f"{name}: weight contains NaN or Inf (first at index {bad}); refusing to quantize it")


@dataclass
class QuantTensor:
    codes: torch.Tensor  # uint8 [out, in], values in [0, 2^bits)
    scales: torch.Tensor  # float [out, n_groups]
    zeros: torch.Tensor  # int32/uint8 [out, n_groups], values in [0, 2^bits)
    bits: int
    group_size: int  # input columns per group; == in_features for per-channel
    symmetric: bool
    g_idx: torch.Tensor | None = None  # int32 [in]; None means i // group_size
    error: dict[str, Any] = field(default_factory=dict)  # what the quantizer reports (loss, sqnr_db, damp, ...)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def has_act_order(self) -> bool:
        return self.g_idx is not None and not torch.equal(self.g_idx.long(), self.default_g_idx())

    def default_g_idx(self) -> torch.Tensor:
        return torch.arange(self.in_features, device=self.codes.device) // self.group_size

    def group_index(self) -> torch.Tensor:
        return (self.g_idx.long() if self.g_idx is not None else self.default_g_idx())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.group_index()
        scales = self.scales.to(torch.float32)[:, g]
        zeros = self.zeros.to(torch.float32)[:, g]
        return ((self.codes.to(torch.float32) - zeros) * scales).to(dtype)

    def validate(self, name: str = "tensor") -> None:
        maxq = (1 << self.bits) - 1
        out, inp = self.codes.shape
        expected_groups = -(-inp // self.group_size)
        problems = []
        if self.scales.shape != (out, expected_groups):
            problems.append(f"scales shape {list(self.scales.shape)} != {[out, expected_groups]}")
        if self.zeros.shape != self.scales.shape:
            problems.append(f"zeros shape {list(self.zeros.shape)} != scales shape {list(self.scales.shape)}")
        if int(self.codes.max()) > maxq or int(self.codes.min()) < 0:
            problems.append(f"codes outside [0, {maxq}]")
        if int(self.zeros.max()) > maxq or int(self.zeros.min()) < 0:
            problems.append(f"zeros outside [0, {maxq}]")
        if self.g_idx is not None and (self.g_idx.shape != (inp,) or int(self.g_idx.max()) >= expected_groups):
            problems.append("g_idx shape or range invalid")
        if problems:
            from quantkit.errors import FormatError

            raise FormatError(f"{name}: invalid quantized tensor: " + "; ".join(problems))


@dataclass
class GGMLTensor:
    """A tensor in a ggml block type: `data` is the uint8 block bytes, `shape` is numpy order [rows, cols]."""

    type_name: str  # "Q4_K", "Q8_0", "F16", ... (gguf.GGMLQuantizationType member name)
    shape: tuple[int, ...]
    data: np.ndarray  # raw bytes as uint8 [rows, bytes_per_row], float types included
    error: dict[str, Any] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values, bit-exact with ggml's dequantizers (`kernels.ggml_ref.dequantize_rows`), as `dtype`."""
        from quantkit.kernels.ggml_ref import dequantize_rows

        raw = np.ascontiguousarray(self.data).view(np.uint8)
        rows = int(np.prod(self.shape[:-1]))  # 1 for a 1-D tensor
        data = torch.from_numpy(raw if raw.flags.writeable else raw.copy()).reshape(rows, -1)
        return dequantize_rows(data, self.type_name).reshape(self.shape).to(dtype)


def stack_rows(parts: list[tuple[torch.Tensor, QuantTensor | GGMLTensor]], rows: int) -> QuantTensor | GGMLTensor:
    """One tensor of `rows` rows from parts that each hold some of them: (row indices, tensor of those rows), all of
    one kind, type and column layout (the rows of a tensor quantized in groups of rows). Integer counts in `error`
    (e.g. off-grid weights) are summed."""
    first = parts[0][1]
    covered = torch.zeros(rows, dtype=torch.bool)
    for index, _ in parts:
        covered[index] = True
    if int(sum(index.numel() for index, _ in parts)) != rows or not bool(covered.all()):
        raise ValueError(f"stack_rows: the parts do not cover each of the {rows} rows once")
    error = {k: sum(t.error.get(k, 0) for _, t in parts) for k, v in first.error.items() if type(v) is int}
    if isinstance(first, GGMLTensor):
        if any(not isinstance(t, GGMLTensor) or t.type_name != first.type_name for _, t in parts):
            raise ValueError("stack_rows: parts of different ggml types")
        data = np.empty((rows, first.data.shape[1]), dtype=first.data.dtype)
        for index, t in parts:
            data[index.numpy()] = t.data
        return GGMLTensor(first.type_name, (rows, *first.shape[1:]), data, error)
    layout = (first.bits, first.group_size, first.symmetric)
    if any(not isinstance(t, QuantTensor) or (t.bits, t.group_size, t.symmetric) != layout
           or (t.g_idx is None) != (first.g_idx is None)
           or (t.g_idx is not None and not torch.equal(t.g_idx, first.g_idx)) for _, t in parts):
        raise ValueError("stack_rows: parts of different schemes or column orders (g_idx)")

    def gather(field_of) -> torch.Tensor:
        out = torch.empty((rows, *field_of(first).shape[1:]), dtype=field_of(first).dtype)
        for index, t in parts:
            out[index] = field_of(t).cpu()
        return out

    return QuantTensor(gather(lambda t: t.codes), gather(lambda t: t.scales), gather(lambda t: t.zeros), first.bits,
                       first.group_size, first.symmetric, first.g_idx, error)
