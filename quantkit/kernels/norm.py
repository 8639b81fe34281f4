"""Fused RMSNorm (one Triton program per row) for the GPU decode path: ~8 small torch kernels become one;
`add_rmsnorm` also folds in the residual add that precedes every norm after the first.

Same math as `quantkit.model.reference.RMSNorm` (the reference):
    y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, H, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the reference
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=dtype)
    y2 = out.view(-1, h)
    _rmsnorm_kernel[(x2.shape[0],)](x2, weight, y2, h, x2.stride(0), y2.stride(0), eps,
                                    BLOCK=triton.next_power_of_2(h), num_warps=4 if h <= 4096 else 8)
    return out



@triton.jit
def _add_rmsnorm_kernel(h_ptr, d_ptr, w_ptr, hout_ptr, y_ptr, H, stride_h, stride_d, stride_o, stride_y, eps,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    h = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0)
    dl = tl.load(d_ptr + row * stride_d + offs, mask=ok, other=0.0)
    s = (h.to(tl.float32) + dl.to(tl.float32)).to(hout_ptr.dtype.element_ty)  # the residual, rounded as h + d
    tl.store(hout_ptr + row * stride_o + offs, s, mask=ok)
    x = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * inv).to(hout_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual update and the next norm in one pass: (h + delta, rmsnorm(h + delta)). Reference:
    `add_rmsnorm_ref` (what the decoder layer computes with two torch ops and RMSNorm)."""
    hdim = h.shape[-1]
    h2, d2 = h.reshape(-1, hdim), delta.reshape(-1, hdim)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    if d2.stride(-1) != 1:
        d2 = d2.contiguous()
    h_out = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    y = torch.empty(h.shape, device=h.device, dtype=torch.promote_types(weight.dtype, h.dtype))
    o2, y2 = h_out.view(-1, hdim), y.view(-1, hdim)
    _add_rmsnorm_kernel[(h2.shape[0],)](h2, d2, weight, o2, y2, hdim, h2.stride(0), d2.stride(0), o2.stride(0),
                                        y2.stride(0), eps, BLOCK=triton.next_power_of_2(hdim),
                                        num_warps=4 if hdim <= 4096 else 8)
    return h_out, y


def add_rmsnorm_ref(h, delta, weight, eps):
    s = h + delta
    return s, rmsnorm_ref(s, weight, eps)

def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
