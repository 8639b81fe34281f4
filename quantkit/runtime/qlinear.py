"""Linear layers that keep their weights compressed and dequantize inside the matmul.

- `QuantLinear`: integer group-affine weights (GPTQ/AWQ/compressed-tensors/RTN `QuantTensor`s) in the
  `PackedInt` layout (kernels/pack.py: int32 words of 8×4-bit / 4×8-bit codes along the input dimension).
- `GGMLLinear`: ggml block bytes exactly as GGUF stores them (the types in `ggml_matmul.SUPPORTED` have Triton
  kernels; every other block type works through the torch dequantizer, kernels/ggml_ref.py).
- `GGMLEmbedding`: a ggml-typed token embedding; only the looked-up rows are dequantized.

Backends: `triton` (GPU kernels, kernels/int_matmul.py and kernels/ggml_matmul.py) and `torch` (CPU; dequantizes
one chunk of input rows at a time and accumulates, so at most `chunk_elems` weights exist in full precision).
`cache_dequant=True` (torch backend only) keeps the dequantized matrix after the first call: it trades the
memory saving for speed and is labelled as such wherever it is reported.
`cpu_kernels=True` (torch backend on CPU) runs the fast CPU kernels of kernels/cpu.py: for ggml block types the C++
extension's kernels directly on the stored block bytes (`DirectGGML`: a memory-mapped GGUF is read in place, no
copy) where it builds with AVX512-VNNI, else torch's int4/int8 kernels on a repacked copy of the codes built at
first use (bf16 arithmetic: not bit-comparable with the exact fp32 path).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantkit.ggml_types import is_block_type as is_block_type  # runtime/model.py imports it from here
from quantkit.kernels.ggml_ref import dequantize_rows
from quantkit.kernels.pack import PackedInt, pack_quant_tensor, unpack_codes
from quantkit.tensors import GGMLTensor, QuantTensor

BACKENDS = ("torch", "triton")
CHUNK_ELEMS = 1 << 20  # weights dequantized at once by the torch backend


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


class QuantLinear(nn.Module):
    def __init__(self, packed: PackedInt, backend: str = "torch", cache_dequant: bool = False,
                 cpu_kernels: bool = False):
        super().__init__()
        _check_backend(backend)
        self.cpu_kernels, self._fast = cpu_kernels, None
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.bits, self.container_bits, self.group_size = packed.bits, packed.container_bits, packed.group_size
        self.backend, self.cache_dequant = backend, cache_dequant
        for name in ("qweight", "scales", "zeros", "perm", "g_idx"):
            self.register_buffer(name, getattr(packed, name), persistent=False)
        self._cached: torch.Tensor | None = None

    @classmethod
    def from_quant_tensor(cls, qt: QuantTensor, backend: str = "torch", device=None, cache_dequant: bool = False,
                          cpu_kernels: bool = False):
        packed = pack_quant_tensor(qt)
        if device is not None:
            packed = packed.to(device)
        return cls(packed, backend, cache_dequant, cpu_kernels)

    def _fast_path(self):
        """torch's int4/int8 CPU kernels over a repacked copy (built on first use), or None if unsupported."""
        if self._fast is None:
            from quantkit.kernels import cpu

            self._fast = False
            if cpu.available() and self.g_idx is None and self.bits in (4, 8) and self.container_bits == self.bits:
                codes = unpack_codes(self.qweight, self.bits, self.in_features).t()
                scale = self.scales.t().float()
                mid = 1 << (self.bits - 1)
                z = torch.full_like(scale, mid) if self.zeros is None else self.zeros.t().float()
                if self.bits == 4:
                    built = cpu.build("int4", codes, scale, (mid - z) * scale, self.group_size)
                else:
                    built = cpu.build("int8", codes - mid, scale, (mid - z) * scale, self.group_size)
                self._fast = built or False
        return self._fast or None

    def packed(self) -> PackedInt:
        return PackedInt(self.qweight, self.scales, self.zeros, self.bits, self.container_bits, self.group_size,
                         self.in_features, self.out_features, self.perm, self.g_idx)

    def extra_repr(self) -> str:
        kind = f"int{self.bits} g{self.group_size}" + (" asym" if self.zeros is not None else " sym")
        kind += " act-order" if self.perm is not None else ""
        kind += " cpu-kernels" if self.cpu_kernels else ""
        return f"{self.in_features} -> {self.out_features}, {kind}, backend={self.backend}" + (
            ", cache_dequant" if self.cache_dequant else "")

    def weight_nbytes(self) -> int:
        return self.packed().nbytes()

    # -- torch backend --

    def _dequant_rows(self, k0: int, k1: int, dtype) -> torch.Tensor:
        """W^T rows k0..k1 (packed order) as [k1-k0, N] in `dtype`; k0 is a multiple of the pack factor."""
        pf = 32 // self.container_bits
        codes = unpack_codes(self.qweight[k0 // pf: -(-k1 // pf)], self.container_bits, k1 - k0).to(dtype)
        gs = self.group_size
        if self.g_idx is None and k0 % gs == 0 and (k1 - k0) % gs == 0:
            g0, g1 = k0 // gs, k1 // gs
            codes = codes.view(g1 - g0, gs, -1)
            scales = self.scales[g0:g1, None, :].to(dtype)
            zeros = (1 << (self.bits - 1)) if self.zeros is None else self.zeros[g0:g1, None, :].to(dtype)
            return ((codes - zeros) * scales).view(k1 - k0, -1)
        rows = torch.arange(k0, k1, device=codes.device)
        g = self.g_idx[rows].long() if self.g_idx is not None else rows // gs
        zeros = (1 << (self.bits - 1)) if self.zeros is None else self.zeros[g].to(dtype)
        return (codes - zeros) * self.scales[g].to(dtype)

    def _chunk_rows(self) -> int:
        pf = 32 // self.container_bits
        step = max(pf, CHUNK_ELEMS // max(self.out_features, 1))
        unit = pf if self.g_idx is not None else math.lcm(pf, self.group_size)
        return max(unit, step // unit * unit)

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        dtype = x2.dtype if x2.dtype in (torch.float32, torch.float64) else torch.float32
        if self.cache_dequant:
            if self._cached is None or self._cached.dtype != x2.dtype:
                self._cached = self._dequant_rows(0, self.in_features, torch.float32).to(x2.dtype)
            return x2 @ self._cached
        out = torch.zeros((x2.shape[0], self.out_features), dtype=dtype, device=x2.device)
        xs = x2.to(dtype)
        step = self._chunk_rows()
        for k0 in range(0, self.in_features, step):
            k1 = min(self.in_features, k0 + step)
            out.addmm_(xs[:, k0:k1], self._dequant_rows(k0, k1, dtype))
        return out.to(x2.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.backend == "triton":
            from quantkit.kernels.int_matmul import int_matmul

            return int_matmul(x, self.packed())
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.cpu_kernels and x2.device.type == "cpu" and not self.cache_dequant and self._fast_path() is not None:
            return self._fast(x2).view(*lead, self.out_features)
        return self._torch_forward(x2).view(*lead, self.out_features)


class GGMLLinear(nn.Module):
    def __init__(self, type_name: str, data: torch.Tensor, shape: tuple[int, int], backend: str = "torch",
                 cache_dequant: bool = False, cpu_kernels: bool = False):
        super().__init__()
        _check_backend(backend)
        self.cpu_kernels, self._fast = cpu_kernels, None
        self.type_name, self.backend, self.cache_dequant = type_name, backend, cache_dequant
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.register_buffer("data", data, persistent=False)
        self._cached: torch.Tensor | None = None

    @classmethod
    def from_ggml_tensor(cls, t: GGMLTensor, backend: str = "torch", device=None, cache_dequant: bool = False,
                         cpu_kernels: bool = False):
        if len(t.shape) != 2:
            raise ValueError(f"GGMLLinear needs a 2-D tensor, got shape {t.shape}")
        data = _block_bytes(t).to(device or "cpu")
        return cls(t.type_name, data, (t.shape[0], t.shape[1]), backend, cache_dequant, cpu_kernels)

    def _fast_path(self):
        if self._fast is None:
            from quantkit.kernels import cpu

            self._fast = False
            direct = cpu.direct_ggml(self.data, self.type_name)
            if direct is not None:
                self._fast = direct
                return self._fast
            parts = cpu.ggml_parts(self.data, self.type_name) if cpu.available() else None
            if parts is not None:
                self._fast = cpu.build(*parts) or False
        return self._fast or None

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.type_name}, backend={self.backend}" + (
            ", cache_dequant" if self.cache_dequant else "")

    def weight_nbytes(self) -> int:
        return self.data.numel()

    def _dequant(self, r0: int, r1: int, dtype) -> torch.Tensor:
        return dequantize_rows(self.data[r0:r1], self.type_name).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "triton" and self.type_name in _triton_types():
            from quantkit.kernels.ggml_matmul import ggml_matmul

            return ggml_matmul(x2, self.data, self.type_name).view(*lead, self.out_features)
        if self.cpu_kernels and x2.device.type == "cpu" and not self.cache_dequant and self._fast_path() is not None:
            return self._fast(x2).view(*lead, self.out_features)
        if self.cache_dequant:
            if self._cached is None or self._cached.dtype != x2.dtype:
                self._cached = self._dequant(0, self.out_features, torch.float32).to(x2.dtype).t().contiguous()
            return (x2 @ self._cached).view(*lead, self.out_features)
        out = torch.empty((x2.shape[0], self.out_features), dtype=x2.dtype, device=x2.device)
        step = max(1, CHUNK_ELEMS // self.in_features)
        for r0 in range(0, self.out_features, step):
            r1 = min(self.out_features, r0 + step)
            out[:, r0:r1] = x2 @ self._dequant(r0, r1, x2.dtype).t()
        return out.view(*lead, self.out_features)


class GGMLEmbedding(nn.Module):
    """Token embedding stored in a ggml block type: dequantizes only the rows it looks up."""

    def __init__(self, type_name: str, data: torch.Tensor, shape: tuple[int, int], dtype=torch.float32):
        super().__init__()
        self.type_name, self.dtype = type_name, dtype
        self.num_embeddings, self.embedding_dim = int(shape[0]), int(shape[1])
        self.register_buffer("data", data, persistent=False)

    @classmethod
    def from_ggml_tensor(cls, t: GGMLTensor, device=None, dtype=torch.float32):
        data = _block_bytes(t).to(device or "cpu")
        return cls(t.type_name, data, (t.shape[0], t.shape[1]), dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.data.index_select(0, tokens.reshape(-1))
        return dequantize_rows(rows, self.type_name).to(self.dtype).view(*tokens.shape, self.embedding_dim)


def _block_bytes(t: GGMLTensor) -> torch.Tensor:
    """The block bytes as a uint8 tensor [rows, bytes per row] sharing the GGMLTensor's memory (no copy). When that
    memory is a numpy view of a torch tensor (the GGUF reader's file mapping), the result is a view of the same torch
    storage, so neighbouring tensors of one file can be fused without a copy (`adjacent_rows`)."""
    import numpy as np

    arr = np.ascontiguousarray(t.data).reshape(t.shape[0], -1)
    base = arr.base
    while base is not None and not isinstance(base, torch.Tensor):
        base = getattr(base, "base", None)
    if base is None or base.dtype != torch.uint8:
        return torch.from_numpy(arr)
    storage = base.untyped_storage()
    offset = arr.ctypes.data - storage.data_ptr()
    if not 0 <= offset <= storage.nbytes() - arr.size:
        return torch.from_numpy(arr)
    return torch.empty(0, dtype=torch.uint8).set_(storage, offset, arr.shape, (arr.shape[1], 1))


def adjacent_rows(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """One [sum of rows, row bytes] view over row blocks that lie back to back in one storage (q|k|v or gate|up of a
    memory-mapped GGUF, written in that order), or None when they do not."""
    first = parts[0]
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for t in parts:
        if (t.dim() != 2 or not t.is_contiguous() or t.shape[1] != first.shape[1] or t.dtype != first.dtype
                or t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in parts)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())


def shares_storage(parts: list[torch.Tensor]) -> bool:
    """True when the tensors are views into one larger storage (e.g. a file mapping): concatenating them would copy
    memory that is already there."""
    ptr = parts[0].untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() == ptr and t.untyped_storage().nbytes() > t.numel() * t.element_size()
               for t in parts)


def _triton_types() -> tuple[str, ...]:
    from quantkit.kernels.ggml_matmul import SUPPORTED

    return SUPPORTED

