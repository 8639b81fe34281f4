"""GGML grids: the exact value sets of ggml block types, for GPTQ's error feedback (the `Grid` protocol of
`quantkit/quant/grid.py`).

A group is one ggml block along a row: 32 columns for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, one 256-column super-block for
the k-quants. `fit` runs the same search as the encoder (`quantize_ggml`, llama.cpp's reference; with
`importance` its imatrix-weighted search) on the current, error-updated weights of the group, and keeps the
resulting block header: fp16 super-scales and the 4/6/8-bit sub-block scales (and mins). The grid of a sub-block
is then `{s*c}` (Q8_0, Q4_0, Q5_0, Q3_K, Q6_K), `{s*q + m}` (Q4_1, Q5_1), `{s*q - m}` (Q2_K, Q4_K, Q5_K) or
`{s*v[q]}` with v the non-linear 16-value table (IQ4_NL, IQ4_XS; a code is the index of the nearest value), with
`s`, `m` computed in float32 exactly as llama.cpp's dequantizer computes them, so `encode` writes an ordinary
block whose dequantized values are bit-identical to `fake_quant`'s.

Legacy types weight with `qw * sqrt(sigma2 + x^2)` where llama.cpp's sigma2 is the mean x^2 of the whole row;
a grid only sees one group, so sigma2 is that group's mean x^2 here (k-quants use the super-block, as llama.cpp).

GGUF stores attn_q/attn_k rows permuted relative to HF; blocks lie within rows, so fitting and encoding in HF row
order and permuting the encoded rows afterwards gives the same bytes as doing it in GGUF order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quantkit.errors import SchemeError
from quantkit.ggml_types import IQ4_VALUES, block_size, f16_to_f32, type_size
from quantkit.gguf import kquants, legacy
from quantkit.gguf.quants import quantize_ggml
from quantkit.kernels.ggml_ref import iq4_values, iq4_xs_scales
from quantkit.quant.gptq import GPTQ, GPTQInfo
from quantkit.quant.scheme import Scheme
from quantkit.tensors import GGMLTensor, QuantTensor


@dataclass(frozen=True)
class _Spec:
    sub: int  # columns per sub-block (sharing one effective scale)
    lo: int  # code range (signed codes for "sym", unsigned otherwise)
    hi: int
    kind: str  # "sym": s*c | "add": s*q + m | "sub": s*q - m | "table": s*IQ4_VALUES[q]


SPECS: dict[str, _Spec] = {
    "Q8_0": _Spec(32, -128, 127, "sym"),
    "Q4_0": _Spec(32, -8, 7, "sym"),
    "Q5_0": _Spec(32, -16, 15, "sym"),
    "Q4_1": _Spec(32, 0, 15, "add"),
    "Q5_1": _Spec(32, 0, 31, "add"),
    "Q2_K": _Spec(16, 0, 3, "sub"),
    "Q3_K": _Spec(16, -4, 3, "sym"),
    "Q4_K": _Spec(32, 0, 15, "sub"),
    "Q5_K": _Spec(32, 0, 31, "sub"),
    "Q6_K": _Spec(16, -32, 31, "sym"),
    "IQ4_NL": _Spec(32, 0, 15, "table"),
    "IQ4_XS": _Spec(32, 0, 15, "table"),
}
GRID_TYPES = tuple(SPECS)


@dataclass
class GGMLParams:
    """Parameters of one block for every output row."""

    scale: torch.Tensor  # float32 [out, n_sub]: effective step of each sub-block (as the dequantizer computes it)
    minv: torch.Tensor | None  # float32 [out, n_sub]: added (Q4_1/Q5_1) or subtracted (k-quants) offset
    header: np.ndarray  # uint8 [out, block_bytes]: the fitted block; encode() writes the codes into it


def effective_scales(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-sub-block (scale, offset) in float32, computed exactly as the dequantizer (`kernels/ggml_ref.py`)
    computes them."""
    b = blocks
    if type_name in ("Q8_0", "Q4_0", "Q5_0", "IQ4_NL"):
        return f16_to_f32(b[:, 0:2])[:, None], None
    if type_name in ("Q4_1", "Q5_1"):
        return f16_to_f32(b[:, 0:2])[:, None], f16_to_f32(b[:, 2:4])[:, None]
    if type_name in ("Q4_K", "Q5_K"):
        sc, m = kquants.scale_min_k4(b[:, 4:16])
        return (f16_to_f32(b[:, 0:2])[:, None] * sc.astype(np.float32),
                f16_to_f32(b[:, 2:4])[:, None] * m.astype(np.float32))
    if type_name == "Q6_K":
        return f16_to_f32(b[:, 208:210])[:, None] * b[:, 192:208].view(np.int8).astype(np.float32), None
    if type_name == "Q3_K":
        sc = (kquants.q3_k_scales(b[:, 96:108]).astype(np.int8) - np.int8(32)).astype(np.float32)
        return f16_to_f32(b[:, 108:110])[:, None] * sc, None
    if type_name == "Q2_K":
        sc = b[:, 0:16]
        return (f16_to_f32(b[:, 80:82])[:, None] * (sc & 0x0F).astype(np.float32),
                f16_to_f32(b[:, 82:84])[:, None] * (sc >> 4).astype(np.float32))
    if type_name == "IQ4_XS":
        sc = iq4_xs_scales(torch.from_numpy(np.ascontiguousarray(b))).numpy().astype(np.float32)
        return f16_to_f32(b[:, 0:2])[:, None] * sc, None
    raise SchemeError(f"no GGML grid for type {type_name!r} (supported: {', '.join(GRID_TYPES)})")


def write_codes(type_name: str, blocks: np.ndarray, codes: np.ndarray) -> None:
    """Write codes [n, block] (signed for "sym" types, unsigned otherwise) into the code fields of `blocks`."""
    c = codes.astype(np.int32)
    if type_name == "Q8_0":
        blocks[:, 2:34] = c.astype(np.int8).view(np.uint8)
    elif type_name == "Q4_0":
        blocks[:, 2:18] = legacy.pack_nibbles(c + 8)
    elif type_name == "Q5_0":
        q = c + 16
        blocks[:, 2:6] = legacy.pack_qh(q)
        blocks[:, 6:22] = legacy.pack_nibbles(q)
    elif type_name == "Q4_1":
        blocks[:, 4:20] = legacy.pack_nibbles(c)
    elif type_name == "Q5_1":
        blocks[:, 4:8] = legacy.pack_qh(c)
        blocks[:, 8:24] = legacy.pack_nibbles(c)
    elif type_name == "Q2_K":
        blocks[:, 16:80] = kquants.pack_2bit(c)
    elif type_name == "Q3_K":
        blocks[:, 0:96] = kquants.pack_q3_k_codes(c + 4)
    elif type_name == "Q4_K":
        blocks[:, 16:144] = kquants.pack_q4_k_codes(c)
    elif type_name == "Q5_K":
        blocks[:, 16:176] = kquants.pack_q5_k_codes(c)
    elif type_name == "Q6_K":
        blocks[:, 0:192] = kquants.pack_q6_k_codes(c + 32)
    elif type_name == "IQ4_NL":
        blocks[:, 2:18] = legacy.pack_nibbles(c)
    elif type_name == "IQ4_XS":
        blocks[:, 8:136] = legacy.pack_nibbles(c.reshape(-1, 32)).reshape(len(blocks), 128)
    else:
        raise SchemeError(f"no GGML grid for type {type_name!r}")


class GGMLGrid:
    """The grid of ggml type `type_name` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,
    IQ4_XS)."""

    def __init__(self, type_name: str):
        if type_name not in SPECS:
            raise SchemeError(f"no GGML grid for type {type_name!r} (supported: {', '.join(GRID_TYPES)})")
        self.type_name = type_name
        self.spec = SPECS[type_name]
        self.group_size = block_size(type_name)
        self.block_bytes = type_size(type_name)

    def __repr__(self) -> str:
        return f"GGMLGrid({self.type_name})"

    def fit(self, w_group: torch.Tensor, importance: torch.Tensor | None = None) -> GGMLParams:
        x = w_group.detach().to("cpu", torch.float32).numpy()
        if x.shape[1] != self.group_size:
            raise SchemeError(f"{self}: fit got {x.shape[1]} columns, expected one block of {self.group_size}")
        imp = None
        if importance is not None:
            imp = importance.detach().to("cpu", torch.float32).numpy()
            if not np.any(imp > 0):
                imp = None  # llama.cpp's weighted search degenerates on an all-zero imatrix slice
        header = quantize_ggml(x, self.type_name, importance=imp, threads=1).data.copy()
        scale, minv = effective_scales(self.type_name, header)
        device = w_group.device
        return GGMLParams(torch.from_numpy(np.ascontiguousarray(scale)).to(device),
                          None if minv is None else torch.from_numpy(np.ascontiguousarray(minv)).to(device), header)

    def _codes(self, w: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, values): llama.cpp's rounding of each weight to a code (float32 integers; 0 where the step is
        0) and the grid values of those codes, computed as the dequantizer computes them.

        Idempotent: for "sym" kinds (s*c)/s is within 2^-23 relative of c (|c| <= 128); for the offset kinds
        w = fl(s*q -+ m) and w +- m is exact (Sterbenz) whenever the offset dominates, so the division misses q by
        at most |delta|/s with delta the rounding of w; if it does miss, the missed code's value is the same
        float (none found in 4e7 random trials down to s = m/2^30). `encode` verifies every weight anyway."""
        kind = self.spec.kind
        if kind == "table":
            values = s[..., None] * iq4_values(w.device)  # [.., 16], ascending where s > 0
            c = (values - w[..., None]).abs().argmin(dim=-1).to(torch.float32)
            c = torch.where(s != 0, c, torch.full_like(c, float(IQ4_VALUES.index(1))))  # ggml's index for 0 * x
            return c, self._values(c, s, m)
        if kind == "sym":
            v = w / s
        elif kind == "add":
            v = (w - m) / s
        else:
            v = (w + m) / s
        c = torch.clamp(torch.round(v), self.spec.lo, self.spec.hi)
        c = torch.where(s != 0, c, torch.zeros_like(c)) + 0.0  # + 0.0: a code of -0.0 is stored as 0
        return c, self._values(c, s, m)

    def _values(self, c: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        if self.spec.kind == "table":
            return s * iq4_values(c.device)[c.long()]
        if self.spec.kind == "sym":
            return s * c
        if self.spec.kind == "add":
            return s * c + m
        return s * c - m

    def _select(self, params: GGMLParams, offset: int, k: int):
        sub = self.spec.sub
        first, last = offset // sub, (offset + k - 1) // sub
        if first == last:  # the common case: GPTQ rounds one column at a time
            s = params.scale[:, first:first + 1]
            m = None if params.minv is None else params.minv[:, first:first + 1]
        else:
            idx = torch.arange(offset, offset + k, device=params.scale.device) // sub
            s = params.scale[:, idx]
            m = None if params.minv is None else params.minv[:, idx]
        return s, m

    def fake_quant(self, w_cols: torch.Tensor, params: GGMLParams, offset: int = 0) -> torch.Tensor:
        w = w_cols.to(torch.float32)
        s, m = self._select(params, offset, w.shape[1])
        return self._codes(w, s, m)[1].to(w_cols.dtype)

    def neighbours(self, q_cols: torch.Tensor, params: GGMLParams, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid values one code below and one above each value of `q_cols` (values on this grid), NaN where
        there is none (the code's end, or a step of 0)."""
        w = q_cols.to(torch.float32)
        s, m = self._select(params, offset, w.shape[1])
        c = self._codes(w, s, m)[0]
        lo, hi = (0, len(IQ4_VALUES) - 1) if self.spec.kind == "table" else (self.spec.lo, self.spec.hi)
        nan = torch.full_like(w, float("nan"))
        live = (s != 0).expand_as(w)
        down = torch.where((c > lo) & live, self._values((c - 1).clamp(min=lo), s, m), nan)
        up = torch.where((c < hi) & live, self._values((c + 1).clamp(max=hi), s, m), nan)
        return down, up

    def encode(self, weight_hat: torch.Tensor, params_list: list[GGMLParams],
               g_idx: torch.Tensor | None = None) -> GGMLTensor:
        out_f, in_f = weight_hat.shape
        gs = self.group_size
        if in_f % gs:
            raise SchemeError(f"{self}: {in_f} columns are not a multiple of the block size {gs}")
        n_groups = in_f // gs
        if len(params_list) != n_groups:
            raise SchemeError(f"{self}.encode: {len(params_list)} parameter sets for {n_groups} blocks")
        if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(in_f) // gs):
            raise SchemeError(f"{self}: ggml blocks cannot express a column permutation (act-order without "
                              "static groups); use static groups")
        w = weight_hat.detach().to("cpu", torch.float32)
        data = np.empty((out_f, n_groups * self.block_bytes), dtype=np.uint8)
        off_grid = 0
        for g, params in enumerate(params_list):
            s = params.scale.cpu()
            m = None if params.minv is None else params.minv.cpu()
            idx = torch.arange(gs) // self.spec.sub
            s, m = s[:, idx], None if m is None else m[:, idx]
            wg = w[:, g * gs:(g + 1) * gs]
            codes, val = self._codes(wg, s, m)
            miss = val != wg
            if bool(miss.any()):  # rare: search every code for an exact match
                codes, miss = self._exhaustive(wg, s, m, codes, miss)
                off_grid += int(miss.sum())
            blocks = params.header.copy()
            write_codes(self.type_name, blocks, codes.to(torch.int32).numpy())
            data[:, g * self.block_bytes:(g + 1) * self.block_bytes] = blocks
        t = GGMLTensor(self.type_name, (out_f, in_f), data)
        t.error["off_grid_weights"] = off_grid  # weights not exactly representable (encoded to the nearest code)
        return t

    def _exhaustive(self, w, s, m, codes, miss):
        for code in range(self.spec.lo, self.spec.hi + 1):
            c = torch.full_like(codes, float(code))
            hit = miss & (self._values(c, s, m) == w)
            codes = torch.where(hit, c, codes)
            miss = miss & ~hit
            if not bool(miss.any()):
                break
        return codes, miss

    def quantize_rtn(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> GGMLTensor:
        """Round-to-nearest through the grid (one fit per block); for k-quants this is llama.cpp's encoding."""
        w = weight.to(torch.float32)
        gs = self.group_size
        params = [self.fit(w[:, c:c + gs], None if importance is None else importance[c:c + gs])
                  for c in range(0, w.shape[1], gs)]
        w_hat = torch.cat([self.fake_quant(w[:, c:c + gs], p) for p, c in zip(params, range(0, w.shape[1], gs))],
                          dim=1)
        return self.encode(w_hat, params)


def ggml_grid(type_name: str) -> GGMLGrid:
    return GGMLGrid(type_name)


def gptq_round(gptq: GPTQ, weight: torch.Tensor, target: Scheme | str, name: str, **options: Any
               ) -> tuple[QuantTensor | GGMLTensor, GPTQInfo | None]:
    """GPTQ of `weight` onto `target` with `gptq`'s Hessian: an integer scheme, or a ggml type's grid; a lattice
    i-quant (IQ1_S .. IQ3_S: no grid) gets its own search weighted by the Hessian's diagonal (the imatrix of the
    same tokens) and no GPTQInfo. `options`: those of `GPTQ.quantize` (damp, block_size, group_aware, last, ...)."""
    if isinstance(target, str) and target not in GRID_TYPES:
        from quantkit.gguf.codec import encode

        return encode(weight.float().cpu(), target, gptq.input_mean_square().cpu(), name=name), None
    return gptq.quantize(weight, target if isinstance(target, Scheme) else ggml_grid(target), name=name, **options)
