"""IQ1_S / IQ1_M encoders (`quantkit.gguf.iq1`) against llama.cpp's `llama-quantize --pure --imatrix`: every block
byte-identical, on mistral-nano's weights, the random 4096-wide layer with corner cases, and a tensor built to hit
the encoders' exact-replay paths (dead importance columns, ties, tiny and large magnitudes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit.errors import SchemeError
from quantkit.ggml_types import type_size
from quantkit.gguf import iq1
from quantkit.kernels.ggml_ref import dequantize_rows
from tests.conftest import require_llamacpp
from tests.test_gguf_quants import (blocks_identical, edge_weights, llama_quantize, oracle_tensors,  # noqa: F401 (a fixture)
                                    synthetic_imatrix, write_f32_gguf)

IQ1_TYPES = ["IQ1_S", "IQ1_M"]


def encode(x: np.ndarray, type_name: str, importance: np.ndarray) -> np.ndarray:
    """[rows, cols] float32 and the per-column importance -> block bytes [rows, row_bytes]."""
    rows, cols = x.shape
    qw = np.broadcast_to(np.asarray(importance, dtype=np.float32).reshape(1, -1), (rows, cols)).reshape(-1, 256)
    blocks = iq1.ENCODERS[type_name](np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 256), qw)
    assert blocks.dtype == np.uint8 and blocks.shape == (rows * cols // 256, type_size(type_name))
    return blocks.reshape(rows, -1)


def assert_identical_to_llama_quantize(tmp_path, tools, group, imatrix, type_name, tag):
    """Quantize `group` with llama-quantize and with our encoder under the same imatrix; all blocks equal.
    Returns our bytes per tensor."""
    from quantkit.gguf.imatrix import read_imatrix, write_imatrix

    width = next(iter(group.values())).shape[1]
    src = tmp_path / f"f32-{tag}.gguf"
    write_f32_gguf(src, group, width)
    imx_path = write_imatrix(tmp_path / f"imatrix-{tag}.gguf", imatrix)
    imx = read_imatrix(imx_path)
    ref = llama_quantize(tools, src, tmp_path / f"{type_name}-{tag}.gguf", type_name, imatrix=imx_path)
    ours = {}
    for name, x in group.items():
        assert ref[name].tensor_type.name == type_name
        ours[name] = encode(x, type_name, imx.importance(name))
        same = blocks_identical(ours[name], np.asarray(ref[name].data), type_name)
        assert same.all(), (f"{name} {type_name} ({tag}): {int((~same).sum())} of {same.size} blocks differ, "
                            f"first {np.flatnonzero(~same)[:8].tolist()}")
    return ours


def corner_weights(rows: int = 24, cols: int = 1024, seed: int = 5) -> np.ndarray:
    """Rows that send the encoders down their exact-replay paths: ties, tiny and large magnitudes, sub-blocks
    below ggml's GROUP_MAX_EPS_IQ1_S (1e-12) and GROUP_MAX_EPS_IQ1_M (1e-7)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[0] = 0.0
    x[1] = 0.5
    x[2] = np.tile([0.01, -0.01], cols // 2)
    x[3] = rng.integers(-2, 3, cols) * np.float32(0.01)  # 5 distinct values: equal values everywhere
    x[4] *= np.float32(1e-9)  # sums of w*x far below 2^-100
    x[5] *= np.float32(1e-5)  # around IQ1_M's threshold
    x[6] *= np.float32(1e4)
    x[7] = ((x[7].view(np.uint32) >> 16) << 16).view(np.float32)  # bf16 values
    x[8] = 0.0
    x[8, ::8] = rng.standard_normal(cols // 8) * 0.02  # one nonzero per group of 8
    x[9] = np.abs(x[9])
    x[10] = -np.abs(x[10])
    x[11, : cols // 2] = np.float32(1e-13)  # below IQ1_S's threshold
    x[12] = np.round(x[12] * 200) / 200
    x[13, 16:48] = np.float32(-0.0)
    return x


def corner_imatrix(group: dict[str, np.ndarray], seed: int):
    """Heavy-tailed column importances with dead columns: every 17th, whole sub-blocks (IQ1_S's 32 and IQ1_M's 16
    columns), a whole super-block, the columns of row 8's values in the second super-block; and tiny importances."""
    from quantkit.gguf.imatrix import Imatrix, ImatrixEntry

    rng = np.random.default_rng(seed)
    entries = {}
    for name, x in group.items():
        sums = (rng.random(x.shape[1]) ** 4 * 300).astype(np.float32)
        sums[::17] = 0.0
        sums[0:32] = 0.0
        sums[256 + 16:256 + 32] = 0.0
        sums[512:544] = np.float32(1e-20)
        sums[256:512:8] = 0.0  # with row 8: a super-block whose weighted values are all zero (scales 0)
        sums[768:] = 0.0  # a whole dead super-block: no split qualifies
        entries[name] = ImatrixEntry(sums.reshape(1, -1), np.array([512.0], np.float32))
    return Imatrix(entries, ["synthetic.txt"], chunk_count=4, chunk_size=128)


@pytest.mark.parametrize("type_name", IQ1_TYPES)
def test_second_imatrix_and_corner_cases_byte_identical(tmp_path, oracle_tensors, type_name):  # noqa: F811
    """Another imatrix (a different seed) on mistral-nano, plus the corner-case tensor with dead importance
    columns: still every block identical, and the imatrix changes the result."""
    tools = require_llamacpp("llama-quantize")
    nano, _ = oracle_tensors
    ours = assert_identical_to_llama_quantize(tmp_path, tools, nano, synthetic_imatrix(nano, 11), type_name,
                                              "nano-11")
    first = synthetic_imatrix(nano, 0)
    for name, x in nano.items():
        assert not np.array_equal(ours[name], encode(x, type_name, first.importance(name)))
    corner = {"blk.0.attn_k.weight": corner_weights()}
    assert_identical_to_llama_quantize(tmp_path, tools, corner, corner_imatrix(corner, 3), type_name, "corner")


@pytest.mark.parametrize("type_name", IQ1_TYPES)
def test_missing_imatrix_is_refused(type_name):
    x = edge_weights(16, 256)
    with pytest.raises(SchemeError, match="imatrix"):
        iq1.ENCODERS[type_name](x, None)


@pytest.mark.parametrize("type_name", IQ1_TYPES)
def test_encoded_blocks_decode_with_a_sensible_error(type_name):
    """Decoded by the bit-exact reference decoder: about 0.55 relative RMS error on Gaussian weights (1.5-1.75 bits
    per weight), lower in the imatrix-weighted norm, and lower than with an unrelated imatrix."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((32, 1024)) * 0.02).astype(np.float32)
    importance = (rng.random(1024) ** 4 * 300 + 1e-3).astype(np.float32)

    def weighted_error(imp_used):
        y = dequantize_rows(torch.from_numpy(encode(x, type_name, imp_used)), type_name).numpy()
        assert y.shape == x.shape and np.isfinite(y).all()
        return float(np.sqrt((((y - x) ** 2) * importance).sum() / ((x ** 2) * importance).sum())), y

    err, y = weighted_error(importance)
    rel = float(np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()))
    cosine = float((x * y).sum() / np.linalg.norm(x) / np.linalg.norm(y))
    assert rel < 0.65 and cosine > 0.8
    assert err < 0.45
    assert err < weighted_error(rng.random(1024).astype(np.float32))[0]
    # all-zero weights, or weights without any importance, give all-zero blocks (as in ggml: no split qualifies)
    assert not encode(np.zeros((2, 256), np.float32), type_name, np.ones(256)).any()
    assert not encode(x[:2, :256], type_name, np.zeros(256)).any()
