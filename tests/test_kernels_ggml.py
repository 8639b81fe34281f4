"""ggml block kernels: torch dequantizers vs gguf-py, Triton kernels (interpreter on CPU) vs the torch ones."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

from quantkit.kernels.ggml_ref import BLOCK_SIZES, DEQUANT, dequantize_rows

F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208]}
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def random_blocks(type_name, rows, blocks_per_row, rng):
    """Random block bytes with finite, moderate fp16 scale fields (fresh each run)."""
    _, nbytes = BLOCK_SIZES[type_name]
    data = rng.integers(0, 256, (rows, blocks_per_row, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        d = (rng.standard_normal((rows, blocks_per_row)) * 0.01).astype(np.float16)
        data[..., off:off + 2] = d.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return data.reshape(rows, -1)


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.mark.parametrize("type_name", sorted(DEQUANT))
def test_torch_dequant_equals_gguf_py(type_name, rng):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = random_blocks(type_name, 5, 2, rng)
    ref = dequantize(data, GGMLQuantizationType[type_name]).reshape(5, -1)
    got = DEQUANT[type_name](torch.from_numpy(data)).numpy()
    np.testing.assert_array_equal(got, ref)


def test_fallback_type_uses_gguf_py(rng):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data_k = rng.integers(0, 256, (2, 84), dtype=np.uint8)  # Q2_K has no torch dequantizer here
    data_k[:, 80:84] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)
    out = dequantize_rows(torch.from_numpy(data_k), "Q2_K")
    np.testing.assert_array_equal(out.numpy(), dequantize(data_k, GGMLQuantizationType.Q2_K).reshape(2, -1))
    assert out.shape == (2, 256) and torch.isfinite(out).all()


triton = pytest.importorskip("triton")
KERNEL_TYPES = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", KERNEL_TYPES)
def test_triton_dequant_equals_reference(type_name, rng):
    from quantkit.kernels.ggml_matmul import ggml_dequant

    qk = BLOCK_SIZES[type_name][0]
    data = torch.from_numpy(random_blocks(type_name, 37, 2 if qk == 256 else 3, rng)).to(DEVICE)
    out = torch.full((37, data.shape[1] // BLOCK_SIZES[type_name][1] * qk), float("nan"), device=DEVICE)
    ggml_dequant(data, type_name, out=out)
    torch.testing.assert_close(out, dequantize_rows(data, type_name), rtol=0, atol=0)


@pytest.mark.parametrize("type_name", KERNEL_TYPES)
@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (3, torch.float16), (8, torch.bfloat16)])
def test_triton_matvec_equals_reference(type_name, m, dtype, rng):
    from quantkit.kernels.ggml_matmul import ggml_matvec

    qk = BLOCK_SIZES[type_name][0]
    rows = 29
    data = torch.from_numpy(random_blocks(type_name, rows, 2 if qk == 256 else 5, rng)).to(DEVICE)
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
