"""AWQ (activation-aware weight quantization) on one decoder layer: scale search, folding, clipping search.

What it does, per decoder layer of `quantkit.model.reference` (module names are the HF names), following AutoAWQ
(casper-hansen/AutoAWQ awq/quantize/quantizer.py, scale.py, models/mistral.py; docs/algorithms.md §2.2):

1. Capture the inputs of q_proj (= k, v), o_proj, gate_proj (= up) and down_proj on the calibration activations
   (the decoder layer's own sub-steps: attention_input, attention_core, mlp_input, mlp_hidden).
2. For each scaling group, search the per-input-channel scale s over a grid of 20 ratios α ∈ {0, 1/20, …, 19/20}:
       s = (x_mean^α / (w_mean^(1−α) + 1e-4)).clamp(min=1e-4),  s /= sqrt(max(s)·min(s))     (duo scaling)
   where x_mean = mean |x| per input channel (fp32) and w_mean = the mean over output rows of |W| / max|W| of
   its quantization group (the group's linears concatenated). Each candidate replaces W by Q(W·s)/s and
   measures the MSE of the group's module output against the unquantized output:
       input_layernorm          -> q,k,v      loss on self_attn output
       v_proj (rows)            -> o_proj     only when v_proj and o_proj weights have the same shape
                                              (AutoAWQ's rule: skipped under grouped-query attention)
       post_attention_layernorm -> gate,up    loss on mlp output
       up_proj (rows)           -> down_proj  loss on down_proj output
   All searches use the inputs captured in step 1 (before any scaling), as AutoAWQ does. A group whose inspected
   module is its only linear (down_proj; o_proj) gets its MSE on the CPU from the Gram matrix XᵀX (`_gram_loss`:
   equal up to rounding, per candidate out·in² instead of tokens·in·out). Two options make the other groups'
   searches cheaper (the pipeline uses both): `search_dtype` runs the module outputs in a bf16 copy of the layer
   (reference and candidates alike), and `rank_every` ranks the candidates on a subset of the samples and scores
   only the best few on all of them.
3. Fold the scales: the previous op absorbs 1/s (RMSNorm weight, or the rows of the previous linear), the
   scaled linears' columns are multiplied by s. The layer computes the same function (up to rounding).
4. Clipping search for every quantized linear except q_proj/k_proj: per (output row, group), max|w| shrunk by
   (1 − i/20) for i = 0..9, weights clamped to ±max, quantized, and the output error on ≤ 512 evenly strided
   tokens (inputs divided by the folded scales) is minimised. The best clamp is applied to the weights.

The pipeline then quantizes the modified layer's linears (RTN with the Scheme). The search's quantizer is the
scheme's own (`search_quantizer="scheme"`: GPTQ conventions of quant/rtn.py, range including 0, scales rounded
to the storage dtype), so the search optimises what is stored; `"autoawq"` uses AutoAWQ's pseudo-quantizer
(asymmetric min/max not forced to include 0; symmetric absmax with levels −2^(b−1)..2^(b−1)−1).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from quantkit.errors import CalibrationError, SchemeError
from quantkit.quant.rtn import group_params
from quantkit.quant.scheme import Scheme

N_GRID = 20
CLIP_SKIP = ("q_", "k_", "query", "key", "Wqkv")  # AutoAWQ: "qk bmm is hard to clip"


@dataclass
class ScalingGroup:
    prev: str  # module name of the op that absorbs 1/s
    linears: tuple[str, ...]  # module names of the scaled linears
    inspect: str  # module whose output measures the loss
    feature: str  # which captured input feeds the linears


def scaling_groups(layer: nn.Module) -> list[ScalingGroup]:
    """The Llama/Mistral scaling groups of AutoAWQ, including the grouped-query-attention rule for v→o."""
    attn = layer.self_attn
    groups = [ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           "self_attn", "self_attn.q_proj")]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", "self_attn.o_proj"))
    groups.append(ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "mlp.gate_proj"))
    groups.append(ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "mlp.down_proj"))
    return groups


# ---- pseudo-quantizers (fake quantization of a whole matrix) ----

def fake_quant_scheme(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Q(w) with the scheme's RTN conventions (what the pipeline will store)."""
    out_f, in_f = w.shape
    gs = scheme.effective_group_size(in_f)
    x = w.float().reshape(-1, gs)
    scale, zero = group_params(x, scheme.bits, scheme.symmetric)
    scale = scale.to(getattr(torch, scheme.scale_dtype)).float()
    scale = torch.where(scale > 0, scale, torch.finfo(torch.float16).tiny)[:, None]
    # in place on one fresh tensor: the same elementwise operations, in the same order, as
    # clamp(round(x / scale) + zero, 0, maxq) - zero) * scale, without a temporary per step
    q = torch.div(x, scale)
    q.round_()
    # symmetric: zero is the constant 2^(bits-1), a scalar does the same arithmetic without broadcasting a tensor
    zero = float((scheme.maxq + 1) // 2) if scheme.symmetric else zero[:, None]
    q.add_(zero).clamp_(0, scheme.maxq).sub_(zero)
    q.mul_(scale)
    return q.reshape(out_f, in_f).to(w.dtype)


def fake_quant_autoawq(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """AutoAWQ's `pseudo_quantize_tensor` (zero_point=True for asymmetric schemes)."""
    out_f, in_f = w.shape
    gs = scheme.effective_group_size(in_f)
    x = w.float().reshape(-1, gs)
    if not scheme.symmetric:
        max_val = x.amax(dim=1, keepdim=True)
        min_val = x.amin(dim=1, keepdim=True)
        max_int = 2**scheme.bits - 1
        scales = (max_val - min_val).clamp(min=1e-5) / max_int
        zeros = (-torch.round(min_val / scales)).clamp(0, max_int)
        x = (torch.clamp(torch.round(x / scales) + zeros, 0, max_int) - zeros) * scales
    else:
        max_val = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)
        max_int = 2 ** (scheme.bits - 1) - 1
        scales = max_val / max_int
        x = torch.clamp(torch.round(x / scales), -max_int - 1, max_int) * scales
    return x.reshape(out_f, in_f).to(w.dtype)


QUANTIZERS: dict[str, Callable[[torch.Tensor, Scheme], torch.Tensor]] = {
    "scheme": fake_quant_scheme,
    "autoawq": fake_quant_autoawq,
}
# quantizers that treat each (row, group) independently, so stacking matrices by rows changes nothing
_ROW_GROUP_QUANTIZERS = (fake_quant_scheme, fake_quant_autoawq)


# ---- the layer ----

def _capture_inputs(layer: nn.Module, acts: torch.Tensor, inputs, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Inputs of q_proj, o_proj, gate_proj, down_proj for every calibration sample: name -> [N, T, in]
    (the layer's sub-steps, in the order of its forward)."""
    names = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    store: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(0, acts.shape[0], batch_size):
            x = acts[i:i + batch_size].to(device)
            attn_in = layer.attention_input(x)
            core = layer.attention_core(attn_in, *inputs)
            mlp_in = layer.mlp_input(layer.attention_output(x, core))
            for n, t in zip(names, (attn_in, core, mlp_in, layer.mlp_hidden(mlp_in))):
                if n not in store:  # filled in place: a list of batches and its concatenation would be two copies
                    store[n] = torch.empty((acts.shape[0], *t.shape[1:]), dtype=t.dtype)
                store[n][i:i + batch_size] = t.detach()
    return store


def _floats_to(obj, dtype: torch.dtype):
    """The layer's forward inputs (tensors, nested in tuples) with their floating-point tensors in `dtype`."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(_floats_to(o, dtype) for o in obj)
    return obj.to(dtype) if torch.is_tensor(obj) and obj.is_floating_point() else obj


def _layer_dtype(layer: nn.Module) -> torch.dtype:
    return next(layer.parameters()).dtype


def _run_module(module_name: str, layer: nn.Module, x: torch.Tensor, inputs, batch_size: int, device) -> torch.Tensor:
    """The output of one module of the layer (the whole attention, the whole MLP or a linear) on inputs x (in the
    layer's dtype)."""
    mod = dict(layer.named_modules())[module_name]
    dtype = _layer_dtype(layer)
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device, dtype)
            outs.append(mod(xb, *inputs) if module_name == "self_attn" else mod(xb))
    return torch.cat(outs)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).sum(dtype=torch.float64)) / a.numel()


# The output of the module a group inspects, on the unscaled layer, is the output of its last linear on the input
# captured for that linear (same batches, same operations): the searches reuse it instead of re-running the module.
_REFERENCE_LINEAR = {"self_attn": "self_attn.o_proj", "self_attn.o_proj": "self_attn.o_proj",
                     "mlp": "mlp.down_proj", "mlp.down_proj": "mlp.down_proj"}


def _per_batch(layer: nn.Module) -> bool:
    """Whether a layer's module losses are summed batch by batch (`_module_loss`): a 16-bit layer, i.e. the copy a
    search in bf16 runs."""
    return _layer_dtype(layer) in (torch.bfloat16, torch.float16)


def _module_loss(module_name: str, layer: nn.Module, x: torch.Tensor, inputs, batch_size: int, device,
                 reference: torch.Tensor, buf: torch.Tensor, buf64: torch.Tensor | None = None) -> float:
    """`_mse(reference, _run_module(...))` without concatenating the outputs: the squared differences are written
    batch by batch into `buf` (fp32, reference's shape) and summed once, so every element and the reduction over
    the whole tensor are the same as there. `reference` is the fp32 reference on `device`; `buf64` (optional, fp64,
    reference's shape) is kept for the sum, which `sum(dtype=torch.float64)` would convert into a fresh tensor.

    A layer in a 16-bit dtype (`_per_batch`: the bf16 copy of a search in bf16) has its outputs' errors summed batch
    by batch instead (fp32 dot products, added in fp64): `buf` then holds one batch, and each batch is one pass
    rather than three over the whole buffer, with the same value up to rounding."""
    mod = dict(layer.named_modules())[module_name]
    dtype = _layer_dtype(layer)
    per_batch = _per_batch(layer)
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device, dtype)
            out = mod(xb, *inputs) if module_name == "self_attn" else mod(xb)
            d = buf[:xb.shape[0]] if per_batch else buf[i:i + batch_size]
            # a bf16 output is widened exactly inside the subtraction; an fp64 one is rounded to fp32 first
            torch.sub(reference[i:i + batch_size], out.float() if out.dtype == torch.float64 else out, out=d)
            del out
            if per_batch:
                flat = d.view(-1)
                total += float(torch.dot(flat, flat))
            else:
                d.pow_(2)
    if per_batch:
        return total / reference.numel()
    if buf64 is None:
        return float(buf.sum(dtype=torch.float64)) / buf.numel()
    return float(buf64.copy_(buf).sum()) / buf.numel()


def _gram_loss(linear: nn.Linear, x: torch.Tensor, device):
    """A function () -> the MSE of `linear`'s output on x between its original weights and its current ones, from
    the Gram matrix H = Xᵀ X (fp64, computed once): Σ_t |x_t (W - Q)ᵀ|² = Σ_rows (D H) ∘ D with D = W - Q. Per
    candidate this costs out × in² instead of tokens × in × out (the bias cancels). The value equals the MSE of the
    outputs up to rounding (both are within ~1e-7 relative of the exact loss), not bitwise."""
    flat = x.reshape(-1, x.shape[-1])
    in_f = flat.shape[1]
    h = torch.zeros(in_f, in_f, dtype=torch.float64, device=device)
    for i in range(0, flat.shape[0], 8192):
        c = flat[i:i + 8192].to(device, torch.float64)
        h.addmm_(c.t(), c)
    original = linear.weight.detach().to(torch.float64, copy=True)
    numel = flat.shape[0] * original.shape[0]

    def loss() -> float:
        dw = original - linear.weight.detach().to(torch.float64)
        return float(torch.mm(dw, h).mul_(dw).sum()) / numel

    return loss


GRAM_MAX_IN = 8192  # in_features above which the fp64 Gram matrix (in² × 8 bytes) is not worth its memory


def _gram_pays(linear: nn.Linear, x: torch.Tensor, device) -> bool:
    """Whether the Gram form is cheaper: on the CPU (fp64 matmuls are slow on many GPUs, and the search is fast
    there anyway), with fewer input features than half the tokens (per candidate out·in² vs tokens·in·out flops)."""
    in_f = linear.in_features
    return torch.device(device).type == "cpu" and in_f <= GRAM_MAX_IN and 2 * in_f <= x.numel() // x.shape[-1]


def _uses_gram(group: ScalingGroup, layer: nn.Module, x: torch.Tensor, device) -> bool:
    """Whether the group's loss takes the Gram form: its inspected module is its only linear, and that pays."""
    mod = dict(layer.named_modules())[group.inspect]
    return isinstance(mod, nn.Linear) and group.linears == (group.inspect,) and _gram_pays(mod, x, device)


def _loss_function(group: ScalingGroup, layer: nn.Module, x: torch.Tensor, inputs, batch_size: int, device,
                   reference: torch.Tensor | None):
    """() -> the loss of the group's current weights in `layer` against `reference` (fp32 on device): the Gram form
    (`_uses_gram`, which does not need the reference), else the module's output batch by batch (`_module_loss`)."""
    if _uses_gram(group, layer, x, device):
        return _gram_loss(dict(layer.named_modules())[group.inspect], x, device)
    if _per_batch(layer):  # one batch of fp32 work space, no fp64 copy
        buf, buf64 = reference.new_empty((min(batch_size, reference.shape[0]), *reference.shape[1:])), None
    else:
        buf = torch.empty_like(reference)
        buf64 = torch.empty_like(reference, dtype=torch.float64)
    return lambda: _module_loss(group.inspect, layer, x, inputs, batch_size, device, reference, buf, buf64)


def input_mean(x: torch.Tensor) -> torch.Tensor:
    """mean |x| per input channel of x [..., in], accumulated in fp32 (AWQ's x_mean)."""
    flat = x.reshape(-1, x.shape[-1])
    x_sum = torch.zeros(flat.shape[1], dtype=torch.float32)
    for i in range(0, flat.shape[0], 65536):
        x_sum += flat[i:i + 65536].float().abs().sum(0)
    return x_sum / flat.shape[0]


def search_scale(layer: nn.Module, group: ScalingGroup, x: torch.Tensor, schemes: dict[str, Scheme], inputs,
                 batch_size: int, device, quantizer: Callable, duo_scaling: bool = True, n_grid: int = N_GRID,
                 reference: torch.Tensor | None = None, forward: tuple[nn.Module, tuple] | None = None,
                 rank_every: int = 1, rescore: int = 3, x_mean: torch.Tensor | None = None):
    """Best scale for one group: returns (scales [in] fp32, best ratio, best loss, loss of ratio 0).

    `reference`: the unquantized output of `group.inspect` on x, when the caller has it (else it is computed).
    `forward`: (a copy of the layer in another dtype, its `inputs`) that runs the candidates' module outputs (the
    candidates are quantized from `layer`'s weights, then cast); `reference` must then come from that copy.
    `x_mean`: `input_mean` of the layer-dtype inputs, when the caller has it; x may then already be in the forward
    copy's dtype (what it is converted to anyway), so that the caller need not hold both copies.
    `rank_every` > 1 (groups whose loss is a module's output, with at least 16 samples in the subset): the n_grid
    candidates are ranked on every rank_every-th calibration sample, and only the best `rescore` of them (and ratio
    0, whose loss is reported) are scored on all samples; the best of those wins. 1: every candidate on every
    sample (AutoAWQ's search)."""
    gram = _uses_gram(group, layer, x, device)
    fwd_layer, fwd_inputs = forward if forward is not None and not gram else (layer, inputs)
    modules = dict(layer.named_modules())
    targets = dict(fwd_layer.named_modules())
    linears = [modules[n] for n in group.linears]
    quantized = [n for n in group.linears if schemes.get(n) is not None]
    first = schemes[quantized[0]]
    # w_mean: per input channel, mean over rows of |W| / max|W| within its quantization group
    weight = torch.cat([m.weight.detach().float() for m in linears], dim=0)
    gs = first.effective_group_size(weight.shape[1])
    wg = weight.reshape(-1, gs).abs()
    w_mean = (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(weight.shape).mean(0)
    del weight, wg
    if x_mean is None:
        x_mean = input_mean(x)
    x_fwd = x if fwd_layer is layer else x.to(_layer_dtype(fwd_layer))  # converted once, not per candidate
    if gram:  # the Gram form needs no reference output
        reference = None
    else:
        if reference is None:
            reference = _run_module(group.inspect, fwd_layer, x_fwd, fwd_inputs, batch_size, device)
        reference = reference.to(device).float()
    loss_of = _loss_function(group, fwd_layer, x_fwd, fwd_inputs, batch_size, device, reference)
    originals = {n: modules[n].weight.data.clone() for n in group.linears}
    kept = {n: targets[n].weight.data for n in group.linears}  # restored at the end
    # Linears with the same scheme and dtype are fake-quantized as one matrix (their rows stacked): the known
    # quantizers work per (row, group) and elementwise, so every value is the one each linear gets on its own.
    stacks: list[tuple[list[str], torch.Tensor]] = []
    for n in quantized:
        w = originals[n]
        if (stacks and quantizer in _ROW_GROUP_QUANTIZERS and schemes[stacks[-1][0][0]] == schemes[n]
                and originals[stacks[-1][0][0]].dtype == w.dtype and stacks[-1][1].shape[1] == w.shape[1]):
            stacks[-1] = (stacks[-1][0] + [n], torch.cat([stacks[-1][1], w.float()]))
        else:
            stacks.append(([n], w.float()))
    def candidate(r: int) -> torch.Tensor:
        """Set the group's weights to ratio r's fake-quantized ones; its scales."""
        ratio = r / n_grid
        if duo_scaling:
            s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[torch.isinf(s) | torch.isnan(s)] = 1.0
        sv = s.to(device).view(1, -1)
        for names, wf in stacks:
            q = quantizer(wf * sv, schemes[names[0]]).div_(sv)
            if len(names) == 1:
                targets[names[0]].weight.data = q.to(kept[names[0]].dtype)
                continue
            r0 = 0
            for n in names:
                rows = originals[n].shape[0]
                # a fresh tensor per linear (never a view into the stack), in the linear's dtype
                targets[n].weight.data = q[r0:r0 + rows].to(kept[n].dtype, copy=True)
                r0 += rows
            del q
        return s

    order = list(range(n_grid))
    best = (math.inf, -1.0, None)
    first_loss = None
    try:
        if rank_every > 1 and x_fwd.shape[0] >= 16 * rank_every and not gram:
            rank_loss = _loss_function(group, fwd_layer, x_fwd[::rank_every], fwd_inputs, batch_size, device,
                                       reference[::rank_every].contiguous())
            ranked = []
            for r in order:
                candidate(r)
                ranked.append((rank_loss(), r))
            del rank_loss
            order = sorted({0, *(r for _, r in sorted(ranked)[:rescore])})
        for r in order:
            s = candidate(r)
            loss = loss_of()
            if r == 0:
                first_loss = loss
            if loss < best[0]:
                best = (loss, r / n_grid, s.clone())
    finally:
        for n, w in kept.items():
            targets[n].weight.data = w
    if best[2] is None:
        raise CalibrationError(f"AWQ scale search for {group.linears} found no finite loss (non-finite activations?)")
    return best[2], best[1], best[0], first_loss


def fold_scale(layer: nn.Module, group: ScalingGroup, s: torch.Tensor) -> None:
    """prev op absorbs 1/s, the scaled linears' input columns are multiplied by s (AutoAWQ apply_scale)."""
    modules = dict(layer.named_modules())
    prev = modules[group.prev]
    with torch.no_grad():
        def hi(t):  # compute in at least fp32 (fp64 layers stay fp64)
            return t.to(torch.promote_types(t.dtype, torch.float32))

        sd = s.to(prev.weight.device)
        if isinstance(prev, nn.Linear):
            rows = prev.weight[-sd.shape[0]:]
            rows.copy_((hi(rows) / hi(sd).view(-1, 1)).to(rows.dtype))
            if prev.bias is not None:
                prev.bias.copy_((hi(prev.bias) / hi(sd)).to(prev.bias.dtype))
        else:  # RMSNorm
            prev.weight.copy_((hi(prev.weight) / hi(sd)).to(prev.weight.dtype))
        for n in group.linears:
            w = modules[n].weight
            w.copy_((hi(w) * hi(sd).view(1, -1)).to(w.dtype))


CLIP_TOKENS = 512


def _clip_tokens(x: torch.Tensor, n_tokens: int = CLIP_TOKENS) -> torch.Tensor:
    """The tokens the clipping search uses: every `step`-th row of x [..., in] flattened, <= ~n_tokens of them."""
    flat = x.reshape(-1, x.shape[-1])
    return flat[::max(1, flat.shape[0] // n_tokens)]


def search_clip(w: torch.Tensor, x: torch.Tensor, scheme: Scheme, quantizer: Callable, n_grid: int = N_GRID,
                max_shrink: float = 0.5, n_tokens: int = CLIP_TOKENS, rows_per_batch: int = 256) -> torch.Tensor:
    """Best clamp value max|w| per (output row, group) [out, n_groups] minimising the group-wise output error."""
    out_f, in_f = w.shape
    gs = scheme.effective_group_size(in_f)
    ng = in_f // gs
    xs = _clip_tokens(x, n_tokens).float()  # [tok, in]
    xg = xs.reshape(xs.shape[0], ng, gs).permute(1, 2, 0).contiguous()  # [ng, gs, tok]
    best_all = []
    for r0 in range(0, out_f, rows_per_batch):
        wb = w[r0:r0 + rows_per_batch].float()
        wg = wb.reshape(wb.shape[0], ng, gs)
        org_max = wg.abs().amax(dim=-1, keepdim=True)  # [rows, ng, 1]
        org_out = torch.bmm(wg.permute(1, 0, 2), xg)  # [ng, rows, tok]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(wg, -max_val, max_val)
            q = quantizer(cur.reshape(wb.shape[0], in_f), scheme).reshape(wb.shape[0], ng, gs)
            cur_out = torch.bmm(q.permute(1, 0, 2), xg)
            err = (cur_out - org_out).pow(2).mean(dim=-1).t().unsqueeze(-1)  # [rows, ng, 1]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best_all.append(best_max.squeeze(-1))
    return torch.cat(best_all)


def apply_clip(linear: nn.Linear, max_val: torch.Tensor) -> None:
    with torch.no_grad():
        w = linear.weight
        out_f, in_f = w.shape
        ng = max_val.shape[1]
        m = max_val.to(w.device, torch.float32).unsqueeze(-1)
        clipped = torch.clamp(w.float().reshape(out_f, ng, in_f // ng), -m, m).reshape(out_f, in_f)
        w.copy_(clipped.to(w.dtype))


def awq_layer(layer: nn.Module, acts: torch.Tensor, schemes: dict[str, Scheme | None], *, inputs,
              batch_size: int = 8, device: str | torch.device = "cpu", duo_scaling: bool = True,
              clip: bool = True, n_grid: int = N_GRID, search_quantizer: str = "scheme",
              search_dtype: torch.dtype | None = None, rank_every: int = 1) -> dict:
    """Search AWQ scales and clipping for one decoder layer and fold them into it, in place.

    `acts`: the layer's input hidden states [n_samples, seq, hidden]; `inputs`: what the layer's forward takes
    besides them, (positions, rope, mask) of those sequences (`quantkit.model.reference.sequence_inputs`);
    `schemes`: local linear name ("self_attn.q_proj", ...) -> Scheme (None or missing: not quantized, still scaled
    so fused groups agree). `search_dtype` (e.g. torch.bfloat16; None: the layer's dtype): the dtype the scale
    search's module outputs run in (a copy of the layer; the reference outputs too, so both sides round alike).
    The statistics, the candidates' quantization, the folding and the clipping search stay in the layer's dtype.
    `rank_every` > 1: rank the candidates on a subset of the samples first (`search_scale`).
    Returns a summary dict: per-group best ratio/loss (scalars, for the per-layer log), plus `scales`
    {prev op: s} and `clips` {linear: max_val [out, groups]}.
    """
    if search_quantizer not in QUANTIZERS:
        raise SchemeError(f"unknown AWQ search quantizer {search_quantizer!r}; choose {', '.join(QUANTIZERS)}")
    if acts is None or acts.numel() == 0:
        raise CalibrationError("AWQ needs calibration activations for every layer (got none)")
    quantizer = QUANTIZERS[search_quantizer]
    schemes = {k: v for k, v in schemes.items() if v is not None}
    batch_size = max(1, batch_size)
    t0 = time.perf_counter()
    feats = _capture_inputs(layer, acts, inputs, batch_size, device)
    summary: dict = {"scales": {}, "clips": {}}
    found = []
    modules = dict(layer.named_modules())
    forward = None
    if search_dtype is not None and search_dtype != _layer_dtype(layer):
        forward = (copy.deepcopy(layer).to(search_dtype), _floats_to(inputs, search_dtype))
    fwd_layer, fwd_inputs = forward or (layer, inputs)
    groups = [g for g in scaling_groups(layer) if any(n in schemes for n in g.linears)]
    # Each captured input is held whole only until the last group that reads it (as its search input or as the
    # input of its reference output); then only the <= CLIP_TOKENS strided tokens the clipping search reads are
    # kept (a copy: a strided view would keep the whole tensor). At 7B the four inputs are 6.5 GiB in fp32.
    plan = []  # per group: (group, searches on the forward copy?, linear whose output is its reference or None)
    for group in groups:
        gram = _uses_gram(group, layer, feats[group.feature], device)  # then it needs no reference output
        ref_linear = _REFERENCE_LINEAR.get(group.inspect)
        has_ref = ref_linear is not None and isinstance(modules.get(ref_linear), nn.Linear) and not gram
        plan.append((group, forward is not None and not gram, ref_linear if has_ref else None))
    last_read = {n: -1 for n in feats}
    ref_last_read: dict[str, int] = {}
    for k, (group, _, ref_linear) in enumerate(plan):
        last_read[group.feature] = k
        if ref_linear is not None:
            last_read[ref_linear] = max(last_read[ref_linear], k)
            ref_last_read[ref_linear] = k
    clip_feats: dict[str, torch.Tensor] = {}
    references: dict[str, torch.Tensor] = {}  # linear -> its output (on the forward copy) on its captured input

    def keep_clip_tokens(n: str) -> torch.Tensor:
        """Drop input n's whole tensor, keeping the tokens the clipping search reads; returns the whole tensor."""
        whole = feats.pop(n)
        clip_feats[n] = _clip_tokens(whole).clone()
        return whole

    def release(k: int) -> None:
        for n in [n for n in feats if last_read[n] < k]:
            keep_clip_tokens(n)
        for n in [n for n in references if ref_last_read[n] < k]:
            del references[n]

    release(0)
    for k, (group, on_copy, ref_linear) in enumerate(plan):
        if ref_linear is not None and ref_linear not in references:
            references[ref_linear] = _run_module(ref_linear, fwd_layer, feats[ref_linear], fwd_inputs, batch_size,
                                                 device)
        x = feats[group.feature]
        x_mean = input_mean(x)
        if last_read[group.feature] == k:  # its last reader: the whole input goes, in the layer's dtype
            keep_clip_tokens(group.feature)
            if on_copy:  # only the forward copy's dtype is needed now: the layer-dtype input is freed here
                x = x.to(_layer_dtype(fwd_layer))
        s, ratio, loss, loss0 = search_scale(layer, group, x, schemes, inputs, batch_size, device, quantizer,
                                             duo_scaling, n_grid, reference=references.get(ref_linear),
                                             forward=forward, rank_every=rank_every, x_mean=x_mean)
        del x
        release(k + 1)
        found.append((group, s))
        key = group.prev.split(".")[-1]
        summary[f"ratio_{key}"] = ratio
        summary[f"loss_{key}"] = loss
        summary[f"loss0_{key}"] = loss0
    release(len(plan))  # every reference output and whole input
    del forward, fwd_layer
    # fold all scales (searched on the unscaled layer, as AutoAWQ), then rescale the kept tokens of the captured
    # inputs for clipping
    feats = clip_feats
    for group, s in found:
        fold_scale(layer, group, s)
        feats[group.feature] = feats[group.feature] / s.view(1, -1).to(feats[group.feature].dtype)
        summary["scales"][group.prev] = s
    if clip:
        feature_of = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
                      "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
                      "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj",
                      "mlp.down_proj": "mlp.down_proj"}
        for name, scheme in schemes.items():
            if any(tag in name for tag in CLIP_SKIP) or name not in feature_of:
                continue
            x = feats[feature_of[name]]
            max_val = search_clip(modules[name].weight.detach(), x, scheme, quantizer, n_tokens=x.shape[0])
            apply_clip(modules[name], max_val)
            summary["clips"][name] = max_val
    summary["awq_seconds"] = round(time.perf_counter() - t0, 3)
    return summary
