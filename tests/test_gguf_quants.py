"""ggml block encoders/decoders against their oracles: the `gguf` package (legacy types, all decoders) and
llama.cpp's own `llama-quantize --pure` (k-quants, and every type with an imatrix)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from quantkit.errors import SchemeError
from quantkit.ggml_types import (
    BLOCK_TYPES,
    FLOAT_TYPES,
    I_TYPES,
    IMPORTANCE_TYPES,
    K_TYPES,
    LEGACY_TYPES,
    is_float_type,
    type_size,
)
from quantkit.gguf.quants import quantize_ggml
from tests.conftest import require_llamacpp


def edge_weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Gaussian weights plus the corner cases the reference code treats specially."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[0, :256] = 0.0  # all-zero blocks
    x[1, :256] = 0.5  # constant block
    x[2, :256] = np.linspace(-1, 1, 256, dtype=np.float32)  # exact ties
    x[3] *= 1000.0  # large magnitudes
    x[4, :64] = 1e-20  # below GROUP_MAX_EPS-ish magnitudes
    x[5, ::7] = 0.0
    x[6] = np.abs(x[6])  # all positive (min clamps to 0)
    x[7] = -np.abs(x[7])  # all negative
    x[8, :32] = np.float32(-0.0)
    x[9] = np.round(x[9] * 200) / 200  # many exact duplicates
    return x


def blocks_identical(ours: np.ndarray, ref: np.ndarray, type_name: str) -> np.ndarray:
    size = type_size(type_name)
    return (ours.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1)


# ------------------------------------------------------------------ gguf package oracles

@pytest.mark.parametrize("type_name", [*FLOAT_TYPES, *LEGACY_TYPES])
def test_encoder_bytes_equal_gguf_package(type_name):
    x = edge_weights(64, 512)
    ours = quantize_ggml(torch.from_numpy(x), type_name)
    ref = gguf_quantize(x, GGMLQuantizationType[type_name])
    assert ours.shape == x.shape
    assert ours.data.dtype == np.uint8 and ours.data.shape[0] == 64
    assert np.array_equal(ours.data.reshape(-1), np.ascontiguousarray(ref).view(np.uint8).reshape(-1))


# byte offsets of the fp16 scales/mins (IQ1_M's d is split over its scales: random_ggml_blocks)
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
              "IQ4_NL": [0], "IQ4_XS": [0], "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0], "IQ3_XXS": [0],
              "IQ3_S": [0], "IQ1_S": [0], "IQ1_M": [], "TQ1_0": [52], "TQ2_0": [64]}


def random_ggml_blocks(type_name: str, n: int, rng) -> np.ndarray:
    """n blocks [n, type_size] of arbitrary bytes with finite fp16 scale fields (every code/scale bit pattern
    occurs); for the float types n random finite values from 1e-8 to 1e8 (F16: subnormals to inf)."""
    rng = np.random.default_rng(rng)
    if is_float_type(type_name):
        x = rng.standard_normal(n) * 10.0 ** rng.integers(-8, 9, n)
        return quantize_ggml(x.astype(np.float32)[:, None], type_name).data
    b = rng.integers(0, 256, size=(n, type_size(type_name)), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        b[:, off:off + 2] = random_f16(n, rng).view(np.uint8).reshape(n, 2)
    if type_name == "IQ1_M":  # its fp16 d: nibble k in the top 4 bits of the k-th uint16 scale word (byte 48)
        words = b[:, 48:56].copy().view("<u2")
        nibbles = (random_f16(n, rng).view("<u2")[:, None] >> np.arange(0, 16, 4, dtype=np.uint16)) & 0xF
        b[:, 48:56] = ((words & 0x0FFF) | (nibbles << 12)).astype("<u2").view(np.uint8)
    return b


def random_f16(n: int, rng) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float16) * np.float16(0.01)


@pytest.mark.parametrize("type_name", [*FLOAT_TYPES, *BLOCK_TYPES])
def test_dequantize_of_encoded_weights_equals_gguf_package(type_name):
    """`GGMLTensor.dequantize` of the encoders' output, corner cases included (all-zero blocks, -0.0, ...)."""
    importance = np.linspace(0.5, 2.0, 512, dtype=np.float32) if type_name in IMPORTANCE_TYPES else None
    t = quantize_ggml(edge_weights(16, 512, seed=1), type_name, importance=importance)
    ours = t.dequantize().numpy()
    ref = gguf_dequantize(t.data, GGMLQuantizationType[type_name]).astype(np.float32).reshape(16, 512)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_dequantize_roundtrip_shape_and_error():
    x = edge_weights(16, 256)
    t = quantize_ggml(x, "Q8_0")
    back = t.dequantize()
    assert back.shape == (16, 256) and back.dtype == torch.float32
    err = (back - torch.from_numpy(x)).abs().reshape(-1, 32)
    step = torch.from_numpy(np.abs(x)).reshape(-1, 32).amax(dim=1, keepdim=True) / 127
    assert bool((err <= step * 0.57 + 1e-12).all())  # half a step, plus the fp16 rounding of the scale


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(SchemeError, match="multiple of the Q4_K block size 256"):
        quantize_ggml(np.zeros((2, 100), np.float32), "Q4_K", name="blk.0.attn_q.weight")
    with pytest.raises(SchemeError, match="unsupported ggml type"):
        quantize_ggml(np.zeros((2, 256), np.float32), "Q7_K")
    with pytest.raises(SchemeError, match="importance has 3 entries"):
        quantize_ggml(np.zeros((2, 256), np.float32), "Q4_K", importance=np.ones(3))


# ------------------------------------------------------------------ llama.cpp oracles

def write_f32_gguf(path, tensors: dict[str, np.ndarray], width: int) -> None:
    """A minimal llama-architecture GGUF that llama-quantize accepts (it only reads hparams and tensors)."""
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(width)
    w.add_feed_forward_length(width)
    w.add_head_count(8)
    w.add_head_count_kv(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(tools, src, dst, type_name, imatrix=None):
    cmd = [str(tools["llama-quantize"]), "--pure"]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(src), str(dst), type_name, "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {t.name: t for t in GGUFReader(str(dst)).tensors}


@pytest.fixture(scope="module")
def oracle_tensors(nano_path):
    """Real mistral-nano weights (layer 0, 256/768 wide) and a random 4096-wide layer with corner cases."""
    from quantkit.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(nano_path)
    nano = {
        "blk.0.attn_q.weight": ckpt.get_tensor("model.layers.0.self_attn.q_proj.weight"),
        "blk.0.ffn_down.weight": ckpt.get_tensor("model.layers.0.mlp.down_proj.weight"),
        "blk.0.ffn_up.weight": ckpt.get_tensor("model.layers.0.mlp.up_proj.weight")[:128],
    }
    nano = {k: v.float().numpy() for k, v in nano.items()}
    wide = {"blk.0.ffn_gate.weight": edge_weights(48, 4096, seed=3)}
    return nano, wide


@pytest.mark.parametrize("type_name", [*K_TYPES, "IQ4_NL", "IQ4_XS"])  # the lattice types: tests/test_gguf_iq*.py
def test_searched_types_byte_identical_to_llama_quantize(tmp_path, oracle_tensors, type_name):
    tools = require_llamacpp("llama-quantize")
    for group in oracle_tensors:
        width = next(iter(group.values())).shape[1]
        src = tmp_path / f"f32-{width}.gguf"
        write_f32_gguf(src, group, width)
        ref = llama_quantize(tools, src, tmp_path / f"{type_name}-{width}.gguf", type_name)
        for name, x in group.items():
            assert ref[name].tensor_type.name == type_name
            same = blocks_identical(quantize_ggml(x, type_name).data, np.asarray(ref[name].data), type_name)
            assert same.all(), f"{name} {type_name}: {int((~same).sum())} of {same.size} blocks differ"


# ------------------------------------------------------------------ importance matrix

def synthetic_imatrix(group: dict[str, np.ndarray], seed: int):
    """An imatrix for the oracle tensors, with heavy-tailed column importances and a few dead columns."""
    from quantkit.gguf.imatrix import Imatrix, ImatrixEntry

    rng = np.random.default_rng(seed)
    entries = {}
    for name, x in group.items():
        sums = (rng.random(x.shape[1]) ** 4 * 300).astype(np.float32)
        sums[:3] = 0.0
        entries[name] = ImatrixEntry(sums.reshape(1, -1), np.array([512.0], np.float32))
    return Imatrix(entries, ["synthetic.txt"], chunk_count=4, chunk_size=128)


# the llama-quantize file type that writes a block type with --pure, where the names differ
PURE_FTYPE = {"IQ2_S": "IQ2_M"}


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", *K_TYPES, *I_TYPES])
def test_imatrix_weighted_byte_identical_to_llama_quantize(tmp_path, oracle_tensors, type_name):
    """Our imatrix file is accepted by llama-quantize, and our weighted search gives its bytes (every i-quant:
    IQ1_S .. IQ4_XS; the lattice types' other cases are in tests/test_gguf_iq*.py)."""
    from quantkit.gguf.imatrix import read_imatrix, write_imatrix

    tools = require_llamacpp("llama-quantize")
    for seed, group in enumerate(oracle_tensors):
        width = next(iter(group.values())).shape[1]
        src = tmp_path / f"f32-{width}.gguf"
        write_f32_gguf(src, group, width)
        imx_path = write_imatrix(tmp_path / f"imatrix-{width}.gguf", synthetic_imatrix(group, seed))
        imx = read_imatrix(imx_path)
        ref = llama_quantize(tools, src, tmp_path / f"{type_name}-{width}.gguf", PURE_FTYPE.get(type_name, type_name),
                             imatrix=imx_path)
        for name, x in group.items():
            assert ref[name].tensor_type.name == type_name
            ours = quantize_ggml(x, type_name, importance=imx.importance(name)).data
            same = blocks_identical(ours, np.asarray(ref[name].data), type_name)
            assert same.all(), f"{name} {type_name} imatrix: {int((~same).sum())} of {same.size} blocks differ"
            # the importance must change something, or this test proves nothing
            flat = quantize_ggml(x, type_name, importance=np.ones(x.shape[1], np.float32)).data
            assert not np.array_equal(ours, flat)


@pytest.mark.slow
def test_imatrix_file_from_llama_imatrix_roundtrips(tmp_path, nano_path, pg_calib_dir):
    """Read files written by `llama-imatrix` itself (GGUF and legacy .dat), write them back identically."""
    import os
    import sys

    from quantkit.gguf.imatrix import read_imatrix, write_imatrix
    from quantkit.testing import llamacpp_convert_script

    tools = require_llamacpp("llama-imatrix")
    script = llamacpp_convert_script()
    if script is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is absent")
    model = tmp_path / "nano-f32.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    subprocess.run([sys.executable, str(script), str(nano_path), "--outtype", "f32", "--outfile", str(model)],
                   check=True, capture_output=True, env=env)
    text = tmp_path / "calib.txt"
    text.write_text(sorted(pg_calib_dir.glob("*.txt"))[0].read_text()[:20000])
    outs = {}
    for fmt in ("gguf", "dat"):
        out = tmp_path / f"imatrix.{fmt}"
        subprocess.run([str(tools["llama-imatrix"]), "-m", str(model), "-f", str(text), "-o", str(out), "-c", "128",
                        "--chunks", "3", "-t", "2", "--output-format", fmt], check=True, capture_output=True)
        outs[fmt] = read_imatrix(out)
    gg, dat = outs["gguf"], outs["dat"]
    assert len(gg.entries) == 6 * 7 and gg.chunk_count == 3 and gg.chunk_size == 128
    assert "model.layers.5.mlp.down_proj.weight" in gg.to_canonical()
    assert gg.importance("blk.0.ffn_down.weight").shape == (768,)
    # both formats give llama-quantize the same importance (up to float rounding of mean*ncall/ncall)
    for name in gg.entries:
        np.testing.assert_allclose(dat.importance(name), gg.importance(name), rtol=1e-5)
    written = write_imatrix(tmp_path / "rewritten.gguf", gg)
    assert written.read_bytes() == (tmp_path / "imatrix.gguf").read_bytes()


def test_non_finite_weights_are_refused_with_the_index():
    x = np.zeros((600, 512), np.float32)
    x[550, 7] = np.nan
    with pytest.raises(SchemeError,
                       match=r"blk.3.ffn_up.weight: weight contains NaN or Inf \(first at index \[550, 7\]\)"):
        quantize_ggml(x, "Q4_K", name="blk.3.ffn_up.weight")


def c_best_index(v: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 over the IQ4 table, step by step as C runs it (binary search, float32 differences)."""
    from quantkit.gguf.iquants import KVALUES

    out = np.empty(v.shape, dtype=np.int64)
    for i, x in enumerate(v.astype(np.float32)):
        if x <= KVALUES[0]:
            out[i] = 0
            continue
        if x >= KVALUES[-1]:
            out[i] = 15
            continue
        ml, mu = 0, 15
        while mu - ml > 1:
            mav = (ml + mu) // 2
            if x < KVALUES[mav]:
                mu = mav
            else:
                ml = mav
        out[i] = mu - 1 if np.float32(x - KVALUES[mu - 1]) < np.float32(KVALUES[mu] - x) else mu
    return out


def test_iq4_best_index_equals_the_c_search_near_every_midpoint_and_at_random():
    from quantkit.gguf.iquants import MIDPOINTS, best_index

    near = []
    for m in MIDPOINTS:  # 400 consecutive float32 values around each midpoint, the midpoint itself included
        bits = np.abs(np.float32(m)).view(np.int32)
        near.append((bits + np.arange(-200, 200, dtype=np.int32)).view(np.float32) * np.sign(np.float32(m)))
    rng = np.random.default_rng(5)
    wide = (rng.standard_normal(20000) * 10.0 ** rng.integers(-6, 4, 20000)).astype(np.float32)
    v = np.concatenate([*near, wide, np.array([-np.inf, np.inf, 0.0, -0.0, -127, 113, 1e30], np.float32)])
    assert np.array_equal(best_index(v), c_best_index(v))


# llama-quantize file type -> the block type it writes with --pure (IQ2_S's blocks come from the IQ2_M file type):
# quantkit's reader and decoder on llama.cpp's own files of the lattice types and of the decode-only types
LLAMA_FILE_FTYPES = {"IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS",
                      "IQ3_S": "IQ3_S", "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0"}


@pytest.mark.parametrize("ftype", LLAMA_FILE_FTYPES)
def test_low_bit_types_read_from_llama_quantize_files(tmp_path, oracle_tensors, ftype):
    """llama.cpp's own files of the lattice and ternary types: quantkit's reader and dequantizer give gguf-py's
    values bit for bit, and they are close to the weights."""
    from quantkit.gguf.imatrix import write_imatrix
    from quantkit.gguf.reader import parse_gguf
    from quantkit.kernels.ggml_ref import dequantize_rows

    tools = require_llamacpp("llama-quantize")
    nano, _ = oracle_tensors
    width = next(iter(nano.values())).shape[1]
    src = tmp_path / "f32.gguf"
    write_f32_gguf(src, nano, width)
    imx = write_imatrix(tmp_path / "imatrix.gguf", synthetic_imatrix(nano, 0))
    type_name = LLAMA_FILE_FTYPES[ftype]
    ref = llama_quantize(tools, src, tmp_path / f"{ftype}.gguf", ftype, imatrix=imx)
    ours = parse_gguf(tmp_path / f"{ftype}.gguf")
    for name, x in nano.items():
        info = ours.tensors[name]
        assert info.type_name == type_name == ref[name].tensor_type.name
        raw = np.memmap(ours.path, np.uint8, "r", info.offset, (info.nbytes,)).reshape(x.shape[0], -1)
        got = dequantize_rows(torch.from_numpy(np.array(raw)), type_name).numpy()
        want = gguf_dequantize(np.asarray(ref[name].data), GGMLQuantizationType[type_name]).reshape(x.shape)
        assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32)), name
        rel = np.linalg.norm(got - x) / np.linalg.norm(x)
        assert rel < 0.9, f"{name}: relative error {rel:.2f}"


def test_every_low_bit_type_is_checked_against_a_llama_cpp_file():
    from quantkit.ggml_types import DECODE_ONLY_TYPES

    lattice = [t for t in I_TYPES if not t.startswith("IQ4")]
    assert sorted(LLAMA_FILE_FTYPES.values()) == sorted([*lattice, *DECODE_ONLY_TYPES])
