"""A zero damping on a singular Hessian must still recover (it used to loop forever: 0 × 10 = 0)."""

import warnings

import torch

from quantkit.quant.gptq import GPTQ
from quantkit.quant.grid import IntGrid
from quantkit.quant.scheme import get_preset


def test_zero_damp_on_singular_hessian_recovers_with_a_warning():
    torch.manual_seed(0)
    gptq = GPTQ(64)
    gptq.add_batch(torch.randn(100, 8) @ torch.randn(8, 64))  # rank 8: singular Hessian
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tensor, info = gptq.quantize(torch.randn(32, 64), IntGrid(get_preset("w4a16-g32")), damp=0.0)
    assert any("not positive definite" in str(w.message) for w in caught)
    assert torch.isfinite(tensor.dequantize()).all()
