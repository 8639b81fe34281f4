"""quantkit.ggml_types: the type table against gguf-py, the helpers, and who may import what."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit import ggml_types as gt
from quantkit.errors import SchemeError
from quantkit.gguf.encode import BLOCK_SIZES
from quantkit.testing import REPO_ROOT


def test_table_is_gguf_py_and_the_workers_copy_equals_it():
    assert gt.sizes() == {t.name: tuple(GGML_QUANT_SIZES[t]) for t in GGML_QUANT_SIZES}
    assert tuple(BLOCK_SIZES) == gt.SUPPORTED_TYPES
    for name in gt.SUPPORTED_TYPES:
        assert BLOCK_SIZES[name] == (gt.block_size(name), gt.type_size(name))
        assert BLOCK_SIZES[name] == GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    assert gt.SUPPORTED_TYPES == gt.FLOAT_TYPES + gt.LEGACY_TYPES + gt.K_TYPES + gt.I_TYPES
    assert gt.BLOCK_TYPES == gt.LEGACY_TYPES + gt.K_TYPES + gt.I_TYPES


def test_predicates():
    assert [gt.is_float_type(t) for t in ("F32", "F16", "BF16", "Q8_0", "F64", None)] == [True] * 3 + [False] * 3
    assert all(gt.is_block_type(t) for t in gt.BLOCK_TYPES + ("IQ4_XS", "Q8_K"))
    assert not any(gt.is_block_type(t) for t in gt.FLOAT_TYPES + ("I8", "Q7_K", None, 4))
    assert gt.check_type("Q4_K") == "Q4_K"
    with pytest.raises(SchemeError, match=r"blk.0.attn_q.weight: unsupported ggml type 'TQ1_0' \(supported: F32, "):
        gt.check_type("TQ1_0", "blk.0.attn_q.weight")


def test_sizes():
    assert (gt.block_size("Q4_K"), gt.type_size("Q4_K"), gt.block_size("F16"), gt.type_size("F16")) == (256, 144, 1, 2)
    assert gt.row_nbytes("Q8_0", 4096) == 128 * 34 and gt.row_nbytes("BF16", 3) == 6
    assert gt.tensor_nbytes((32, 4096), "Q6_K") == 32 * 16 * 210
    assert gt.tensor_nbytes((2, 3, 512), "Q4_0") == 6 * 16 * 18 and gt.tensor_nbytes((7,), "F32") == 28
    assert gt.tensor_nbytes((4, 256), "IQ4_XS") == 4 * 136  # sized like any gguf-py type, though not decoded
    with pytest.raises(SchemeError, match="row length 100 is not a multiple of the Q4_K block size 256"):
        gt.tensor_nbytes((2, 100), "Q4_K")
    with pytest.raises(SchemeError, match="unknown ggml type 'Q7_K'"):
        gt.block_size("Q7_K")


def test_f16_helpers_on_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)
    fields = bits.view(np.uint8).reshape(-1, 2)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    got = gt.f16_to_f32(fields)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    got_t = gt.f16_to_f32(torch.from_numpy(fields.reshape(16, -1, 2)[:, 1::2])).numpy()  # non-contiguous, 3-D
    ref_t, nan_t = ref.reshape(16, -1)[:, 1::2], nan.reshape(16, -1)[:, 1::2]
    assert got_t.dtype == np.float32 and np.isnan(got_t[nan_t]).all()  # torch quiets signalling NaNs
    assert np.array_equal(got_t[~nan_t].view(np.uint32), ref_t[~nan_t].view(np.uint32))
    assert np.array_equal(gt.f32_to_f16(ref[~nan]), fields[~nan])
    # float32 -> fp16 rounds to nearest even: halfway between 1 and 1 + 2^-10 goes to 1, past it goes up
    assert gt.f16_to_f32(gt.f32_to_f16(np.float32([1 + 2**-11, 1 + 2**-11 + 2**-20, 70000.0]))).tolist() == [
        1.0, 1 + 2**-10, np.inf]


def _modules_after(code: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def test_encoder_workers_load_neither_torch_nor_gguf_py():
    assert not {"torch", "gguf"} & _modules_after("import quantkit.gguf.encode")


def test_kernels_and_tensors_load_nothing_of_gguf_or_model():
    loaded = _modules_after("import numpy as np, quantkit.kernels.ggml_ref, quantkit.kernels.cpu\n"
                            "from quantkit.tensors import GGMLTensor\n"
                            "assert GGMLTensor('Q8_0', (1, 32), np.zeros((1, 34), np.uint8)).dequantize().sum() == 0")
    assert not [m for m in loaded if m.startswith(("quantkit.gguf", "quantkit.model"))]
