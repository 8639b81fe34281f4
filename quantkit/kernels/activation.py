"""SwiGLU activation of the fused gate|up projection in one Triton kernel: silu(gate) * up.

Input [rows, 2F] (gate columns first, as `fuse_projections` concatenates them), output [rows, F] in the input's
dtype. Reference: `silu_mul_ref` — `F.silu(gate) * up` in the input dtype (silu rounded to the dtype before the
product, as torch computes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, F_, stride_in, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < F_
    g = tl.load(gu_ptr + row * stride_in + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_in + F_ + offs, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] -> silu(gate) * up [..., F]."""
    two_f = gate_up.shape[-1]
    if two_f % 2:
        raise ValueError(f"silu_mul: last dimension {two_f} is not gate|up (even)")
    f = two_f // 2
    x2 = gate_up.reshape(-1, two_f)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*gate_up.shape[:-1], f), device=gate_up.device, dtype=gate_up.dtype)
    o2 = out.view(-1, f)
    block = 1024
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(f, block))](x2, o2, f, x2.stride(0), o2.stride(0), BLOCK=block)
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
