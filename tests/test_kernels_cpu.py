"""torch CPU low-bit kernels (int4pack / grouped int8) against the plain dequantize-and-matmul references."""

import numpy as np
import pytest
import torch

from quantkit.kernels import cpu
from quantkit.kernels.ggml_ref import dequantize_rows
from quantkit.kernels.pack import pack_quant_tensor
from quantkit.runtime.qlinear import GGMLLinear, QuantLinear
from test_kernels_ggml import random_blocks  # noqa: E402 (tests/ is on sys.path under pytest)
from test_kernels_int import random_quant_tensor

pytestmark = pytest.mark.skipif(not cpu.available(), reason="this torch has no int4/int8 CPU matmul kernels")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K", "Q5_K"])
def test_ggml_parts_reconstruct_exactly_and_kernel_matches(type_name):
    rng = np.random.default_rng()
    data = torch.from_numpy(random_blocks(type_name, 32, 1 if type_name.endswith("K") else 8, rng))
    kind, codes, scale, zero, gs = cpu.ggml_parts(data, type_name)
    want_w = dequantize_rows(data, type_name)
    s = scale.repeat_interleave(gs, 1)
    if kind == "int4":
        w = (codes.float() - 8) * s + zero.repeat_interleave(gs, 1)
    else:
        w = codes.float() * s + (0 if zero is None else zero.repeat_interleave(gs, 1))
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, want_w.shape[1])
    out = cpu.build(kind, codes, scale, zero, gs)(x)
    assert out.dtype == torch.float32 and rel(out, x @ want_w.t()) <= 1e-2


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 128, False), (8, 64, False), (8, -1, True)])
def test_quant_linear_cpu_kernels_match_exact_path(bits, group, sym):
    qt = random_quant_tensor(48, 256, bits, group, sym)
    exact = QuantLinear(pack_quant_tensor(qt))
    fast = QuantLinear(pack_quant_tensor(qt), cpu_kernels=True)
    x = torch.randn(2, 5, 256)
    got = fast(x)
    assert fast._fast is not None and fast._fast is not False
    assert rel(got, exact(x)) <= 1e-2


def test_ggml_linear_cpu_kernels_and_unsupported_type_falls_back():
    rng = np.random.default_rng()
    for type_name, fast_expected in (("Q4_K", True), ("Q3_K", False)):
        data = torch.from_numpy(random_blocks(type_name, 16, 2, rng))
        lin = GGMLLinear(type_name, data, (16, 512), cpu_kernels=True)
        x = torch.randn(4, 512)
        assert rel(lin(x), x @ dequantize_rows(data, type_name).t()) <= 1e-2
        assert bool(lin._fast) == fast_expected
