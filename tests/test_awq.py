import copy
import gc
import weakref

import pytest
import torch

from quantkit.errors import CalibrationError, SchemeError
from quantkit.model.config import ModelConfig
from quantkit.model.reference import DecoderLayer, sequence_inputs
from quantkit.quant import awq
from quantkit.quant.rtn import quantize_rtn
from quantkit.quant.scheme import Scheme

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


pytestmark = pytest.mark.usefixtures("single_thread")


def make_layer(kv_heads=2, dtype=torch.float64, seed=0, hidden=128, heads=4, inter=256):
    cfg = ModelConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=100)
    g = torch.Generator().manual_seed(seed)
    layer = DecoderLayer(cfg).to(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.rand(p.shape, generator=g, dtype=dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * p.shape[1] ** -0.5)
    T = 32
    inputs = sequence_inputs(cfg, T, dtype=dtype)  # positions, rope, mask
    # activations with outlier channels, as real residual streams have
    scale = torch.ones(hidden, dtype=dtype)
    scale[torch.randperm(hidden, generator=g)[:4]] = 20
    acts = torch.randn(6, T, hidden, generator=g, dtype=dtype) * scale
    return layer, acts, inputs


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_folded_layer_computes_the_same_function(kv_heads, dtype, tol):
    layer, acts, inputs = make_layer(kv_heads=kv_heads, dtype=dtype)
    original = copy.deepcopy(layer)
    schemes = {n: Scheme(bits=4, group_size=32, symmetric=False) for n in LINEARS}
    with torch.no_grad():
        ref = original(acts, *inputs)
    summary = awq.awq_layer(layer, acts, schemes, inputs=inputs, batch_size=4, clip=False, n_grid=5)
    # grouped-query attention skips v->o (AutoAWQ rule); multi-head attention folds it
    assert ("self_attn.v_proj" in summary["scales"]) == (kv_heads == 4)
    assert set(summary["scales"]) >= {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert not torch.equal(layer.input_layernorm.weight, original.input_layernorm.weight)
    with torch.no_grad():
        out = layer(acts, *inputs)
    assert rel_err(out, ref) <= tol


def test_scale_search_and_clip_reduce_quantization_error():
    layer, acts, inputs = make_layer(dtype=torch.float32, seed=1)
    schemes = {n: Scheme(bits=4, group_size=32, symmetric=False) for n in LINEARS}
    with torch.no_grad():
        ref = layer(acts, *inputs)

    def quantized_output(lyr):
        q = copy.deepcopy(lyr)
        mods = dict(q.named_modules())
        for n in LINEARS:
            mods[n].weight.data = quantize_rtn(mods[n].weight.data, schemes[n]).dequantize()
        with torch.no_grad():
            return q(acts, *inputs)

    err_rtn = rel_err(quantized_output(layer), ref)
    summary = awq.awq_layer(layer, acts, schemes, inputs=inputs)
    err_awq = rel_err(quantized_output(layer), ref)
    assert err_awq < err_rtn
    # the search includes ratio 0 (s = 1/w_mean normalised), so the chosen loss is never worse than it
    for key in ("input_layernorm", "post_attention_layernorm", "up_proj"):
        assert summary[f"loss_{key}"] <= summary[f"loss0_{key}"]
    # q/k are never clipped; the others are, with clamp values in (0.5, 1] x original max
    assert set(summary["clips"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                     "mlp.down_proj"}
    w = layer.mlp.down_proj.weight
    assert summary["clips"]["mlp.down_proj"].shape == (w.shape[0], w.shape[1] // 32)
    assert torch.all(w.abs().reshape(w.shape[0], -1, 32).amax(-1) <= summary["clips"]["mlp.down_proj"] + 1e-6)


def test_w_mean_and_scale_formula_match_autoawq_definition():
    """Ratio 0.5 scale: (x_mean^0.5 / (w_mean^0.5 + 1e-4)), normalised by sqrt(max*min)."""
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    wg = w.reshape(-1, 32).abs()
    w_mean = (wg / (wg.amax(1, keepdim=True) + 1e-6)).reshape(8, 64).mean(0)
    # direct loop computation of the same quantity
    direct = torch.zeros(64)
    for c in range(64):
        g = c // 32
        direct[c] = sum(abs(float(w[r, c])) / (float(w[r, g * 32:(g + 1) * 32].abs().max()) + 1e-6)
                        for r in range(8)) / 8
    assert torch.allclose(w_mean, direct, atol=1e-6)


def test_autoawq_quantizer_and_bad_input():
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0] * 8])
    out = awq.fake_quant_autoawq(w, Scheme(bits=4, group_size=32, symmetric=False))
    # AutoAWQ's min/max range is not forced to include 0 (scale = 2.5/15), and its zero point is clamped to
    # [0, 15]: for this all-positive group zero = clamp(-round(0.5/scale), 0, 15) = 0, so 3.0 saturates at 2.5
    assert torch.allclose(out[0, :4], torch.tensor([0.5, 1.0, 2.0, 2.5]), atol=1e-6)
    sym = awq.fake_quant_autoawq(torch.tensor([[-3.5, 1.0] * 16]), Scheme(bits=4, group_size=32, symmetric=True))
    assert torch.allclose(sym[0, :2], torch.tensor([-3.5, 1.0]), atol=1e-6)  # levels -8..7 times 3.5/7
    layer, acts, inputs = make_layer(dtype=torch.float32)
    with pytest.raises(SchemeError, match="search quantizer"):
        awq.awq_layer(layer, acts, {}, inputs=inputs, search_quantizer="nope")
    with pytest.raises(CalibrationError, match="calibration activations"):
        awq.awq_layer(layer, acts[:0], {"mlp.down_proj": Scheme()}, inputs=inputs)


# ---- the speed-ups keep the arithmetic: each shortcut gives bit-identical values to the plain computation ----

def _fake_quant_plain(w, scheme):
    """fake_quant_scheme as first written (one temporary per step)."""
    from quantkit.quant.rtn import group_params
    out_f, in_f = w.shape
    gs = scheme.effective_group_size(in_f)
    x = w.float().reshape(-1, gs)
    scale, zero = group_params(x, scheme.bits, scheme.symmetric)
    scale = scale.to(getattr(torch, scheme.scale_dtype)).float()
    scale = torch.where(scale > 0, scale, torch.finfo(torch.float16).tiny)
    q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, scheme.maxq)
    return ((q - zero[:, None]) * scale[:, None]).reshape(out_f, in_f).to(w.dtype)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quant_scheme_is_bitwise_the_plain_formula(symmetric, scale_dtype, dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(48, 96, generator=g) * torch.rand(48, 1, generator=g) * 3).to(dtype)
    w[0] = 0  # empty groups
    w[1, :32] = torch.rand(32, generator=g)  # all positive group
    w[2] = -w[2].abs() * 1e-6  # tiny, all negative
    for bits in (2, 3, 4, 8):
        scheme = Scheme(bits=bits, group_size=32, symmetric=symmetric, scale_dtype=scale_dtype)
        a, b = awq.fake_quant_scheme(w, scheme), _fake_quant_plain(w, scheme)
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a.view(-1).abs(), b.view(-1).abs()) and torch.equal(torch.signbit(a), torch.signbit(b))
    w32 = w.float()
    awq.fake_quant_scheme(w32, Scheme(bits=4, group_size=32, symmetric=symmetric))
    assert torch.equal(w32, w.float())  # the input is never written to


@pytest.mark.parametrize("quantizer", ["scheme", "autoawq"])
def test_stacked_rows_quantize_as_each_matrix_alone(quantizer):
    fq = awq.QUANTIZERS[quantizer]
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(r, 64, generator=g) * (i + 1) for i, r in enumerate((32, 8, 16))]
    scheme = Scheme(bits=4, group_size=32, symmetric=False)
    stacked = fq(torch.cat(ws), scheme)
    assert torch.equal(stacked, torch.cat([fq(w, scheme) for w in ws]))


def _captured(layer, acts, inputs, bs):
    return awq._capture_inputs(layer, acts, inputs, bs, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_references_from_captured_inputs_and_batched_loss_are_exact(dtype):
    layer, acts, inputs = make_layer(dtype=dtype, seed=5)
    bs = 4
    feats = _captured(layer, acts, inputs, bs)
    pairs = {"self_attn": ("self_attn.q_proj", "self_attn.o_proj"), "mlp": ("mlp.gate_proj", "mlp.down_proj"),
             "mlp.down_proj": ("mlp.down_proj", "mlp.down_proj")}
    for inspect, (feature, last) in pairs.items():
        direct = awq._run_module(inspect, layer, feats[feature], inputs, bs, "cpu")
        assert torch.equal(direct, awq._run_module(last, layer, feats[last], inputs, bs, "cpu"))
        # the loss written batch by batch equals the loss of the concatenated outputs
        with torch.no_grad():
            layer.mlp.down_proj.weight.mul_(1.01)
            layer.self_attn.q_proj.weight.mul_(0.99)
        out = awq._run_module(inspect, layer, feats[feature], inputs, bs, "cpu")
        ref32 = direct.float()
        loss = awq._module_loss(inspect, layer, feats[feature], inputs, bs, "cpu", ref32, torch.empty_like(ref32))
        assert loss == awq._mse(direct, out) and loss > 0


def test_search_scale_and_clip_shortcuts_give_the_same_results():
    layer, acts, inputs = make_layer(dtype=torch.float32, seed=6)
    schemes = {n: Scheme(bits=4, group_size=32, symmetric=True) for n in LINEARS}
    feats = _captured(layer, acts, inputs, 4)
    group = awq.scaling_groups(layer)[0]
    ref = awq._run_module("self_attn.o_proj", layer, feats["self_attn.o_proj"], inputs, 4, "cpu")
    a = awq.search_scale(layer, group, feats[group.feature], schemes, inputs, 4, "cpu", awq.fake_quant_scheme,
                         n_grid=6)
    b = awq.search_scale(layer, group, feats[group.feature], schemes, inputs, 4, "cpu", awq.fake_quant_scheme,
                         n_grid=6, reference=ref)
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    # clipping on pre-sampled tokens (what awq_layer passes) == clipping that samples the full inputs itself
    x = feats["mlp.down_proj"]
    w = layer.mlp.down_proj.weight.detach()
    full = awq.search_clip(w, x, schemes["mlp.down_proj"], awq.fake_quant_scheme, n_tokens=50)
    xs = awq._clip_tokens(x, 50)
    assert torch.equal(full, awq.search_clip(w, xs, schemes["mlp.down_proj"], awq.fake_quant_scheme,
                                             n_tokens=xs.shape[0]))


def _per_ratio_loss_function(group, layer, x, inputs, batch_size, device, reference):
    """The search's loss before the shortcuts: the inspected module run batch by batch for every candidate (against
    the unquantized output, which the search does not compute where it takes the Gram form)."""
    if reference is None:
        reference = awq._run_module(group.inspect, layer, x, inputs, batch_size, device).float()
    buf = torch.empty_like(reference)
    return lambda: awq._module_loss(group.inspect, layer, x, inputs, batch_size, device, reference, buf)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_losses_choose_the_scales_of_the_per_ratio_search(kv_heads, dtype, monkeypatch):
    """The module losses are the per-ratio search's; the Gram form (groups whose inspected module is their only
    linear: down_proj, o_proj) equals the MSE of the outputs up to rounding and picks the same scale."""
    layer, acts, inputs = make_layer(kv_heads=kv_heads, dtype=dtype, seed=8)
    schemes = {n: Scheme(bits=4, group_size=32, symmetric=False) for n in LINEARS}
    feats = _captured(layer, acts, inputs, 4)
    groups = awq.scaling_groups(layer)
    assert len(groups) == (4 if kv_heads == 4 else 3)
    # the Gram form pays off with more tokens than these (2 × in_features <= tokens); force it here
    assert not awq._gram_pays(layer.mlp.down_proj, feats["mlp.down_proj"], "cpu")
    assert awq._gram_pays(layer.mlp.down_proj, feats["mlp.down_proj"].repeat(3, 1, 1), "cpu")
    monkeypatch.setattr(awq, "_gram_pays", lambda *a: True)
    grams = []
    gram_loss = awq._gram_loss
    monkeypatch.setattr(awq, "_gram_loss", lambda *a: grams.append(a) or gram_loss(*a))
    for group in groups:
        args = (layer, group, feats[group.feature], schemes, inputs, 4, "cpu", awq.fake_quant_scheme)
        fast = awq.search_scale(*args, n_grid=8)
        with monkeypatch.context() as m:
            m.setattr(awq, "_loss_function", _per_ratio_loss_function)
            slow = awq.search_scale(*args, n_grid=8)
        assert torch.equal(fast[0], slow[0]) and fast[1] == slow[1]
        if group.linears == (group.inspect,):
            # (the per-ratio loss compares outputs rounded to fp32, also for fp64 layers)
            assert fast[2] == pytest.approx(slow[2], rel=1e-6) and fast[3] == pytest.approx(slow[3], rel=1e-6)
        else:
            assert fast[2:] == slow[2:]
    assert len(grams) == (2 if kv_heads == 4 else 1)  # down_proj, and o_proj without grouped-query attention


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_search_in_bf16_runs_a_copy_and_keeps_the_layer_in_its_dtype(kv_heads):
    """search_dtype=bf16: the module outputs of the scale search run in a bf16 copy (reference and candidates alike);
    the layer, its folded scales and the clipping stay fp32. Same as the fp32 search where the fp32 losses are not
    near a tie (the ratio chosen differs by at most one grid step), and the layer's own dtype means no copy at all
    (bit-identical)."""
    layer, acts, inputs = make_layer(kv_heads=kv_heads, dtype=torch.float32, seed=3)
    schemes = {n: Scheme(bits=4, group_size=32, symmetric=False) for n in LINEARS}
    fp32, same, bf16 = copy.deepcopy(layer), copy.deepcopy(layer), copy.deepcopy(layer)
    a = awq.awq_layer(fp32, acts, schemes, inputs=inputs, n_grid=10)
    awq.awq_layer(same, acts, schemes, inputs=inputs, n_grid=10, search_dtype=torch.float32)
    for (n, p), (_, q) in zip(fp32.named_parameters(), same.named_parameters()):
        assert torch.equal(p, q), n
    c = awq.awq_layer(bf16, acts, schemes, inputs=inputs, n_grid=10, search_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    ratios = [k for k in a if k.startswith("ratio_")]
    assert len(ratios) == (4 if kv_heads == 4 else 3)
    for key in ratios:
        assert abs(a[key] - c[key]) <= 0.1 + 1e-9, key


@pytest.mark.parametrize("search_dtype", [None, torch.bfloat16], ids=["layer-dtype", "bf16"])
def test_each_captured_input_is_freed_after_its_last_reader(search_dtype, monkeypatch):
    """The whole captured inputs (at 7B, 6.5 GiB in fp32) are held only until the last scale search that reads them,
    as its input or as the input of its reference output; a search in bf16 holds its own input only in bf16."""
    layer, acts, inputs = make_layer(kv_heads=2, dtype=torch.float32, seed=3)  # GQA: no v -> o group
    schemes = {n: Scheme(bits=4, group_size=32, symmetric=False) for n in LINEARS}
    captured: dict = {}
    capture, search = awq._capture_inputs, awq.search_scale

    def recording_capture(*args):
        feats = capture(*args)
        captured.update({n: weakref.ref(t) for n, t in feats.items()})
        return feats

    seen = []

    def recording_search(layer, group, x, *args, **kwargs):
        gc.collect()
        seen.append((group.feature, x.dtype, {n.split(".")[-1] for n, r in captured.items() if r() is not None}))
        return search(layer, group, x, *args, **kwargs)

    monkeypatch.setattr(awq, "_capture_inputs", recording_capture)
    monkeypatch.setattr(awq, "search_scale", recording_search)
    awq.awq_layer(layer, acts, schemes, inputs=inputs, n_grid=4, search_dtype=search_dtype)
    x_dtype = search_dtype or torch.float32
    # o_proj's input is read only for the attention group's reference output
    expected = [("self_attn.q_proj", {"q_proj", "o_proj", "gate_proj", "down_proj"}),
                ("mlp.gate_proj", {"gate_proj", "down_proj"}), ("mlp.down_proj", {"down_proj"})]
    if search_dtype is not None:  # the searched input itself is held in bf16 only
        expected = [(f, alive - {f.split(".")[-1]}) for f, alive in expected]
    assert seen == [(f, x_dtype, alive) for f, alive in expected]


def test_ranking_on_a_subset_scores_the_finalists_on_every_sample():
    """rank_every=2: candidates ranked on every 2nd of 36 samples, the best 3 and ratio 0 scored on all samples. The
    chosen loss is a full-sample loss no better than the full search's best (it is one of the same candidates), and
    close to it; ratio 0's reported loss is the full-sample one."""
    layer, acts, inputs = make_layer(dtype=torch.float32, seed=5)
    acts = acts.repeat(6, 1, 1) + 0.1 * torch.randn(36, *acts.shape[1:], generator=torch.Generator().manual_seed(1))
    schemes = {n: Scheme(bits=4, group_size=32, symmetric=False) for n in LINEARS}
    feats = _captured(layer, acts, inputs, 4)
    group = awq.scaling_groups(layer)[0]  # q, k, v: the loss is the attention's output
    args = (layer, group, feats[group.feature], schemes, inputs, 4, "cpu", awq.fake_quant_scheme)
    full = awq.search_scale(*args, n_grid=10)
    seen = []
    real = awq._loss_function

    def spy(group, lyr, x, *rest):
        seen.append(x.shape[0])
        return real(group, lyr, x, *rest)

    awq._loss_function = spy
    try:
        ranked = awq.search_scale(*args, n_grid=10, rank_every=2)
    finally:
        awq._loss_function = real
    assert seen == [36, 18]  # the full-sample loss and the subset's (>= 16 samples: ranking applies)
    assert ranked[3] == full[3]  # ratio 0 on all samples
    assert full[2] <= ranked[2] <= 1.02 * full[2]
