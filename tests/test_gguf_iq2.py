"""The IQ2_XXS / IQ2_XS / IQ2_S encoders (`quantkit.gguf.iq2`) against llama.cpp's own `llama-quantize --pure`:
every block byte-identical, with an imatrix (all three types) and without one (IQ2_S; llama-quantize only
writes it unweighted for token_embd/output, the tensors it exempts from its imatrix requirement)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit.errors import SchemeError
from quantkit.ggml_types import type_size
from quantkit.gguf.iq2 import ENCODERS
from tests.conftest import require_llamacpp
from tests.test_gguf_quants import (  # noqa: F401  (oracle_tensors is a fixture)
    blocks_identical,
    edge_weights,
    llama_quantize,
    oracle_tensors,
    synthetic_imatrix,
    write_f32_gguf,
)

# block type -> the llama-quantize file type that writes it with --pure
FTYPES = {"IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_M"}


def encode(x: np.ndarray, type_name: str, importance: np.ndarray | None) -> np.ndarray:
    """[rows, cols] weights -> block bytes [rows*cols/256, type_size], the importance broadcast over rows."""
    qw = None if importance is None else np.broadcast_to(importance.reshape(1, -1), x.shape).reshape(-1, 256)
    return ENCODERS[type_name](x.reshape(-1, 256), qw)


def test_iq2_s_unweighted_byte_identical_to_llama_quantize(tmp_path, oracle_tensors):  # noqa: F811
    """llama-quantize writes IQ2_S without an imatrix only for token_embd/output: the same weights under those
    names."""
    tools = require_llamacpp("llama-quantize")
    for i, group in enumerate(oracle_tensors):
        arrays = list(group.values())
        named = dict(zip(["token_embd.weight", "output.weight"], arrays[::-1]))
        src = tmp_path / f"embd-{i}.gguf"
        write_f32_gguf(src, named, arrays[0].shape[1])
        ref = llama_quantize(tools, src, tmp_path / f"IQ2_M-embd-{i}.gguf", FTYPES["IQ2_S"])
        for name, x in named.items():
            assert ref[name].tensor_type.name == "IQ2_S"
            same = blocks_identical(encode(x, "IQ2_S", None), np.asarray(ref[name].data), "IQ2_S")
            assert same.all(), f"{name} IQ2_S: {int((~same).sum())} of {same.size} blocks differ"


@pytest.mark.parametrize("type_name", ["IQ2_XXS", "IQ2_XS"])
def test_negative_scale_flips_the_signs_like_llama_quantize(tmp_path, type_name):
    """Groups whose odd sign count is fixed by negating a large weight of high importance: the least-squares
    scale comes out negative, and ggml flips it and every sign of the sub-block."""
    from quantkit.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix

    tools = require_llamacpp("llama-quantize")
    rng = np.random.default_rng(11)
    x = (100 * (1 + 0.01 * rng.standard_normal((8, 1024)))).astype(np.float32)
    x[:, 0::8] = -(1 + 0.1 * rng.random((8, 128)))
    x[4:, 1::8] = -100.0
    importance = np.ones(1024, np.float32)
    importance[0::8] = 10000.0
    name = "blk.0.ffn_up.weight"
    src = tmp_path / "f32.gguf"
    write_f32_gguf(src, {name: x}, 1024)
    imx = write_imatrix(tmp_path / "imatrix.gguf", Imatrix({name: ImatrixEntry(importance.reshape(1, -1) * 512,
                                                                               np.array([512.0], np.float32))},
                                                           ["crafted.txt"], chunk_count=4, chunk_size=128))
    ref = llama_quantize(tools, src, tmp_path / "q.gguf", FTYPES[type_name], imatrix=imx)
    ours = encode(x, type_name, importance)
    same = blocks_identical(ours, np.asarray(ref[name].data), type_name)
    assert same.all(), f"{int((~same).sum())} of {same.size} blocks differ"


@pytest.mark.parametrize("type_name", ["IQ2_XXS", "IQ2_XS"])
def test_types_that_need_an_imatrix_refuse_without_one(type_name):
    with pytest.raises(SchemeError, match=f"{type_name} needs an importance matrix"):
        ENCODERS[type_name](np.zeros((1, 256), np.float32), None)


@pytest.mark.parametrize("type_name", list(FTYPES))
def test_encoded_blocks_decode_close_to_the_weights(type_name):
    from quantkit.kernels.ggml_ref import dequantize_rows

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 1024)) * 0.02).astype(np.float32)
    importance = (rng.random(1024) + 0.5).astype(np.float32)
    data = encode(x, type_name, importance)
    assert data.shape == (32, type_size(type_name)) and data.dtype == np.uint8
    back = dequantize_rows(torch.from_numpy(data.reshape(8, -1)), type_name).numpy()
    rel = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert rel < {"IQ2_XXS": 0.4, "IQ2_XS": 0.35, "IQ2_S": 0.3}[type_name], f"relative error {rel:.3f}"
    # corner cases decode to finite values, and all-zero super-blocks to zeros
    edge = edge_weights(12, 512)
    back = dequantize_rows(torch.from_numpy(encode(edge, type_name, np.ones(512, np.float32)).reshape(12, -1)),
                           type_name).numpy()
    assert np.isfinite(back).all()
    assert not back[0, :256].any()


def test_lattice_is_built_once_when_encoder_threads_ask_at_once():
    """Encoder threads (`gguf.quants`) that first need a lattice at the same time get one and the same object:
    the neighbour search's tables are keyed by it, and a second, short-lived copy once handed one type's tables to
    another type (an IndexError in IQ3_S after a threaded IQ2 encode)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from quantkit.gguf import iq_lattice

    iq_lattice._build_lattice.cache_clear()
    start = threading.Barrier(4)

    def ask(_):
        start.wait()
        return iq_lattice.lattice("IQ2_XXS")

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, range(4)))
    assert all(lat is got[0] for lat in got)
