"""ggml's CPU numerics for matrix products, in plain torch: the activation rounding llama.cpp does before every
`mul_mat`, so that quantkit's dequantized model can be compared with llama.cpp beyond "close".

On the CPU, ggml does not multiply a quantized weight with float activations. `ggml_compute_forward_mul_mat` first
converts every activation row to the weight type's `vec_dot_type` (ggml-cpu.c `type_traits_cpu`) and then takes
integer (or half-precision) dot products:

    weight type                         vec_dot_type   activation row becomes
    F32                                 F32            unchanged
    F16 / BF16                          F16 / BF16     rounded to F16 / BF16 (round to nearest even)
    Q4_0, Q5_0, Q8_0, IQ4_NL            Q8_0           blocks of 32: int8 codes * fp16 scale
    Q4_1, Q5_1                          Q8_1           as Q8_0, plus s = fp16(d * sum(codes)) for the weight min
    Q2_K .. Q6_K, IQ4_XS, ...           Q8_K           blocks of 256: int8 codes * fp32 scale (exact block sums)

Since the dot products are exact integer sums scaled by the block scales, the product equals — up to float32
summation order — the float product of the dequantized weight with the *dequantized activation*. That is what
`quantize_activations(x, vec_dot_type)` returns. The one term that is not of that form is Q8_1's `s`: llama.cpp
adds `m_w * fp16(d_y * sum(q_y))` for each block of a Q4_1/Q5_1 weight, where the dequantized product would give
`m_w * fp16(d_y) * sum(q_y)`; `GGMLNumericsLinear` adds the difference, using the weight's block mins.

Rounding rules transcribed from llama.cpp (ggml/src/ggml-cpu/arch/x86/quants.c and repack.cpp, ggml-quants.c) as
built here (x86, AVX2 and AVX-512 enabled; ggml-quants.c is compiled without -march, so no FMA contraction):

* Q8_0 / Q8_1, x86 SIMD (`quantize_row_q8_0`, `quantize_row_q8_1`, `ggml_quantize_mat_q8_0_4x8` for repacked
  Q4_0): amax over the block, `d = amax / 127`, `id = 127 / amax` (not `1 / d`), codes
  `_mm256_round_ps(x * id, _MM_ROUND_NEAREST)` — round half to even; stored scale `fp16(d)`.
  The scalar reference (`quantize_row_q8_0_ref`, what `gguf.quants` implements) uses `id = 1 / d` and `roundf`
  (half away from zero): `rounding="ref"`.
* Q8_K (`quantize_row_q8_K` -> `quantize_row_q8_K_ref`; repacked Q4_K/Q2_K rows use `ggml_quantize_mat_q8_K_4x8`
  with the same arithmetic): `max` = the signed value of the first element of largest magnitude,
  `iscale = -127 / max`, codes `min(127, nearest_int(iscale * x))` (round half to even), `d = 1 / iscale`.
  (The repacked variant prefers +amax over -amax when both occur in one block; the codes then change sign with
  `d`, so the dequantized values are the same either way.)

Checked against llama.cpp itself (tests/test_gguf_activations.py): given the inputs llama.cpp's graph fed to each
matmul, these roundings reproduce its outputs to ~3e-7 relative for every tensor type of quantkit's GGUF mixes.
This does not make a whole forward pass bit-faithful: rounding is discontinuous, so float32 summation-order
differences upstream (~1e-7) still flip some codes, and the flips compound over layers (benchmarks/RESULTS.md).

Torch note: `scalar / tensor` computes a reciprocal and multiplies (not correctly rounded), so divisions here are
tensor / tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.ggml_types import block_size, f16_to_f32, type_size
from quantkit.model.arch import EMBEDDING, is_quantizable_linear

# ggml-cpu.c type_traits_cpu[...].vec_dot_type, for the weight types a GGUF of a Mistral/Llama model holds
VEC_DOT_TYPE = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "MXFP4": "Q8_0",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
    "IQ2_XXS": "Q8_K", "IQ2_XS": "Q8_K", "IQ2_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K",
    "IQ1_S": "Q8_K", "IQ1_M": "Q8_K", "IQ4_XS": "Q8_K", "TQ1_0": "Q8_K", "TQ2_0": "Q8_K",
}
def _blocks(x: torch.Tensor, what: str) -> torch.Tensor:
    """x [..., n] -> float32 [..., n / block, block] in blocks of the activation type `what`."""
    size = block_size(what)
    if x.shape[-1] % size:
        raise QuantkitError(f"{what}: activation rows of {x.shape[-1]} values are not a multiple of {size}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _div(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """numerator / t correctly rounded in t's dtype (`scalar / tensor` in torch is reciprocal-then-multiply)."""
    return torch.full_like(t, numerator) / t


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C `roundf` of float32 values (computed in float64, where |v| + 0.5 is exact)."""
    v64 = v.double()
    return (torch.sign(v64) * torch.floor(v64.abs() + 0.5)).float()


def q8_0_blocks(x: torch.Tensor, rounding: str = "x86") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (codes [..., n/32, 32] float32 integers in [-127, 127], d [..., n/32, 1] float32 scale as
    stored: fp16(amax / 127)). rounding: "x86" (ggml's AVX path, used here) or "ref" (quantize_row_q8_0_ref)."""
    xb = _blocks(x, "Q8_0")
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)  # tensor / tensor: a true division
    if rounding == "x86":
        inv = torch.where(amax != 0, _div(127.0, amax), torch.zeros_like(amax))
        q = torch.round(xb * inv)  # float32 product, then round half to even
    elif rounding == "ref":
        inv = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
        q = _round_half_away(xb * inv)
    else:
        raise QuantkitError(f"unknown Q8_0 rounding {rounding!r} (expected 'x86' or 'ref')")
    return q.clamp(-128, 127), d.half().float()


def q8_1_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x86 `quantize_row_q8_1`: (codes, d = fp16(amax/127), s = fp16(amax/127 * sum(codes))), all float32."""
    xb = _blocks(x, "Q8_1")
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)  # tensor / tensor: a true division
    inv = torch.where(amax != 0, _div(127.0, amax), torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-128, 127)
    s = (d * q.sum(-1, keepdim=True)).half().float()  # fp32 d times the (exact) integer sum, then fp16
    return q, d.half().float(), s


def q8_K_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_row_q8_K_ref`: (codes [..., n/256, 256] float32 integers, d [..., n/256, 1] float32 = 1/iscale)."""
    xb = _blocks(x, "Q8_K")
    ax = xb.abs()
    amax = ax.amax(-1, keepdim=True)
    first = (ax == amax).to(torch.uint8).argmax(-1, keepdim=True)  # first element of largest magnitude
    signed_max = torch.gather(xb, -1, first)
    nonzero = amax != 0
    iscale = torch.where(nonzero, _div(-127.0, torch.where(nonzero, signed_max, torch.ones_like(signed_max))),
                         torch.zeros_like(amax))
    q = torch.round(xb * iscale).clamp(max=127)  # nearest_int: round half to even of the float32 product
    d = torch.where(nonzero, _div(1.0, torch.where(nonzero, iscale, torch.ones_like(iscale))), torch.zeros_like(amax))
    return q, d


def quantize_activations(x: torch.Tensor, vec_dot_type: str, rounding: str = "x86") -> torch.Tensor:
    """The activation row ggml's CPU dot product actually uses, dequantized to float32 (same shape as x)."""
    if vec_dot_type == "F32":
        return x.float()
    if vec_dot_type == "F16":
        return x.half().float()
    if vec_dot_type == "BF16":
        return x.bfloat16().float()
    if vec_dot_type == "Q8_0":
        q, d = q8_0_blocks(x, rounding)
    elif vec_dot_type == "Q8_1":
        q, d, _ = q8_1_blocks(x)
    elif vec_dot_type == "Q8_K":
        q, d = q8_K_blocks(x)
    else:
        raise QuantkitError(f"unknown vec_dot_type {vec_dot_type!r} (expected F32, F16, BF16, Q8_0, Q8_1 or Q8_K)")
    return (q * d).reshape(x.shape)


def round_input(module: nn.Module, vec_dot_type: str) -> torch.utils.hooks.RemovableHandle:
    """Make `module` (any linear: nn.Linear, a runtime GGMLLinear) multiply its input rounded to `vec_dot_type`, as
    ggml's CPU backend does: a forward pre-hook, whose handle is returned. The rounding of `GGMLNumericsLinear`
    without Q8_1's fp16 sum term (a Q4_1/Q5_1 weight's min times a rounding of a rounding), and without a copy of
    the weight: what a measurement of a whole model can afford."""
    def hook(_module, args):
        return (quantize_activations(args[0], vec_dot_type).to(args[0].dtype), *args[1:])

    return module.register_forward_pre_hook(hook)


def block_mins(tensor) -> torch.Tensor | None:
    """Per-block mins m [rows, cols/32] float32 of a Q4_1/Q5_1 `GGMLTensor` (None for other types)."""
    type_name = getattr(tensor, "type_name", None)
    if type_name not in ("Q4_1", "Q5_1"):  # the weight types paired with Q8_1; their fp16 `m` is at byte 2
        return None
    rows = tensor.data.reshape(tensor.shape[0], -1, type_size(type_name))
    return torch.from_numpy(f16_to_f32(rows[:, :, 2:4]))


class GGMLNumericsLinear(nn.Module):
    """`y = W x` the way ggml's CPU backend computes it: x rounded to the weight type's vec_dot_type first.

    `weight` is the dequantized weight; `mins` (Q4_1/Q5_1 only) the weight's block mins, for Q8_1's fp16 `s` term.
    """

    def __init__(self, weight: torch.Tensor, weight_type: str, mins: torch.Tensor | None = None,
                 rounding: str = "x86", accumulate: torch.dtype | None = None):
        super().__init__()
        self.accumulate = accumulate  # None: the weight's dtype; torch.float64: exactly rounded sums
        if weight_type not in VEC_DOT_TYPE:
            raise QuantkitError(f"no ggml vec_dot_type known for weight type {weight_type!r}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_type, self.vec_dot_type, self.rounding = weight_type, VEC_DOT_TYPE[weight_type], rounding
        if self.vec_dot_type == "Q8_1" and mins is None:
            raise QuantkitError(f"{weight_type}: the Q8_1 product needs the weight's block mins")
        self.register_buffer("mins", mins if self.vec_dot_type == "Q8_1" else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.accumulate or self.weight.dtype
        if self.vec_dot_type != "Q8_1":
            xq = quantize_activations(x, self.vec_dot_type, self.rounding)
            return F.linear(xq.to(dtype), self.weight.to(dtype)).to(self.weight.dtype)
        q, d, s = q8_1_blocks(x)
        y = F.linear((q * d).reshape(x.shape).to(dtype), self.weight.to(dtype))
        # llama.cpp adds m_w * s per block; the dequantized product above added m_w * d * sum(q)
        correction = s[..., 0] - d[..., 0] * q.sum(-1)
        return (y + F.linear(correction.to(dtype), self.mins.to(dtype))).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, {self.weight_type} x {self.vec_dot_type}"


def products(model: nn.Module, tensor_types: dict[str, str]) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, the stored tensor it multiplies by) for every matrix product of a `Transformer`,
    reference or runtime (module names = canonical tensor names): the decoder layers' linears and lm_head. A tied
    `lm_head` multiplies by the embedding, as llama.cpp multiplies by token_embd then. QuantkitError when
    `tensor_types` has no type for one of them."""
    found = []
    for name, module in model.named_modules():
        if name != "lm_head" and not is_quantizable_linear(f"{name}.weight"):
            continue
        key = f"{name}.weight"
        if key not in tensor_types and name == "lm_head":
            key = EMBEDDING
        if key not in tensor_types:
            raise QuantkitError(f"{name}: no GGUF tensor type given for {key!r}")
        found.append((name, module, key))
    return found


def round_inputs(model: nn.Module, tensor_types: dict[str, str]) -> list[torch.utils.hooks.RemovableHandle]:
    """`round_input` on every product of `model` (`products`), to its weight type's vec_dot_type (a type without
    one rounds nothing); the hooks' handles."""
    return [round_input(module, VEC_DOT_TYPE.get(tensor_types[key], "F32"))
            for _, module, key in products(model, tensor_types)]


def apply_ggml_numerics(model: nn.Module, tensor_types: dict[str, str], get_tensor=None,
                        rounding: str = "x86", accumulate: torch.dtype | None = None) -> nn.Module:
    """Swap every linear of a reference `Transformer` (`products`) for a `GGMLNumericsLinear` keyed by that tensor's
    GGUF type (`QuantizedCheckpoint.metadata["tensor_types"]`).

    `get_tensor(name)` (e.g. `QuantizedCheckpoint.get`) supplies the GGMLTensor of Q4_1/Q5_1 weights for their
    block mins. `accumulate=torch.float64` sums the products exactly rounded instead of in float32 (a different
    summation order from ggml's, like float32's own): the spread between the two measures how far the rounding chain
    amplifies summation-order noise. Returns the model (modified in place).
    """
    replacements = []
    for name, module, key in products(model, tensor_types):
        wtype = tensor_types[key]
        mins = None
        if VEC_DOT_TYPE.get(wtype) == "Q8_1":
            if get_tensor is None:
                raise QuantkitError(f"{key}: {wtype} needs get_tensor for the block mins")
            mins = block_mins(get_tensor(key))
        replacements.append((name, GGMLNumericsLinear(module.weight.detach(), wtype, mins, rounding, accumulate)))
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
