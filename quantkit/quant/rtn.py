"""Round-to-nearest group quantization (min-max parameters, optional MSE-searched clipping).

The group-parameter conventions are GPTQ's (AutoGPTQ `Quantizer.find_params`), shared by every quantizer here:
    xmin = min(group_min, 0), xmax = max(group_max, 0)
    symmetric:  xmax = max(|xmin|, xmax), xmin = -xmax, zero = 2^(bits-1)
    asymmetric: zero = round(-xmin / scale)
    scale = (xmax - xmin) / maxq   (a group of zeros gets xmin=-1, xmax=+1)
    code  = clamp(round(w / scale) + zero, 0, maxq)     (round half to even, as torch.round)
"""

from __future__ import annotations

import torch

from quantkit.quant.scheme import Scheme
from quantkit.tensors import QuantTensor


def group_params(w: torch.Tensor, bits: int, symmetric: bool, shrink: torch.Tensor | float = 1.0):
    """Scale and zero for each row of `w` [rows, cols] (one group per row). `shrink` scales the range (clipping)."""
    maxq = (1 << bits) - 1
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0) * shrink
    xmax = torch.clamp(w.max(dim=1).values, min=0) * shrink
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """w [rows, cols] with per-row scale/zero [rows] -> integer codes (float tensor)."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale[:, None] * (quantize_codes(w, scale, zero, maxq) - zero[:, None])


def mse_group_params(w: torch.Tensor, bits: int, symmetric: bool, grid: int = 100, max_shrink: float = 0.8,
                     norm: float = 2.4, weight: torch.Tensor | None = None):
    """GPTQ's MSE clipping search: try range shrinks 1.0 .. 1-max_shrink and keep the best per row."""
    maxq = (1 << bits) - 1
    w = w.float()
    best_scale, best_zero = group_params(w, bits, symmetric)
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, zero = group_params(w, bits, symmetric, shrink=p)
        err = (fake_quantize(w, scale, zero, maxq) - w).abs().pow(norm)
        if weight is not None:
            err = err * weight
        err = err.sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-30)))


def quantize_rtn(weight: torch.Tensor, scheme: Scheme) -> QuantTensor:
    """Quantize one weight matrix [out, in] with round-to-nearest under `scheme`."""
    out_f, in_f = weight.shape
    gs = scheme.effective_group_size(in_f)
    scheme.check_shape("weight", weight.shape)
    n_groups = in_f // gs
    # rows of `w` are (output row, group) pairs
    w = weight.float().reshape(out_f, n_groups, gs).reshape(out_f * n_groups, gs)
    if scheme.mse_clip:
        scale, zero = mse_group_params(w, scheme.bits, scheme.symmetric)
    else:
        scale, zero = group_params(w, scheme.bits, scheme.symmetric)
    scale = scale.to(getattr(torch, scheme.scale_dtype)).float()  # codes are computed with the stored scale
    codes = quantize_codes(w, scale, zero, scheme.maxq)
    qt = QuantTensor(
        codes=codes.reshape(out_f, in_f).to(torch.uint8),
        scales=scale.reshape(out_f, n_groups).to(getattr(torch, scheme.scale_dtype)),
        zeros=zero.reshape(out_f, n_groups).to(torch.int32),
        bits=scheme.bits,
        group_size=gs,
        symmetric=scheme.symmetric,
    )
    qt.error["sqnr_db"] = round(sqnr_db(weight.float(), qt.dequantize()), 3)
    return qt
