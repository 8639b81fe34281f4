"""The ggml dequantizer (kernels/ggml_ref.py) vs gguf-py, bit for bit; Triton kernels (interpreter on CPU) vs it."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

from quantkit.errors import FormatError
from quantkit.ggml_types import DECODED_TYPES, block_size, type_size
from quantkit.kernels.ggml_ref import dequantize_rows
from tests.test_gguf_quants import random_ggml_blocks

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def random_blocks(type_name, rows, blocks_per_row, rng):
    """Random block bytes [rows, blocks_per_row * type_size] with finite fp16 scale fields (fresh each run)."""
    return random_ggml_blocks(type_name, rows * blocks_per_row, rng).reshape(rows, -1)


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.mark.parametrize("type_name", DECODED_TYPES)
def test_dequantize_rows_equals_gguf_py(type_name, rng):
    """Every value identical, bit for bit (-0.0 included), on random blocks (fresh each run)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = random_blocks(type_name, 5, 64, rng)
    ref = dequantize(data, GGMLQuantizationType[type_name]).astype(np.float32).reshape(5, -1)
    got = dequantize_rows(torch.from_numpy(data), type_name)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert np.array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))


def test_dequantize_rows_in_row_chunks_and_refusals(rng):
    data = torch.from_numpy(random_blocks("Q4_K", 5, 1024, rng))  # 2^18 values a row: 4-row chunks
    by_row = torch.cat([dequantize_rows(data[r:r + 1], "Q4_K") for r in range(5)])
    assert torch.equal(dequantize_rows(data, "Q4_K"), by_row)
    with pytest.raises(FormatError, match="MXFP4.*cannot decode"):
        dequantize_rows(torch.zeros((1, 17), dtype=torch.uint8), "MXFP4")
    with pytest.raises(FormatError, match="Q4_K: expected uint8"):
        dequantize_rows(data[:, :100], "Q4_K")


triton = pytest.importorskip("triton")
LATTICE_TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]  # grid tables in kv_ptr
KERNEL_TYPES = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", *LATTICE_TYPES]


def test_kernel_types_and_tables():
    """SUPPORTED (what the runtime routes to Triton) is the tested list; each type's flat table is its reference
    tables concatenated, ksigns where the kernels read them."""
    from quantkit.kernels.ggml_matmul import KSIGNS_AT, SUPPORTED
    from quantkit.kernels.ggml_ref import _table, kernel_table

    assert list(SUPPORTED) == KERNEL_TYPES
    for t in ("IQ4_NL", "IQ4_XS"):
        assert torch.equal(kernel_table(t, "cpu"), _table("IQ4", "cpu"))
    for t in LATTICE_TYPES:
        tab, grid = kernel_table(t, "cpu"), _table(t, "cpu").reshape(-1)
        assert tab.dtype == torch.float32 and tab.dim() == 1 and kernel_table(t, "cpu") is tab
        assert torch.equal(tab[:grid.numel()], grid)
        if t in KSIGNS_AT:
            assert KSIGNS_AT[t] == grid.numel() and torch.equal(tab[grid.numel():], _table("ksigns", "cpu").reshape(-1))
        else:
            assert tab.numel() == grid.numel()


@pytest.mark.parametrize("type_name", KERNEL_TYPES)
def test_triton_dequant_equals_reference(type_name, rng):
    from quantkit.kernels.ggml_matmul import ggml_dequant

    qk = block_size(type_name)
    data = torch.from_numpy(random_blocks(type_name, 37, 2 if qk == 256 else 3, rng)).to(DEVICE)
    out = torch.full((37, data.shape[1] // type_size(type_name) * qk), float("nan"), device=DEVICE)
    ggml_dequant(data, type_name, out=out)
    torch.testing.assert_close(out, dequantize_rows(data, type_name), rtol=0, atol=0)


@pytest.mark.parametrize("type_name", KERNEL_TYPES)
@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (3, torch.float16), (8, torch.bfloat16)])
def test_triton_matvec_equals_reference(type_name, m, dtype, rng):
    from quantkit.kernels.ggml_matmul import ggml_matvec

    rows = 29
    data = torch.from_numpy(random_blocks(type_name, rows, 2 if block_size(type_name) == 256 else 5, rng)).to(DEVICE)
    w = dequantize_rows(data, type_name)
    x = torch.randn(m, w.shape[1], device=DEVICE).to(dtype)
    out = torch.full((m, rows), float("nan"), device=DEVICE, dtype=dtype)
    got = ggml_matvec(x, data, type_name, out=out)
    ref = x.float() @ w.t()
    assert not torch.isnan(got).any()
    err = float((got.float() - ref).norm() / ref.norm())
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_ggml_matmul_prefill_uses_row_chunks(rng):
    from quantkit.kernels.ggml_matmul import ggml_matmul

    data = torch.from_numpy(random_blocks("Q4_K", 70, 1, rng)).to(DEVICE)
    x = torch.randn(2, 6, 256, device=DEVICE)
    got = ggml_matmul(x, data, "Q4_K", max_chunk_elems=256 * 32)  # 3 chunks of 32 rows (last one short)
    torch.testing.assert_close(got, x @ dequantize_rows(data, "Q4_K").t(), rtol=1e-5, atol=1e-4)
