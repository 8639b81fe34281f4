"""The IQ3_XXS / IQ3_S encoders (`quantkit.gguf.iq3`) against llama.cpp's `llama-quantize --pure`, block for block,
with and without an importance matrix, and against quantkit's own decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit.ggml_types import type_size
from quantkit.gguf.iq3 import ENCODERS
from tests.conftest import require_llamacpp
from tests.test_gguf_quants import (  # noqa: F401  (oracle_tensors is a fixture)
    blocks_identical,
    edge_weights,
    llama_quantize,
    oracle_tensors,
    synthetic_imatrix,
    write_f32_gguf,
)

IQ3_TYPES = ["IQ3_XXS", "IQ3_S"]


def _encode(type_name: str, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Rows [r, cols] -> block bytes [r * cols/256, type_size], the importance broadcast to every element."""
    qw = None if importance is None else np.broadcast_to(importance.reshape(1, -1), x.shape).reshape(-1, 256)
    return ENCODERS[type_name](x.reshape(-1, 256), qw)


def _reference_without_imatrix(tools, tmp_path, type_name: str, group: dict[str, np.ndarray]) -> dict:
    """llama-quantize's blocks for each tensor, without an imatrix. llama-quantize refuses IQ3_XXS without one
    except for the token embedding and the output, so each tensor goes through a file of its own as
    `token_embd.weight` (which --pure quantizes to the requested type like any other weight)."""
    out = {}
    for i, (name, x) in enumerate(group.items()):
        src = tmp_path / f"f32-{type_name}-{i}.gguf"
        write_f32_gguf(src, {"token_embd.weight": x}, x.shape[1])
        ref = llama_quantize(tools, src, tmp_path / f"{type_name}-{i}.gguf", type_name)["token_embd.weight"]
        assert ref.tensor_type.name == type_name
        out[name] = np.asarray(ref.data)
    return out


@pytest.mark.parametrize("type_name", IQ3_TYPES)
def test_iq3_byte_identical_to_llama_quantize(tmp_path, oracle_tensors, type_name):  # noqa: F811
    """Every block, on mistral-nano's weights and on the random 4096-wide layer with the corner cases of
    `edge_weights` (zero and -0.0 blocks, constant blocks, ties, x1000 and 1e-20 magnitudes)."""
    tools = require_llamacpp("llama-quantize")
    for group in oracle_tensors:
        ref = _reference_without_imatrix(tools, tmp_path, type_name, group)
        for name, x in group.items():
            same = blocks_identical(_encode(type_name, x), ref[name], type_name)
            assert same.all(), f"{name} {type_name}: {int((~same).sum())} of {same.size} blocks differ"


@pytest.mark.parametrize("type_name", IQ3_TYPES)
def test_iq3_blocks_decode_close_to_the_input(type_name):
    from quantkit.kernels.ggml_ref import dequantize_rows

    x = edge_weights(12, 512, seed=7)
    data = _encode(type_name, x)
    assert data.shape == (12 * 2, type_size(type_name)) and data.dtype == np.uint8
    back = dequantize_rows(torch.from_numpy(data.reshape(12, -1)), type_name).numpy()
    assert back.shape == x.shape
    assert not back[0, :256].any()  # an all-zero super-block decodes to zeros
    # row 4 mixes 1e-20 values with 0.02 ones; in IQ3_S, row 8's first super-block (an all -0.0 sub-block) is
    # stored shifted, as llama.cpp stores it (test_iq3_s_zero_sub_block_shifts_the_later_codes)
    x, back = x.copy(), back.copy()
    if type_name == "IQ3_S":
        x[8, :256] = back[8, :256] = 0
    rows = [r for r in range(12) if r not in (0, 4)]
    rel = np.linalg.norm(back[rows] - x[rows], axis=1) / np.linalg.norm(x[rows], axis=1)
    assert (rel < 0.3).all(), rel
    assert np.mean(np.sign(back[rows]) == np.sign(x[rows])) > 0.9


def test_iq3_s_zero_sub_block_shifts_the_later_codes():
    """llama.cpp's IQ3_S encoder skips an all-zero sub-block without advancing its qs/signs write positions: the
    later sub-blocks' grid bytes and signs land one slot early, the last slot stays zero, qh stays in place.
    (test_iq3_byte_identical_to_llama_quantize checks the same on a -0.0 sub-block against llama-quantize.)"""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((1, 256)) * 0.02).astype(np.float32)
    zeroed = x.copy()
    zeroed[0, :32] = 0.0
    full, shifted = ENCODERS["IQ3_S"](x)[0], ENCODERS["IQ3_S"](zeroed)[0]
    qs, qh, signs = slice(2, 66), slice(66, 74), slice(74, 106)
    assert np.array_equal(shifted[qs][:56], full[qs][8:]) and not shifted[qs][56:].any()
    assert np.array_equal(shifted[signs][:28], full[signs][4:]) and not shifted[signs][28:].any()
    assert shifted[qh][0] == 0 and np.array_equal(shifted[qh][1:], full[qh][1:])


def _c_best_neighbour(lat, u, xval, weight, scale) -> int:
    """ggml's iq3_find_best_neighbour, scalar float32 steps in C's order."""
    best, pick = np.float32(np.finfo(np.float32).max), -1
    for cand in lat.neighbours[u]:
        if cand < 0:
            break
        d2 = np.float32(0)
        for i in range(4):
            diff = np.float32(scale * lat.odd[cand, i]) - xval[i]
            d2 = np.float32(d2 + np.float32(weight[i] * diff) * diff)
        if d2 < best:
            best, pick = d2, cand
    return pick


@pytest.mark.parametrize("type_name", IQ3_TYPES)
def test_iq3_neighbour_search_equals_c_and_iq_lattice(type_name):
    """The IQ3 encoders' own neighbour search (`iq3._best_neighbours`, slot by slot) picks what ggml's scalar
    loop picks and what the shared `iq_lattice.nearest_neighbour` picks: exact ties (first wins), zero weights,
    lists of every length (the unpadded tail pass included)."""
    from quantkit.gguf.iq3 import _best_neighbours, _lists
    from quantkit.gguf.iq_lattice import lattice, nearest_neighbour

    lat, lists = lattice(type_name), _lists(type_name)
    rng = np.random.default_rng(5)
    off = np.flatnonzero(lat.grid_of_map < 0)
    u = np.concatenate([rng.choice(off, 500), off[np.argsort(-lists.count[off])[:40]]])  # + the longest lists
    levels = (u[:, None] >> (3 * np.arange(4))) & 7
    scale = rng.uniform(0.05, 0.2, len(u)).astype(np.float32)
    xval = ((2 * levels + 1) * scale[:, None] * rng.uniform(0.8, 1.2, levels.shape)).astype(np.float32)
    xval[:40] = (2 * levels[:40] + 1 + rng.choice([-1, 0, 1], (40, 4))) * np.float32(0.125)  # exact ties
    scale[:40] = 0.125
    weight = rng.random(levels.shape).astype(np.float32)
    weight[40:60] = 0.0  # every distance 0: the first listed point
    weight[60:80, 1:] = 1.0
    ours = _best_neighbours(lists, u, np.ascontiguousarray(xval.T), np.ascontiguousarray(weight.T), scale)
    c_ref = [_c_best_neighbour(lat, *args) for args in zip(u, xval, weight, scale)]
    assert np.array_equal(ours, c_ref)
    assert np.array_equal(ours, nearest_neighbour(lat, u, xval, weight, scale))
