"""GGML grids (the Grid protocol for ggml block types): exactness of fake_quant/encode, agreement with the
encoders, GPTQ through them, and the Q/K row permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from quantkit.errors import SchemeError
from quantkit.gguf.grids import GRID_TYPES, GGMLGrid
from quantkit.ggml_types import type_size
from quantkit.gguf.quants import quantize_ggml
from quantkit.model.arch import hf_to_interleaved
from quantkit.quant.grid import Grid
from tests.test_gguf_quants import edge_weights


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def fit_all(grid, w, importance=None):
    gs = grid.group_size
    return [grid.fit(w[:, c:c + gs], None if importance is None else importance[c:c + gs])
            for c in range(0, w.shape[1], gs)]


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("type_name", GRID_TYPES)
def test_fake_quant_is_exact_grid_and_encode_reproduces_it(type_name, with_importance):
    grid = GGMLGrid(type_name)
    assert isinstance(grid, Grid)
    w = torch.from_numpy(edge_weights(24, 512, seed=7))
    w[12] = w[12].abs() + 0.3  # large mins relative to the steps
    imp = torch.rand(512, generator=torch.Generator().manual_seed(0)) ** 4 if with_importance else None
    params = fit_all(grid, w, imp)
    gs = grid.group_size
    by_column = torch.cat([grid.fake_quant(w[:, c:c + 1], params[c // gs], c % gs) for c in range(512)], dim=1)
    by_block = torch.cat([grid.fake_quant(w[:, c:c + gs], params[c // gs]) for c in range(0, 512, gs)], dim=1)
    assert torch.equal(bits(by_column), bits(by_block))
    again = torch.cat([grid.fake_quant(by_block[:, c:c + gs], params[c // gs]) for c in range(0, 512, gs)], dim=1)
    assert torch.equal(bits(again), bits(by_block))  # idempotent
    enc = grid.encode(by_block, params)
    assert enc.type_name == type_name and enc.shape == (24, 512) and enc.error["off_grid_weights"] == 0
    assert torch.equal(bits(enc.dequantize()), bits(by_block))
    ref = gguf_dequantize(enc.data.reshape(-1), GGMLQuantizationType[type_name]).reshape(24, 512)
    assert torch.equal(bits(torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))), bits(by_block))
    # rounding to the grid is close to the weights (the searched scales are reasonable)
    rel = float((by_block - w)[13:].norm() / w[13:].norm())
    assert rel < {"Q2_K": 0.6, "Q3_K": 0.35}.get(type_name, 0.2)


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_kquant_grid_rtn_equals_encoder(type_name, with_importance):
    """Round-to-nearest through a k-quant grid is llama.cpp's encoding (same search, same requantization)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((32, 1024)) * 0.02).astype(np.float32)
    imp = (rng.random(1024) ** 4).astype(np.float32) if with_importance else None
    grid = GGMLGrid(type_name)
    ours = grid.quantize_rtn(torch.from_numpy(w), None if imp is None else torch.from_numpy(imp))
    ref = quantize_ggml(w, type_name, importance=imp).data
    size = type_size(type_name)
    same = (ours.data.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1)
    assert same.all(), f"{int((~same).sum())} of {same.size} blocks differ"


@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
def test_iquant_grid_rtn_keeps_llama_cpp_scales_and_rounds_to_the_nearest_stored_value(type_name):
    """llama.cpp picks IQ4 indices against the unrounded scale; the grid picks the nearest value of the stored
    (fp16-rounded) scale: same headers, and every weight at least as close as llama.cpp's."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((32, 1024)) * 0.02).astype(np.float32)
    ours = GGMLGrid(type_name).quantize_rtn(torch.from_numpy(w))
    ref = quantize_ggml(w, type_name)
    size, codes_at = type_size(type_name), {"IQ4_NL": 2, "IQ4_XS": 8}[type_name]
    assert np.array_equal(ours.data.reshape(-1, size)[:, :codes_at], ref.data.reshape(-1, size)[:, :codes_at])
    x = torch.from_numpy(w)
    assert bool(((ours.dequantize() - x).abs() <= (ref.dequantize() - x).abs()).all())


def test_rows_permute_with_blocks():
    """GGUF's Q/K row permutation commutes with block quantization (blocks lie within rows)."""
    w = torch.from_numpy(edge_weights(64, 256, seed=4))
    direct = quantize_ggml(hf_to_interleaved(w, 8), "Q4_K").data
    permuted_bytes = hf_to_interleaved(torch.from_numpy(quantize_ggml(w, "Q4_K").data), 8).numpy()
    assert np.array_equal(direct, permuted_bytes)


def test_encode_rejects_act_order_permutation():
    grid = GGMLGrid("Q4_0")
    w = torch.randn(4, 64)
    params = fit_all(grid, w)
    g_idx = torch.tensor([1] * 32 + [0] * 32, dtype=torch.int32)
    with pytest.raises(SchemeError, match="static groups"):
        grid.encode(w, params, g_idx)
    with pytest.raises(SchemeError, match="no GGML grid"):
        GGMLGrid("IQ2_XS")


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q6_K", "IQ4_XS", "IQ4_NL"])
def test_gptq_through_ggml_grid_beats_rtn(type_name):
    """GPTQ's error feedback under the exact ggml grid: a plain ggml tensor with lower output error than RTN."""
    from quantkit.quant.gptq import GPTQ

    g = torch.Generator().manual_seed(0)
    out_f, in_f, n = 64, 512, 2048
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    x = torch.randn(n, in_f, generator=g) @ mix * (torch.rand(in_f, generator=g) * 3 + 0.1)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    gptq = GPTQ(in_f)
    gptq.add_batch(x)
    grid = GGMLGrid(type_name)
    tensor, info = gptq.quantize(w, grid)
    assert tensor.type_name == type_name and tensor.error["off_grid_weights"] == 0
    w_gptq = tensor.dequantize()
    w_rtn = quantize_ggml(w, type_name).dequantize()

    def out_err(wq):
        return float(((x @ (wq - w).T) ** 2).mean())

    assert out_err(w_gptq) < 0.9 * out_err(w_rtn), (out_err(w_gptq), out_err(w_rtn))



@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_1"])
def test_encode_of_off_grid_weights_rounds_and_reports(type_name):
    grid = GGMLGrid(type_name)
    w = torch.from_numpy(edge_weights(16, 256, seed=9))
    params = fit_all(grid, w)
    enc = grid.encode(w, params)  # not fake-quantized first
    assert enc.error["off_grid_weights"] > 0.9 * w.numel() - 512
    gs = grid.group_size
    expected = torch.cat([grid.fake_quant(w[:, c:c + gs], params[c // gs]) for c in range(0, 256, gs)], dim=1)
    assert torch.equal(bits(enc.dequantize()), bits(expected))


def test_gptq_run_encodes_lattice_types_with_the_hessian_diagonal(nano_path, tmp_path):
    """`--method gptq --type IQ2_M`: the k-quant tensors (attn_v Q4_K, ...) go through GPTQ; the lattice i-quants,
    which have no GPTQ grid, are encoded by ggml's search weighted by the layer's Hessian diagonal (mean x²: an
    imatrix of the same tokens), and the log says which."""
    import quantkit
    from quantkit.gguf.mixes import tensor_types
    from quantkit.gguf.reader import parse_gguf
    from quantkit.model import arch
    from quantkit.model.config import ModelConfig

    res = quantkit.quantize(nano_path, tmp_path / "nano-IQ2_M.gguf", method="gptq", gguf_type="IQ2_M",
                            calib="builtin", calib_samples=4, calib_seqlen=64)
    types = {arch.from_gguf(n): i.type_name for n, i in parse_gguf(res.paths["gguf"]).tensors.items()}
    assert types == tensor_types(ModelConfig.from_file(nano_path / "config.json"), "IQ2_M", has_imatrix=True)
    methods = {(row["target"], row["method"]) for row in res.log if "method" in row}
    assert ("IQ2_S", "imatrix") in methods and ("Q4_K", "gptq") in methods
    assert not any(t == "IQ2_S" and m == "gptq" for t, m in methods)
