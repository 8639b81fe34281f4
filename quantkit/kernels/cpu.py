"""CPU fast paths built on torch's own low-bit CPU kernels (bf16 arithmetic, so results differ from the exact
fp32 path by bf16 rounding of activations and scales — the same class of error as llama.cpp's 8-bit
activation quantization; the exact path stays the default).

- `Int4CPU`: 4-bit codes with one (scale, zero) per 32/64/128/256 inputs -> `aten._weight_int4pack_mm_for_cpu`
  (w = (q - 8) * scale + zero). Serves int4 QuantTensors, Q4_0, Q4_1 and Q4_K (sub-block scale and min folded).
- `GroupedInt8CPU`: int8 codes per group with a per-(row, group) scale and optional additive offset ->
  one `aten._weight_int8pack_mm` per group plus `sum_g(x_g) @ offset`. Serves Q8_0, Q6_K, Q5_K and int8.
- `DirectGGML`: the block bytes as stored (no repacked copy: a memory-mapped GGUF is read in place), through the
  C++ extension kernels/cpu_ext.py (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). Fewer than `PREFILL_ROWS`
  activation rows (decode): integer VNNI kernels (activations rounded to 15-bit integers, exact integer block sums,
  rel. error ~5e-5); more (prefill): tiles of weight rows dequantized to bf16 and multiplied by torch's bf16 matmul
  (AMX where the CPU has it; bf16 rounding, rel. error ~3e-3). Used instead of the int4/int8 paths above where the
  extension builds with AVX512-VNNI (and K % 256 == 0).
References: `int4_reference` / `int8_reference` (dequantize to fp32 and matmul); cpu_ext.reference_matmul and
cpu_ext.bf16_reference.
"""

from __future__ import annotations

import torch

from quantkit.ggml_types import block_size, f16_to_f32, type_size
from quantkit.kernels.ggml_ref import _blocks, _q4k_codes, k_scale_min


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int4CPU:
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        """codes [N, K] in 0..15; scale/zero [N, K // group_size] with w = (q - 8) * scale + zero."""
        n, k = codes.shape
        self.n, self.k, self.group_size = n, k, group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]

    @staticmethod
    def supports(n: int, k: int, group_size: int) -> bool:
        return group_size in (32, 64, 128, 256) and k % group_size == 0 and n % 16 == 0

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.packed,
                                                        self.group_size, self.scale_zero)
        return y.to(x2.dtype)


def int4_reference(x2, codes, scale, zero, group_size):
    """Plain torch: x @ ((q - 8) * scale + zero)^T in fp32."""
    s = scale.float().repeat_interleave(group_size, 1)
    z = zero.float().repeat_interleave(group_size, 1)
    return x2.float() @ ((codes.float() - 8) * s + z).t()


class GroupedInt8CPU:
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int):
        """codes int8 [N, K]; scale/offset [N, G]: w[n, k] = codes[n, k] * scale[n, g] + offset[n, g]."""
        n, k = codes.shape
        g = k // group_size
        self.n, self.k, self.group_size, self.groups = n, k, group_size, g
        self.codes = codes.to(torch.int8).reshape(n, g, group_size).permute(1, 0, 2).contiguous()  # [G, N, gs]
        self.scale = scale.t().to(torch.bfloat16).contiguous()  # [G, N]
        self.offset = None if offset is None or not bool(offset.any()) else offset.t().float().contiguous()  # [G, N]

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        gs, m = self.group_size, x2.shape[0]
        xg = x2.to(torch.bfloat16).view(m, self.groups, gs).transpose(0, 1).contiguous()  # [G, M, gs]
        out = torch.ops.aten._weight_int8pack_mm(xg[0], self.codes[0], self.scale[0]).float()
        for g in range(1, self.groups):
            out += torch.ops.aten._weight_int8pack_mm(xg[g], self.codes[g], self.scale[g])
        if self.offset is not None:
            out += x2.float().view(x2.shape[0], self.groups, gs).sum(-1) @ self.offset
        return out.to(x2.dtype)


def int8_reference(x2, codes, scale, offset, group_size):
    s = scale.float().repeat_interleave(group_size, 1)
    w = codes.float() * s
    if offset is not None:
        w = w + offset.float().repeat_interleave(group_size, 1)
    return x2.float() @ w.t()


# ---- converters: stored formats -> (codes, scale, zero/offset, group) ----


def ggml_parts(data: torch.Tensor, type_name: str):
    """('int4' | 'int8', codes [R, K], scale [R, G], zero_or_offset [R, G] | None, group_size) or None."""
    r = data.shape[0]
    if type_name == "Q4_0":
        b = _blocks(data, "Q4_0")
        qs = b[..., 2:18].to(torch.int32)
        codes = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(r, -1)
        d = f16_to_f32(b[..., 0:2])
        return "int4", codes, d, torch.zeros_like(d), 32
    if type_name == "Q4_1":
        b = _blocks(data, "Q4_1")
        qs = b[..., 4:20].to(torch.int32)
        codes = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(r, -1)
        d, m = f16_to_f32(b[..., 0:2]), f16_to_f32(b[..., 2:4])
        return "int4", codes, d, 8 * d + m, 32
    if type_name == "Q4_K":
        b = _blocks(data, "Q4_K")
        d, dmin = f16_to_f32(b[..., 0:2]), f16_to_f32(b[..., 2:4])
        sc, m = k_scale_min(b[..., 4:16])
        codes = _q4k_codes(b[..., 16:144]).reshape(r, -1)
        scale = (d[..., None] * sc).reshape(r, -1)
        mins = (dmin[..., None] * m).reshape(r, -1)
        return "int4", codes, scale, 8 * scale - mins, 32
    if type_name == "Q8_0":
        b = _blocks(data, "Q8_0")
        codes = b[..., 2:34].contiguous().view(torch.int8).reshape(r, -1)
        return "int8", codes, f16_to_f32(b[..., 0:2]), None, 32
    if type_name == "Q6_K":
        b = _blocks(data, "Q6_K")
        ql = b[..., 0:128].to(torch.int32).reshape(*b.shape[:2], 2, 64)
        qh = b[..., 128:192].to(torch.int32).reshape(*b.shape[:2], 2, 1, 32)
        low = torch.stack([ql[..., 0:32] & 0xF, ql[..., 32:64] & 0xF, ql[..., 0:32] >> 4, ql[..., 32:64] >> 4], dim=-2)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32)[:, None]
        codes = ((low | (((qh >> shifts) & 3) << 4)) - 32).reshape(r, -1)
        scale = f16_to_f32(b[..., 208:210])[..., None] * b[..., 192:208].contiguous().view(torch.int8).float()
        return "int8", codes, scale.reshape(r, -1), None, 16
    if type_name == "Q5_K":
        b = _blocks(data, "Q5_K")
        d, dmin = f16_to_f32(b[..., 0:2]), f16_to_f32(b[..., 2:4])
        sc, m = k_scale_min(b[..., 4:16])
        qh = b[..., 16:48].to(torch.int32)
        high = ((qh[..., None, :] >> torch.arange(8)[:, None]) & 1) << 4
        codes = (_q4k_codes(b[..., 48:176]) | high).reshape(r, -1)
        return "int8", codes, (d[..., None] * sc).reshape(r, -1), -(dmin[..., None] * m).reshape(r, -1), 32
    return None


# activation rows from which the dequantize-a-tile + bf16 matmul path beats the integer kernels (7B shapes, one
# core: at 4 rows the VNNI kernel is ~2x faster, at 16 the tiled path is ~2.5x faster)
PREFILL_ROWS = 8


class DirectGGML:
    """x @ W^T on ggml block bytes kept exactly as stored (kernels/cpu_ext.py)."""

    def __init__(self, data: torch.Tensor, type_name: str):
        self.data, self.type_name = data.contiguous(), type_name

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        from quantkit.kernels.cpu_ext import ggml_matmul, tiled_matmul

        if x2.shape[0] >= PREFILL_ROWS:
            return tiled_matmul(x2, self.data, self.type_name).to(x2.dtype)
        return ggml_matmul(x2, self.data, self.type_name).to(x2.dtype)


def direct_ggml(data: torch.Tensor, type_name: str) -> DirectGGML | None:
    """The extension's kernels for this type, or None (type not covered, no compiler here, or no AVX512-VNNI: the
    portable loop is ~5x slower than torch's int4/int8 paths, so it only serves as a tested fallback)."""
    from quantkit.kernels import cpu_ext

    if type_name not in cpu_ext.SUPPORTED or data.shape[1] % type_size(type_name):
        return None
    k = data.shape[1] // type_size(type_name) * block_size(type_name)
    if k % 256 or not cpu_ext.uses_simd():  # activations are rounded per 256 values
        return None
    return DirectGGML(data, type_name)


def build(kind: str, codes, scale, zero, group_size):
    if kind == "int4":
        if not Int4CPU.supports(codes.shape[0], codes.shape[1], group_size):
            return None
        return Int4CPU(codes, scale, zero, group_size)
    return GroupedInt8CPU(codes, scale, zero, group_size)
