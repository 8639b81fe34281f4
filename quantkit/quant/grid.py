"""Grids: the representable values of a target type, as GPTQ's error feedback sees them.

GPTQ quantizes one column at a time and pushes each column's error onto the columns not yet quantized. It needs
to know, for the target type, (1) how many consecutive input columns share parameters (`group_size`), (2) how to
fit those parameters on the current, error-updated weights of a group (`fit`), (3) how to round some columns of a
group to the grid under fitted parameters (`fake_quant`) and (4) how to encode the final rounded matrix (`encode`).
Any type that answers these four questions can be the target of GPTQ: integer group-affine schemes (`IntGrid`,
here) and the ggml block types (`quantkit/gguf/grids.py`).

Protocol (stable; other engineers implement it):

    group_size: int
        input columns sharing one set of parameters (scheme group; 32 for Q4_0/Q8_0..., 256 for k-quant
        super-blocks). `in_features` must be a multiple of it.
    fit(w_group [out, group_size] fp32, importance [group_size] fp32 | None) -> params
        parameters for one group of every output row, fitted on `w_group` (the error-updated weights).
        `importance` is a per-column weight (the diagonal of the Hessian / an imatrix); a grid may ignore it.
    fake_quant(w_cols [out, k] fp32, params, offset: int) -> w_hat_cols [out, k] fp32
        round columns `offset .. offset+k` (positions inside the group) to the grid under `params`.
        Must be elementwise-idempotent: fake_quant(fake_quant(w)) == fake_quant(w).
    encode(weight_hat [out, in] fp32, params_list: list[params], g_idx: Tensor[in] | None = None)
        -> QuantTensor | GGMLTensor
        the final tensor. `weight_hat` is already on the grid (the output of fake_quant, original column order);
        `params_list[g]` are the parameters of group g; `g_idx[c]` is the group of column c (None: c // group_size).
        Grids without a per-column group index (ggml) may raise SchemeError when g_idx is not trivial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from quantkit.errors import SchemeError
from quantkit.quant.rtn import group_params, mse_group_params, sqnr_db
from quantkit.quant.scheme import Scheme
from quantkit.tensors import GGMLTensor, QuantTensor


@runtime_checkable
class Grid(Protocol):
    group_size: int

    def fit(self, w_group: torch.Tensor, importance: torch.Tensor | None = None) -> Any: ...

    def fake_quant(self, w_cols: torch.Tensor, params: Any, offset: int = 0) -> torch.Tensor: ...

    def neighbours(self, q_cols: torch.Tensor, params: Any, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode(self, weight_hat: torch.Tensor, params_list: list[Any],
               g_idx: torch.Tensor | None = None) -> QuantTensor | GGMLTensor: ...


@dataclass
class IntParams:
    """Parameters of one group for every output row: scale and integer zero point (both fp32 [out])."""

    scale: torch.Tensor
    zero: torch.Tensor


class IntGrid:
    """Group-affine integer grid of a `Scheme`, with the GPTQ parameter conventions of `quant/rtn.py`.

    Scales are rounded to the scheme's scale dtype when fitted, so the error feedback and the codes both use the
    value that will be stored. With `scheme.mse_clip` the clipping range is searched (weighted by `importance`
    when given).
    """

    def __init__(self, scheme: Scheme, in_features: int | None = None):
        self.scheme = scheme
        self.maxq = scheme.maxq
        if scheme.group_size == -1:
            if in_features is None:
                raise SchemeError("IntGrid: a per-channel scheme (group_size -1) needs in_features")
            self.group_size = in_features
        else:
            self.group_size = scheme.group_size
        self._scale_dtype = getattr(torch, scheme.scale_dtype)

    def __repr__(self) -> str:
        return f"IntGrid({self.scheme.describe()})"

    def fit(self, w_group: torch.Tensor, importance: torch.Tensor | None = None) -> IntParams:
        w = w_group.float()
        if self.scheme.mse_clip:
            weight = None if importance is None else importance.float()[None, :]
            scale, zero = mse_group_params(w, self.scheme.bits, self.scheme.symmetric, weight=weight)
        else:
            scale, zero = group_params(w, self.scheme.bits, self.scheme.symmetric)
        scale = scale.to(self._scale_dtype).float()
        # a scale that underflows the storage dtype would divide by zero; keep the smallest positive value
        scale = torch.where(scale > 0, scale, torch.finfo(self._scale_dtype).tiny)
        return IntParams(scale, zero)

    def fake_quant(self, w_cols: torch.Tensor, params: IntParams, offset: int = 0) -> torch.Tensor:
        s = params.scale[:, None]
        z = params.zero[:, None]
        return s * (torch.clamp(torch.round(w_cols / s) + z, 0, self.maxq) - z)

    def neighbours(self, q_cols: torch.Tensor, params: IntParams, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid values one code below and one above each value of `q_cols` (values on this grid), NaN at the
        code range's ends."""
        s, z = params.scale[:, None], params.zero[:, None]
        c = self.codes(q_cols, params)
        nan = torch.full_like(c, float("nan"))
        return (torch.where(c > 0, s * (c - 1 - z), nan), torch.where(c < self.maxq, s * (c + 1 - z), nan))

    def codes(self, w_cols: torch.Tensor, params: IntParams) -> torch.Tensor:
        s = params.scale[:, None]
        return torch.clamp(torch.round(w_cols / s) + params.zero[:, None], 0, self.maxq)

    def encode(self, weight_hat: torch.Tensor, params_list: list[IntParams],
               g_idx: torch.Tensor | None = None) -> QuantTensor:
        out_f, in_f = weight_hat.shape
        if in_f % self.group_size:
            raise SchemeError(f"IntGrid.encode: group size {self.group_size} does not divide {in_f} columns")
        n_groups = in_f // self.group_size
        if len(params_list) != n_groups:
            raise SchemeError(f"IntGrid.encode: {len(params_list)} parameter sets for {n_groups} groups")
        scales = torch.stack([p.scale for p in params_list], dim=1)  # [out, groups]
        zeros = torch.stack([p.zero for p in params_list], dim=1)
        g = torch.arange(in_f, device=weight_hat.device) // self.group_size if g_idx is None else g_idx.long()
        s, z = scales[:, g], zeros[:, g]
        codes = torch.clamp(torch.round(weight_hat.float() / s) + z, 0, self.maxq)
        trivial = g_idx is None or torch.equal(g, torch.arange(in_f, device=g.device) // self.group_size)
        return QuantTensor(
            codes=codes.to(torch.uint8),
            scales=scales.to(self._scale_dtype),
            zeros=zeros.to(torch.int32),
            bits=self.scheme.bits,
            group_size=self.group_size,
            symmetric=self.scheme.symmetric,
            g_idx=None if trivial else g.to(torch.int32),
        )

    def quantize_rtn(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> QuantTensor:
        """Round-to-nearest through the grid (one fit per group); equals `rtn.quantize_rtn` without importance."""
        w = weight.float()
        params = [self.fit(w[:, c:c + self.group_size],
                           None if importance is None else importance[c:c + self.group_size])
                  for c in range(0, w.shape[1], self.group_size)]
        w_hat = torch.cat([self.fake_quant(w[:, c:c + self.group_size], p)
                           for p, c in zip(params, range(0, w.shape[1], self.group_size))], dim=1)
        qt = self.encode(w_hat, params)
        qt.error["sqnr_db"] = round(sqnr_db(w, qt.dequantize()), 3)
        return qt


def make_grid(target: Scheme | Grid, in_features: int) -> Grid:
    """A Scheme becomes its IntGrid; a Grid is returned unchanged."""
    if isinstance(target, Scheme):
        return IntGrid(target, in_features)
    return target
