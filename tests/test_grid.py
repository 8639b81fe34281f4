import pytest
import torch

from quantkit.errors import CheckpointError, QuantkitError, SchemeError
from quantkit.quant.grid import Grid, IntGrid
from quantkit import tensors
from quantkit.tensors import check_finite
from quantkit.quant.rtn import quantize_rtn
from quantkit.quant.scheme import Scheme, get_preset


pytestmark = pytest.mark.usefixtures("single_thread")


def direct_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype=torch.float16):
    """Independent element-by-group computation of the GPTQ min-max convention (loops over groups)."""
    maxq = 2**bits - 1
    out_f, in_f = weight.shape
    gs = in_f if group_size == -1 else group_size
    codes = torch.empty(out_f, in_f)
    scales = torch.empty(out_f, in_f // gs)
    zeros = torch.empty(out_f, in_f // gs)
    for g in range(in_f // gs):
        block = weight[:, g * gs:(g + 1) * gs].float()
        for r in range(out_f):
            lo = min(float(block[r].min()), 0.0)
            hi = max(float(block[r].max()), 0.0)
            if symmetric:
                hi = max(abs(lo), hi)
                lo = -hi if lo < 0 else lo
            if lo == 0 and hi == 0:
                lo, hi = -1.0, 1.0
            scale = torch.tensor((hi - lo) / maxq, dtype=torch.float32)
            zero = (float(2 ** (bits - 1)) if symmetric
                    else float(torch.round(-torch.tensor(lo, dtype=torch.float32) / scale)))
            scale = scale.to(scale_dtype).float()
            scales[r, g] = scale
            zeros[r, g] = zero
            codes[r, g * gs:(g + 1) * gs] = torch.clamp(torch.round(block[r] / scale) + zero, 0, maxq)
    return codes, scales, zeros


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, 32, False), (4, 128, True),
                                                        (4, 128, False), (8, -1, True), (3, 64, False)])
def test_rtn_equals_direct_computation(bits, group_size, symmetric):
    torch.manual_seed(bits * 1000 + group_size)
    w = torch.randn(12, 256) * 0.05
    w[3, :40] = 0  # an all-zero group
    w[5] = w[5].abs()  # only positive values (range must still include 0)
    scheme = Scheme(bits=bits, group_size=group_size, symmetric=symmetric)
    codes, scales, zeros = direct_rtn(w, bits, group_size, symmetric)
    for qt in (quantize_rtn(w, scheme), IntGrid(scheme, 256).quantize_rtn(w)):
        assert torch.equal(qt.codes.float(), codes)
        assert torch.equal(qt.scales.float(), scales)
        assert torch.equal(qt.zeros.float(), zeros)
        qt.validate("w")


@pytest.mark.parametrize("preset", ["w4a16-g128", "w4a16-g128-asym", "w8a16", "w4a16-g32"])
def test_dequant_round_trip(preset):
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    grid = IntGrid(get_preset(preset), 256)
    gs = grid.group_size
    params = [grid.fit(w[:, c:c + gs]) for c in range(0, 256, gs)]
    w_hat = torch.cat([grid.fake_quant(w[:, c:c + gs], p, 0) for p, c in zip(params, range(0, 256, gs))], dim=1)
    assert torch.equal(torch.cat([grid.fake_quant(w_hat[:, c:c + gs], p, 0)
                                  for p, c in zip(params, range(0, 256, gs))], dim=1), w_hat)  # idempotent
    qt = grid.encode(w_hat, params)
    assert torch.equal(qt.dequantize(), w_hat)
    assert qt.g_idx is None
    # re-encoding the dequantized tensor gives the same codes
    assert torch.equal(grid.encode(qt.dequantize(), params).codes, qt.codes)


def test_encode_with_permuted_group_index():
    torch.manual_seed(1)
    grid = IntGrid(Scheme(bits=4, group_size=32, symmetric=False, scale_dtype="float32"))
    w = torch.randn(8, 128)
    perm = torch.randperm(128)
    wp = w[:, perm]
    params = [grid.fit(wp[:, c:c + 32]) for c in range(0, 128, 32)]
    wp_hat = torch.cat([grid.fake_quant(wp[:, c:c + 32], p) for p, c in zip(params, range(0, 128, 32))], dim=1)
    inv = torch.argsort(perm)
    g_idx = inv // 32
    qt = grid.encode(wp_hat[:, inv], params, g_idx)
    assert qt.has_act_order
    assert torch.equal(qt.dequantize(), wp_hat[:, inv])


def test_int_grid_is_a_grid_and_per_channel_needs_width():
    assert isinstance(IntGrid(get_preset("w4a16-g128")), Grid)
    assert IntGrid(get_preset("w8a16"), 512).group_size == 512
    with pytest.raises(SchemeError, match="in_features"):
        IntGrid(get_preset("w8a16"))


def test_mse_clip_does_not_increase_error():
    torch.manual_seed(2)
    w = torch.randn(32, 128) ** 3  # heavy tails: clipping helps
    plain = IntGrid(Scheme(bits=4, group_size=128, symmetric=False)).quantize_rtn(w)
    clipped = IntGrid(Scheme(bits=4, group_size=128, symmetric=False, mse_clip=True)).quantize_rtn(w)
    assert clipped.error["sqnr_db"] > plain.error["sqnr_db"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_names_the_tensor(bad):
    w = torch.randn(4, 64)
    w[2, 7] = bad
    message = r"model\.layers\.0\.mlp\.up_proj\.weight: weight contains NaN or Inf \(first at index \[2, 7\]\)"
    with pytest.raises(CheckpointError, match=message):
        check_finite("model.layers.0.mlp.up_proj.weight", w)
    assert issubclass(SchemeError, QuantkitError)


@pytest.mark.parametrize("layout", ["rows", "columns", "strided", "1-d", "0-d", "bf16", "empty"])
def test_all_finite_in_blocks_agrees_with_isfinite(layout, monkeypatch):
    """all_finite tests a tensor in blocks of rows (isfinite's temporaries are 1.75x an fp32 tensor); blocks of 7
    elements here, so every bad position falls at some block's start, middle or end."""
    monkeypatch.setattr(tensors, "FINITE_CHUNK", 7)
    base = {"rows": torch.zeros(5, 9), "columns": torch.zeros(9, 5).t(), "strided": torch.zeros(6, 20)[:, ::3],
            "1-d": torch.zeros(23), "0-d": torch.zeros(()), "bf16": torch.zeros(4, 6, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 4)}[layout]
    assert tensors.all_finite(base) and tensors.first_nonfinite(base) is None
    for flat_index in range(base.numel()):
        for bad in (float("nan"), float("inf")):
            t = base.clone() if layout != "strided" else torch.zeros(6, 20)[:, ::3]
            index = list(torch.unravel_index(torch.tensor(flat_index), t.shape)) if t.dim() else []
            t[tuple(index)] = bad
            assert not tensors.all_finite(t)
            assert tensors.first_nonfinite(t) == (~torch.isfinite(t)).nonzero()[0].tolist()
    assert tensors.all_finite(torch.zeros(3, dtype=torch.int64))
