"""Integer W2/W4/W8 kernels (Triton, run by the interpreter on CPU) against their plain torch references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from quantkit.kernels.pack import dequant_packed, int_matmul_ref, pack_codes, pack_quant_tensor, unpack_codes
from quantkit.tensors import QuantTensor

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def random_quant_tensor(n, k, bits, group_size, symmetric, act_order=False, scattered_gidx=False, gen=None):
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (n, k), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).to(torch.float16)
    if symmetric:
        zeros = torch.full((n, groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, maxq + 1, (n, groups), dtype=torch.int32, generator=gen)
    g_idx = None
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    if scattered_gidx:
        g_idx = torch.randint(0, groups, (k,), dtype=torch.int32, generator=gen)
    return QuantTensor(codes, scales, zeros, bits, gs, symmetric, g_idx)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip_and_dequant_matches_quant_tensor(bits):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    qt = random_quant_tensor(13, 72, bits, 24, symmetric=False, gen=gen)
    p = pack_quant_tensor(qt)
    assert torch.equal(unpack_codes(p.qweight, p.container_bits, 72), qt.codes.t().to(torch.int32))
    assert torch.equal(dequant_packed(p).t(), qt.dequantize())
    codes = torch.randint(0, 16, (40, 3), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, 4), 4, 40), codes.to(torch.int32))


def test_act_order_pack_reorders_rows_and_reference_matches_dense():
    qt = random_quant_tensor(9, 64, 4, 16, symmetric=False, act_order=True)
    p = pack_quant_tensor(qt)
    assert p.perm is not None and p.g_idx is None  # sorted groups are contiguous
    x = torch.randn(3, 64)
    torch.testing.assert_close(int_matmul_ref(x, p), x @ qt.dequantize().t(), rtol=1e-5, atol=1e-5)


CASES = [
    # m, n, k, bits, group, sym, act_order, scattered, dtype
    (1, 67, 256, 4, 128, True, False, False, torch.float16),
    (3, 45, 128, 4, 32, False, False, False, torch.float16),
    (5, 33, 192, 8, 64, True, False, False, torch.float32),
    (8, 40, 128, 4, 64, False, True, False, torch.bfloat16),
    (19, 37, 128, 4, 128, True, False, False, torch.float16),
    (21, 29, 96, 8, 32, False, True, False, torch.float32),
    (17, 50, 64, 4, 32, False, False, True, torch.float16),
    (2, 31, 64, 2, 32, False, False, False, torch.float16),
    (4, 24, 72, 3, -1, False, False, False, torch.float32),
    (3, 29, 64, 4, 32, False, False, True, torch.float16),  # gemv gathering by a scattered g_idx
    (2, 21, 64, 2, 8, False, False, False, torch.float32),  # groups smaller than a packed word
]


@pytest.mark.parametrize("m,n,k,bits,group,sym,act,scattered,dtype", CASES)
def test_int_matmul_equals_reference(m, n, k, bits, group, sym, act, scattered, dtype):
    from quantkit.kernels.int_matmul import int_matmul

    qt = random_quant_tensor(n, k, bits, group, sym, act_order=act, scattered_gidx=scattered)
    p = pack_quant_tensor(qt).to(DEVICE)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)  # poisoned: every element must be written
    got = int_matmul(x, p, out=out)
    ref = int_matmul_ref(x, p)
    assert not torch.isnan(got).any()
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_err(got, ref) <= 1e-2
    if dtype == torch.float32:
        assert rel_err(got, ref) <= 1e-5


def test_split_k_sum_equals_torch_sum():
    from quantkit.kernels.int_matmul import sum_splits

    parts = torch.randn(3, 5, 7, device=DEVICE)
    out = torch.full((5, 7), float("nan"), device=DEVICE, dtype=torch.float16)
    sum_splits(parts, out)
    torch.testing.assert_close(out, parts.sum(0).half(), rtol=1e-3, atol=1e-3)


def test_int_matmul_batched_leading_dims_and_both_kernels():
    """3-D activations, and the gemm (m > 8) and gemv (m <= 8) kernels agree with each other."""
    from quantkit.kernels.int_matmul import int_matmul

    qt = random_quant_tensor(24, 128, 4, 64, symmetric=True)
    p = pack_quant_tensor(qt).to(DEVICE)
    x = torch.randn(2, 9, 128, device=DEVICE, dtype=torch.float32)
    big = int_matmul(x, p)
    small = int_matmul(x[0, :4], p)
    assert big.shape == (2, 9, 24)
    torch.testing.assert_close(big[0, :4], small, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big, int_matmul_ref(x.reshape(-1, 128), p).reshape(2, 9, 24), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,h,dtype", [(1, 256, torch.float32), (5, 200, torch.float16), (3, 96, torch.bfloat16)])
def test_rmsnorm_kernel_equals_reference(rows, h, dtype):
    from quantkit.kernels.norm import rmsnorm, rmsnorm_ref
    from quantkit.model.reference import RMSNorm

    x = torch.randn(rows, h, device=DEVICE).to(dtype)
    w = (torch.rand(h, device=DEVICE) + 0.5).to(dtype)
    out = torch.full((rows, h), float("nan"), device=DEVICE, dtype=dtype)
    got = rmsnorm(x, w, 1e-5, out=out)
    ref = rmsnorm_ref(x, w, 1e-5)
    module = RMSNorm(h, 1e-5).to(DEVICE)
    module.weight.data = w.clone()
    torch.testing.assert_close(ref, module(x))  # the reference is the model's RMSNorm
    assert not torch.isnan(got).any() and rel_err(got, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("b,t,dtype", [(1, 1, torch.float32), (2, 3, torch.float16)])
def test_rope_cache_kernel_equals_reference(b, t, dtype):
    from quantkit.kernels.rope import rope_cache_ref, rope_cos_sin, rope_qkv_into_cache

    nh, nkv, d, max_len = 4, 2, 16, 12
    qkv = torch.randn(b, t, (nh + 2 * nkv) * d, device=DEVICE).to(dtype)
    pos = torch.arange(5, 5 + t, device=DEVICE)
    cos, sin = rope_cos_sin(pos, d, 10000.0, dtype)  # the rows of the positions
    caches = [torch.full((b, nkv, max_len, d), float("nan"), device=DEVICE, dtype=dtype) for _ in range(4)]
    q = rope_qkv_into_cache(qkv, cos, sin, pos, nh, nkv, caches[0], caches[1])
    q_ref = rope_cache_ref(qkv, cos, sin, pos, nh, nkv, caches[2], caches[3])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(q, q_ref) <= tol
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.isnan(), want.isnan())  # exactly the positions 5..5+t written
        assert rel_err(got[:, :, 5:5 + t], want[:, :, 5:5 + t]) <= tol



@pytest.mark.parametrize("b,heads,kv_heads,d,max_len,pos,window,dtype,splits", [
    (1, 8, 2, 32, 40, 0, None, torch.float32, 1),
    (2, 4, 4, 16, 70, 69, None, torch.float32, 1),  # every position, more than one block
    (1, 8, 2, 32, 100, 77, 20, torch.float16, 1),  # sliding window
    (1, 6, 2, 64, 50, 33, None, torch.bfloat16, 1),  # a group of 3 (padded to 4)
    (2, 8, 2, 32, 300, 250, None, torch.float32, 4),  # flash-decoding splits, the last one empty
    (1, 8, 2, 32, 300, 5, None, torch.float32, 8),  # most splits see no position
    (1, 8, 2, 32, 300, 290, 100, torch.float16, 4),  # splits + sliding window: early splits empty
])
def test_decode_attention_kernel_equals_reference(b, heads, kv_heads, d, max_len, pos, window, dtype, splits):
    from quantkit.kernels.attention import decode_attention, decode_attention_ref

    q = torch.randn(b, heads, 1, d, device=DEVICE).to(dtype)
    k = torch.randn(b, kv_heads, max_len, d, device=DEVICE).to(dtype)
    v = torch.randn(b, kv_heads, max_len, d, device=DEVICE).to(dtype)
    k[:, :, pos + 1:] = float("nan")  # positions after pos are never read
    v[:, :, pos + 1:] = float("nan")
    p = torch.tensor([pos], device=DEVICE)
    out = torch.full_like(q, float("nan"))
    got = decode_attention(q, k, v, p, window, out=out, splits=splits)
    ref = decode_attention_ref(q, torch.nan_to_num(k), torch.nan_to_num(v), p, window)
    assert not torch.isnan(got).any()
    assert rel_err(got, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_decode_attention_split_count_is_fixed_per_cache():
    from quantkit.kernels.attention import split_count

    assert split_count(100) == 1 and split_count(256) == 1 and split_count(257) == 2
    assert split_count(4096) == 16 and split_count(32768) == 32


@pytest.mark.parametrize("rows,h,dtype", [(1, 256, torch.float32), (3, 200, torch.bfloat16)])
def test_add_rmsnorm_kernel_equals_reference(rows, h, dtype):
    from quantkit.kernels.norm import add_rmsnorm, add_rmsnorm_ref

    x, delta = (torch.randn(rows, h, device=DEVICE).to(dtype) for _ in range(2))
    w = (torch.rand(h, device=DEVICE) + 0.5).to(dtype)
    got_h, got_y = add_rmsnorm(x, delta, w, 1e-5)
    ref_h, ref_y = add_rmsnorm_ref(x, delta, w, 1e-5)
    # fp32: the residual is exactly h + delta (bf16: one ulp apart at most; the interpreter truncates on casts)
    assert torch.equal(got_h, ref_h) if dtype == torch.float32 else rel_err(got_h, ref_h) <= 1e-2
    assert rel_err(got_y, ref_y) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rows,f,dtype", [(1, 100, torch.float32), (4, 1500, torch.bfloat16)])
def test_silu_mul_kernel_equals_reference(rows, f, dtype):
    from quantkit.kernels.activation import silu_mul, silu_mul_ref

    gu = torch.randn(rows, 2 * f, device=DEVICE).to(dtype) * 3
    got = silu_mul(gu)
    assert got.shape == (rows, f)
    assert rel_err(got, silu_mul_ref(gu)) <= (1e-5 if dtype == torch.float32 else 1e-2)

GEMV_CASES = [c for c in CASES if c[0] <= 8]


def _gemv_configs(m, p):
    """Every batch<=8 kernel family: the fast GEMV (no split / split + sum kernel / split + in-kernel ticket
    reduction, several K-tiles) and the plain GEMV."""
    from quantkit.kernels.int_matmul import _fast_ok

    bm = 1 << max(0, (m - 1).bit_length())
    cfgs = [("gemv", bm, 32, 32, 4, 1), ("gemv", bm, 64, 64, 4, 2)]
    for bk in (128, 64, 32):
        if _fast_ok(p, bk):
            cfgs += [("fast", bm, 32, bk, 4, 3, 1, 0), ("fast", bm, 32, bk, 4, 3, 8, 1),
                     ("fast", bm, 64, bk, 4, 3, 8, 2)]
    return cfgs


@pytest.mark.parametrize("m,n,k,bits,group,sym,act,scattered,dtype", GEMV_CASES)
def test_every_gemv_variant_equals_reference(m, n, k, bits, group, sym, act, scattered, dtype):
    from quantkit.kernels.int_matmul import _split_locks, int_matmul

    qt = random_quant_tensor(n, k, bits, group, sym, act_order=act, scattered_gidx=scattered)
    p = pack_quant_tensor(qt).to(DEVICE)
    cfgs = _gemv_configs(m, p)
    if group in (64, 128) and not scattered:
        assert any(c[0] == "fast" for c in cfgs)  # the fast kernel is really exercised on aligned groups
    for cfg in cfgs:
        for _ in range(2):  # twice: the split-K tickets must re-arm after each call
            x = torch.randn(m, k, device=DEVICE).to(dtype)
            out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
            got = int_matmul(x, p, out=out, config=cfg)
            ref = int_matmul_ref(x, p)
            assert not torch.isnan(got).any(), cfg
            assert rel_err(got, ref) <= (1e-5 if dtype == torch.float32 else 1e-2), cfg
    assert int(_split_locks(torch.device(DEVICE)).abs().sum()) == 0


@pytest.mark.parametrize("m,n,k,group,sym,dtype", [(19, 37, 128, 128, True, torch.float16),
                                                   (17, 50, 64, 32, False, torch.float32),
                                                   (40, 72, 256, 64, True, torch.bfloat16),
                                                   (3, 40, 128, 64, False, torch.float16)])
def test_joined_unpack_w4_gemm_equals_reference(m, n, k, group, sym, dtype):
    """The W4 tensor-core GEMM that loads each packed word once and joins its 8 codes (K order permuted in
    both operands), with and without split-K."""
    from quantkit.kernels.int_matmul import _w4_ok, int_matmul

    qt = random_quant_tensor(n, k, 4, group, sym)
    p = pack_quant_tensor(qt).to(DEVICE)
    for bk in (32, 64):
        assert _w4_ok(p, bk) == (group % bk == 0)
        if not _w4_ok(p, bk):
            continue
        for mul in (0, 1):
            x = torch.randn(m, k, device=DEVICE).to(dtype)
            out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
            got = int_matmul(x, p, out=out, config=("gemm4", 16, 32, bk, 4, 2, mul))
            ref = int_matmul_ref(x, p)
            assert not torch.isnan(got).any()
            assert rel_err(got, ref) <= (1e-5 if dtype == torch.float32 else 1e-2), (bk, mul)



@pytest.mark.parametrize("m,n,k,group,sym,dtype", [(19, 37, 128, 128, True, torch.float16),
                                                   (17, 50, 64, 32, False, torch.float32),
                                                   (40, 72, 256, 64, True, torch.bfloat16),
                                                   (1, 40, 128, 64, False, torch.float16)])
def test_swapped_operand_w4_gemm_equals_reference(m, n, k, group, sym, dtype):
    """The W4 GEMM computing out^T = W x^T (weight tile as the MMA's left operand), ragged M and N tiles,
    with and without split-K."""
    from quantkit.kernels.int_matmul import int_matmul

    qt = random_quant_tensor(n, k, 4, group, sym)
    p = pack_quant_tensor(qt).to(DEVICE)
    for bn, bm in ((32, 16), (16, 32)):
        for mul in (0, 1):
            x = torch.randn(m, k, device=DEVICE).to(dtype)
            out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
            got = int_matmul(x, p, out=out, config=("gemm4t", bn, bm, 32, 4, 2, mul))
            ref = int_matmul_ref(x, p)
            assert not torch.isnan(got).any()
            assert rel_err(got, ref) <= (1e-5 if dtype == torch.float32 else 1e-2), (bn, bm, mul)

def test_tune_pick_skips_candidates_that_disagree_or_fail(monkeypatch):
    """The GPU search (timing stubbed out here) never picks a config whose output is wrong or that fails, keeps
    the timings, and reports why each skipped config was skipped."""
    from quantkit.kernels import tune

    fake_ms = {"wrong-but-fast": 0.1, "ok-slow": 0.9, "ok-fast": 0.5, "broken": 0.01}
    monkeypatch.setattr(tune, "interpreting", lambda: False)
    monkeypatch.setattr(tune, "time_gpu", lambda fn, rep=20: (fn(), fake_ms[last[0]])[1])
    last = [None]

    def run(cfg):
        last[0] = cfg
        if cfg == "broken":
            raise RuntimeError("out of resources")

    key = ("test-pick", object())
    best = tune.pick(key, list(fake_ms), run, check=lambda cfg: cfg != "wrong-but-fast")
    assert best == "ok-fast"
    assert set(tune.timings()[key]) == {"ok-slow", "ok-fast"}
    reasons = " ".join(tune.skipped()[key])
    assert "wrong-but-fast" in reasons and "differs" in reasons and "out of resources" in reasons
    assert tune.pick(key, ["ok-slow"], run) == "ok-fast"  # cached
