import importlib.util
import os
import warnings

import pytest
import torch

import quantkit.quant.gptq as gptq_mod
from quantkit.errors import CalibrationError, CheckpointError, QuantkitError, SchemeError
from quantkit.quant.gptq import GPTQ, HessianError, proxy_loss
from quantkit.quant.rtn import quantize_rtn
from quantkit.quant.scheme import Scheme
from quantkit.tensors import QuantTensor


pytestmark = pytest.mark.usefixtures("single_thread")


def make_problem(out_f=96, in_f=256, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    # correlated inputs with uneven channel scales, as in real layers
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    x = (torch.randn(tokens, in_f, generator=g) @ mix) * (torch.rand(in_f, generator=g) * 4 + 0.1)
    return w, x


SCHEMES = [
    Scheme(bits=4, group_size=128, symmetric=True),
    Scheme(bits=4, group_size=128, symmetric=False),
    Scheme(bits=4, group_size=32, symmetric=True),
    Scheme(bits=4, group_size=32, symmetric=False),
    Scheme(bits=4, group_size=128, symmetric=True, act_order=True),
    Scheme(bits=4, group_size=32, symmetric=False, act_order=True),
    Scheme(bits=3, group_size=-1, symmetric=False),
    Scheme(bits=8, group_size=-1, symmetric=True),
]


CASES = [(s, False) for s in SCHEMES] + [(s, True) for s in SCHEMES if s.act_order]


@pytest.mark.parametrize("scheme,static_groups", CASES,
                         ids=lambda v: v.describe().replace(" ", "-") if isinstance(v, Scheme) else f"static={v}")
def test_gptq_lowers_proxy_loss_vs_rtn(scheme, static_groups):
    w, x = make_problem()
    g = GPTQ(w.shape[1])
    g.add_batch(x[:500])
    g.add_batch(x[500:])
    H = g.hessian()
    qt, info = g.quantize(w, scheme, static_groups=static_groups)
    assert isinstance(qt, QuantTensor)
    qt.validate("w")
    rtn = quantize_rtn(w, scheme)
    loss_gptq = proxy_loss(w, qt.dequantize(), H)
    loss_rtn = proxy_loss(w, rtn.dequantize(), H)
    assert loss_gptq < 0.9 * loss_rtn, (loss_gptq, loss_rtn)
    assert info.damp == 0.01 and info.damp_retries == 0 and not info.fp64
    # the reported loss is tr(ΔW H_damped ΔWᵀ) exactly (OBS identity)
    H_damped = H + 0.01 * H.diagonal().mean() * torch.eye(H.shape[0])
    assert info.loss == pytest.approx(proxy_loss(w, qt.dequantize(), H_damped), rel=1e-3)
    # act-order without static groups stores a non-trivial g_idx; static groups keep it trivial
    assert qt.has_act_order == (scheme.act_order and not static_groups and scheme.group_size != -1)


def test_hessian_running_average_and_block_triangle(monkeypatch):
    monkeypatch.setattr(gptq_mod, "_SYM_BLOCK", 64)  # 256 inputs -> 4x4 blocks, lower triangle only
    _, x = make_problem(tokens=300)
    g = GPTQ(256)
    for chunk in x.split(70):
        g.add_batch(chunk.reshape(1, -1, 256))
    expected = 2.0 / 300 * (x.double().t() @ x.double())
    assert torch.allclose(g.hessian().double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(g.hessian(), g.hessian().t())
    g.add_batch(x[:30])  # more data after finalizing
    expected = 2.0 / 330 * (x.double().t() @ x.double() + x[:30].double().t() @ x[:30].double())
    assert torch.allclose(g.hessian().double(), expected, rtol=1e-4, atol=1e-4)


def test_non_positive_definite_hessian_recovers_with_warning():
    w, _ = make_problem(in_f=128)
    torch.manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(128, 128))
    eig = torch.ones(128)
    eig[0] = -0.05  # mean diagonal ≈ 1: damp 0.01 fails, 0.1 succeeds
    H = (q * eig) @ q.t()
    g = GPTQ(128)
    g.set_hessian(H)
    with pytest.warns(UserWarning, match="not positive definite"):
        qt, info = g.quantize(w, Scheme(bits=4, group_size=32))
    assert info.damp == pytest.approx(0.1) and info.damp_retries == 1
    assert torch.isfinite(qt.dequantize()).all()


def test_hopeless_hessian_raises():
    w, _ = make_problem(in_f=64)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(4)))
    eig = torch.ones(64)
    eig[0] = -20.0  # mean diagonal ≈ 0.67 > 0, but no damping up to 1× mean fixes it
    g = GPTQ(64)
    g.set_hessian((q * eig) @ q.t())
    with pytest.raises(HessianError, match="mlp.down_proj.*positive definite"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.quantize(w, Scheme(bits=4, group_size=32), name="model.layers.0.mlp.down_proj.weight")
    g = GPTQ(64, name="layers.1.q_proj")
    x = torch.randn(10, 64)
    x[3, 5] = float("inf")
    g.add_batch(x)
    with pytest.raises(HessianError, match="layers.1.q_proj.*NaN or Inf"):
        g.hessian()


def test_dead_columns_and_missing_data():
    w, x = make_problem(in_f=128)
    x[:, 10] = 0
    g = GPTQ(128)
    g.add_batch(x)
    qt, info = g.quantize(w, Scheme(bits=4, group_size=32, symmetric=False))
    assert info.dead_columns == 1
    assert torch.all(qt.dequantize()[:, 10] == 0)
    with pytest.raises(CalibrationError, match="no calibration tokens"):
        GPTQ(128).quantize(w, Scheme())
    with pytest.raises(CalibrationError, match="features"):
        GPTQ(128).add_batch(torch.randn(4, 64))


def test_bad_weights_name_the_tensor():
    w, x = make_problem(in_f=128)
    g = GPTQ(128)
    g.add_batch(x)
    w[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.o_proj.weight: weight contains NaN"):
        g.quantize(w, Scheme(group_size=32), name="model.layers.2.self_attn.o_proj.weight")
    with pytest.raises(SchemeError, match="does not divide"):
        g.quantize(torch.zeros(8, 128), Scheme(group_size=48), name="x")
    with pytest.raises(QuantkitError, match="weight shape"):
        g.quantize(torch.zeros(8, 64), Scheme(group_size=32))


class NonUniformGrid:
    """A toy non-affine grid (fixed codebook × per-group absmax scale): GPTQ must work through the protocol."""

    levels = torch.tensor([-1.0, -0.6, -0.3, -0.1, 0.0, 0.1, 0.3, 0.6, 1.0])

    def __init__(self, group_size=32):
        self.group_size = group_size

    def fit(self, w_group, importance=None):
        return w_group.abs().amax(dim=1).clamp_min(1e-8)

    def fake_quant(self, w_cols, params, offset=0):
        x = w_cols / params[:, None]
        idx = (x[..., None] - self.levels).abs().argmin(dim=-1)
        return self.levels[idx] * params[:, None]

    def encode(self, weight_hat, params_list, g_idx=None):
        return weight_hat  # the toy grid "encodes" to the rounded matrix itself


def test_gptq_through_a_custom_grid():
    w, x = make_problem(in_f=128)
    g = GPTQ(128)
    g.add_batch(x)
    grid = NonUniformGrid()
    w_hat, info = g.quantize(w, grid)
    rtn = torch.cat([grid.fake_quant(w[:, c:c + 32], grid.fit(w[:, c:c + 32])) for c in range(0, 128, 32)], dim=1)
    H = g.hessian()
    assert proxy_loss(w, w_hat, H) < 0.9 * proxy_loss(w, rtn, H)
    # every (row, group) uses at most the 9 codebook levels
    for c in range(0, 128, 32):
        assert max(len(torch.unique(row)) for row in w_hat[:, c:c + 32]) <= 9


def test_shared_hessian_reuses_factor():
    w, x = make_problem(in_f=128)
    g = GPTQ(128)
    g.add_batch(x)
    a, _ = g.quantize(w, Scheme(group_size=32))
    b, _ = g.quantize(w, Scheme(group_size=32))
    assert torch.equal(a.codes, b.codes) and len(g._factor_cache) == 1


def test_group_aware_factor_is_cached_per_group_size():
    """One Hessian solved for two targets with different group sizes (a GPTQ output and its GGUF companion): each
    group size has its own processing order, hence its own inverse factor."""
    w, x = make_problem(in_f=256)
    shared = GPTQ(256)
    shared.add_batch(x)
    for gs in (32, 128, 32):
        scheme = Scheme(group_size=gs)
        fresh = GPTQ(256)
        fresh.add_batch(x)
        a, _ = shared.quantize(w, scheme, group_aware=True)
        b, _ = fresh.quantize(w, scheme, group_aware=True)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), gs


def _gptqmodel_quantize(w, x, scheme, static_groups, group_aware=False):
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from torch import nn
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ as RefGPTQ

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    cfg = QuantizeConfig(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.symmetric,
                         desc_act=scheme.act_order, act_group_aware=group_aware, damp_percent=0.01,
                         static_groups=static_groups, fallback=None)
    ref = RefGPTQ(lin, cfg)
    ref.quantizer.configure(perchannel=True)
    ref.add_batch(x, None)
    q, scale, zero, g_idx, *_ = ref.quantize(blocksize=128)
    return q.float(), g_idx


@pytest.mark.compat
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
@pytest.mark.parametrize("scheme,static_groups,group_aware,max_mismatch", [
    (Scheme(bits=4, group_size=128, symmetric=True, scale_dtype="float32"), False, False, 0.0),
    (Scheme(bits=4, group_size=128, symmetric=False, scale_dtype="float32"), False, False, 0.0),
    (Scheme(bits=4, group_size=128, symmetric=True, act_order=True, scale_dtype="float32"), False, False, 0.0),
    (Scheme(bits=4, group_size=128, symmetric=True, act_order=True, scale_dtype="float32"), True, False, 0.0),
    (Scheme(bits=8, group_size=-1, symmetric=True, scale_dtype="float32"), False, False, 0.0),
    # group-aware order (GPTQModel's act_group_aware): groups and their columns by importance, g_idx trivial
    (Scheme(bits=4, group_size=128, symmetric=True, scale_dtype="float32"), False, True, 0.0),
    (Scheme(bits=4, group_size=128, symmetric=False, scale_dtype="float32"), False, True, 0.0),
    # g32 inside 128-column blocks: fp32 summation order may flip a rare tie, which then propagates
    (Scheme(bits=4, group_size=32, symmetric=True, scale_dtype="float32"), False, False, 0.01),
    (Scheme(bits=4, group_size=32, symmetric=True, scale_dtype="float32"), False, True, 0.01),
])
def test_matches_gptqmodel(scheme, static_groups, group_aware, max_mismatch):
    """Same matrix, same inputs, same settings as GPTQModel 7.6's GPTQ: same quantized weights."""
    w, x = make_problem(out_f=64, in_f=512, tokens=2048, seed=7)
    ref_q, ref_gidx = _gptqmodel_quantize(w, x, scheme, static_groups, group_aware)
    g = GPTQ(512)
    g.add_batch(x)
    qt, _ = g.quantize(w, scheme, static_groups=static_groups, group_aware=group_aware)
    ours = qt.dequantize()
    mismatch = ((ours - ref_q).abs() > 1e-6).float().mean().item()
    assert mismatch <= max_mismatch
    assert torch.equal(qt.group_index().int(), ref_gidx.int())
    H = g.hessian()
    assert proxy_loss(w, ours, H) == pytest.approx(proxy_loss(w, ref_q, H), rel=1e-3)


def test_bf16_inputs_give_the_fp32_hessian_to_bf16_rounding():
    """A bf16 calibration forward hands GPTQ bf16 inputs: each batch's XᵀX runs as one bf16 matmul (exact products,
    fp32 sums inside the kernel) rounded once to bf16 before the fp32 sum. Against the plain fp64 reference of the
    same values, on the blocked (>= 2048 inputs) and the small path: within bf16 rounding."""
    gen = torch.Generator().manual_seed(0)
    for d in (2304, 96):
        scales = torch.empty(d).log_normal_(0.0, 1.0, generator=gen)
        x = (torch.randn(6, 256, d, generator=gen) * scales).bfloat16()
        g = GPTQ(d)
        for batch in x:
            g.add_batch(batch)
        flat = x.reshape(-1, d).double()
        ref = 2.0 / flat.shape[0] * flat.t() @ flat
        h = g.hessian().double()
        assert float((h - ref).norm() / ref.norm()) < 2**-9
        assert float(((h.diagonal() - ref.diagonal()).abs() / ref.diagonal()).max()) < 2**-8


def _peak_extra_bytes(fn) -> int:
    """Bytes by which this process's peak resident set grew above its resident set while `fn` ran (Linux)."""
    import re

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current resident set
    base = status("VmRSS")
    fn()
    return status("VmHWM") - base


def _out_of_place_factor(H, damp_abs, perm):
    """The inverse factor by out-of-place operations: gather, Cholesky, triangular inverse, flip."""
    M = H if perm is None else H[perm][:, perm]
    M = torch.flip(M, (0, 1)).clone()
    M.diagonal().add_(damp_abs)
    L = torch.linalg.cholesky(M)
    Linv = gptq_mod._lower_triangular_inverse(L.clone())
    return torch.flip(Linv, (0, 1))


@pytest.mark.parametrize("ordered", [False, True], ids=["natural", "permuted"])
def test_inverse_factor_in_one_buffer_equals_the_out_of_place_one(ordered):
    """The factor is computed in one n×n buffer beside H (Cholesky, triangular inverse and the reversal in place):
    every value and the layout are those of the out-of-place operations."""
    _, x = make_problem(in_f=300, tokens=2000, seed=3)
    g = GPTQ(300)
    g.add_batch(x)
    H = g.hessian()
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1)) if ordered else None
    U = gptq_mod._upper_inverse_factor(H, 0.01, torch.float32, perm)
    ref = _out_of_place_factor(H, 0.01, perm)
    assert torch.equal(U, ref) and U.stride() == ref.stride()
    assert torch.equal(U.triu(), U)


@pytest.mark.parametrize("shape,layout", [((5, 7), "rows"), ((6, 6), "columns"), ((1, 9), "rows"), ((4, 5), "other")])
def test_flip_both_axes_in_place_equals_torch_flip(shape, layout):
    x = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
    if layout == "columns":
        x = x.t().contiguous().t()
    elif layout == "other":
        x = torch.arange(60, dtype=torch.float32).reshape(4, 15)[:, ::3]
    expected = torch.flip(x, (0, 1))
    for chunk in (1, 2, 3, 1 << 20):  # chunk boundaries anywhere, odd element counts with a middle element
        y = x.clone() if layout != "other" else x  # (a clone keeps a dense layout)
        assert y.stride() == x.stride()
        out = gptq_mod.flip_both_axes_(y, chunk=chunk)
        assert torch.equal(out, expected)
        if layout != "other":
            assert out.data_ptr() == y.data_ptr()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory is read from Linux's /proc")
def test_inverse_factor_needs_about_one_matrix_beside_the_hessian():
    """At 7B's down_proj (n = 14336) each n×n fp32 matrix is 0.8 GB. The factor used to take H plus 2.8 of them at
    its peak (a gathered copy, Cholesky's output, the flipped copy, and 1.75 of them inside isfinite)."""
    n = 4096  # 64 MiB matrices: each its own mapping, returned to the system when freed
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    H = a @ a.t() / n
    H.diagonal().add_(0.1)
    del a
    perm = torch.randperm(n, generator=g)
    warm = torch.randperm(64, generator=g)
    gptq_mod._upper_inverse_factor(H[:64, :64].clone(), 0.01, torch.float32, warm)  # the libraries loaded
    extra = _peak_extra_bytes(lambda: gptq_mod._upper_inverse_factor(H, 0.01, torch.float32, perm))
    assert extra < 1.6 * n * n * 4, f"{extra / (n * n * 4):.2f} n×n matrices beside H"


@pytest.mark.parametrize("out_f,dead", [(1, False), (5, True), (5, False)])
@pytest.mark.parametrize("group_aware", [False, True])
def test_quantize_never_writes_into_the_callers_weight(out_f, dead, group_aware):
    """The solver reads the fp32 weight it is given without copying it first (a 7B down_proj copy is 0.23 GB): its
    updates go to its own transposed copy, also for one output row (whose transpose is already contiguous)."""
    _, x = make_problem(in_f=128, tokens=512, seed=4)
    if dead:
        x[:, 7] = 0
    g = GPTQ(128)
    g.add_batch(x)
    w = torch.randn(out_f, 128, generator=torch.Generator().manual_seed(5))
    before = w.clone()
    g.quantize(w, Scheme(bits=4, group_size=32, symmetric=True), group_aware=group_aware)
    assert torch.equal(w, before)


def test_last_use_frees_the_hessian_and_changes_nothing():
    """quantize(last=True) frees the Hessian once the factor is computed (at 7B's down_proj, 0.8 GB less while
    the weight is solved): the same result, and any later use is a clear error."""
    w, x = make_problem(seed=6)
    scheme = Scheme(bits=4, group_size=32, symmetric=True)
    kept, freed = GPTQ(256), GPTQ(256)
    for g in (kept, freed):
        g.add_batch(x)
    a, info_a = kept.quantize(w, scheme, group_aware=True)
    b, info_b = freed.quantize(w, scheme, group_aware=True, last=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and info_a.loss == info_b.loss
    assert info_b.n_tokens == info_a.n_tokens == 1024
    assert freed._sum is None and not freed._factor_cache
    with pytest.raises(CalibrationError, match="released"):
        freed.quantize(w, scheme)
