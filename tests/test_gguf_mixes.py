"""quantkit's GGUF mixes choose the same per-tensor types as llama-quantize (not --pure)."""

import subprocess

import numpy as np
import pytest

from quantkit.gguf.convert import write_gguf
from quantkit.errors import SchemeError
from quantkit.gguf.mixes import FILE_TYPES, check_imatrix, data_bytes, tensor_types, use_more_bits
from quantkit.gguf.reader import parse_gguf
from quantkit.model import arch
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.config import ModelConfig
from quantkit.testing import NANO_PATH, make_random_checkpoint
from tests.conftest import require_llamacpp

QUANT_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
               "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "IQ4_NL", "IQ4_XS"]
# the mixes llama-quantize writes only with an imatrix (some of their tensors need one), and those it writes either way
IMATRIX_MIXES = ["Q2_K_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
LATTICE_MIXES = ["IQ3_M", "IQ3_S"]


def _llamacpp_types(tool, src, out, mix, extra=()):
    subprocess.run([str(tool), *extra, str(src), str(out), mix, "2"], check=True, capture_output=True)
    return {arch.from_gguf(n): i.type_name for n, i in parse_gguf(out).tensors.items()}


@pytest.fixture(scope="module")
def nano_f32(nano_path, tmp_path_factory):
    return write_gguf(open_checkpoint(nano_path), tmp_path_factory.mktemp("mix") / "nano-F32.gguf", "F32",
                      progress=False)


@pytest.mark.parametrize("mix", QUANT_MIXES)
def test_mix_matches_llama_quantize_on_nano(nano_f32, tmp_path, mix):
    tools = require_llamacpp("llama-quantize")
    theirs = _llamacpp_types(tools["llama-quantize"], nano_f32, tmp_path / f"{mix}.gguf", mix)
    assert tensor_types(ModelConfig.from_file(NANO_PATH / "config.json"), mix) == theirs


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K", "Q4_0", "IQ4_XS", "IQ4_NL"])
def test_fallbacks_for_rows_not_multiple_of_256_match_llama_quantize(tmp_path, mix):
    """hidden 320 / ffn 640: rows of 320 and 640 elements (not multiples of 256) take llama.cpp's fallback types."""
    tools = require_llamacpp("llama-quantize")
    src = make_random_checkpoint(tmp_path / "src", layout="hf-single", hidden=320, intermediate=640, heads=4,
                                 kv_heads=2, layers=2)
    ckpt = open_checkpoint(src)
    f32 = write_gguf(ckpt, tmp_path / "f32.gguf", "F32", progress=False)
    theirs = _llamacpp_types(tools["llama-quantize"], f32, tmp_path / "q.gguf", mix)
    ours = tensor_types(ckpt.config, mix)
    assert ours == theirs
    if mix != "Q4_0":
        assert set(ours.values()) & {"Q4_0", "Q5_0", "Q5_1", "Q8_0"}, "no fallback exercised"


def _imatrix_for(tmp_path, f32_gguf, seed=0):
    """A synthetic importance matrix covering every 2-D tensor of `f32_gguf`."""
    from quantkit.gguf.imatrix import write_imatrix
    from tests.test_gguf_quants import synthetic_imatrix

    shapes = {n: np.zeros((1, i.shape[-1])) for n, i in parse_gguf(f32_gguf).tensors.items() if len(i.shape) == 2}
    return write_imatrix(tmp_path / "imatrix.gguf", synthetic_imatrix(shapes, seed))


@pytest.mark.parametrize("mix", [*IMATRIX_MIXES, *LATTICE_MIXES, "IQ4_XS", "Q4_0"])
def test_imatrix_mixes_match_llama_quantize_on_nano(nano_f32, tmp_path, mix):
    tools = require_llamacpp("llama-quantize")
    imx = _imatrix_for(tmp_path, nano_f32)
    theirs = _llamacpp_types(tools["llama-quantize"], nano_f32, tmp_path / f"{mix}.gguf", mix,
                             extra=["--imatrix", str(imx)])
    assert tensor_types(ModelConfig.from_file(NANO_PATH / "config.json"), mix, has_imatrix=True) == theirs


@pytest.mark.parametrize("mix", [*LATTICE_MIXES, "IQ3_XXS"])
def test_lattice_mixes_without_imatrix_match_llama_quantize(tmp_path, mix):
    """Without an imatrix (and on a model without GQA, where attention V follows the mix), on rows of 320/640
    that fall back to IQ4_NL / Q4_0 / Q8_0. IQ3_XXS needs one: both tools refuse it, naming a tensor."""
    tools = require_llamacpp("llama-quantize")
    src = make_random_checkpoint(tmp_path / "src", layout="hf-single", hidden=512, intermediate=640, heads=4,
                                 kv_heads=4, layers=8)
    ckpt = open_checkpoint(src)
    f32 = write_gguf(ckpt, tmp_path / "f32.gguf", "F32", progress=False)
    ours = tensor_types(ckpt.config, mix)
    if mix == "IQ3_XXS":
        with pytest.raises(SchemeError, match=r"blk\.0\.attn_q\.weight: type IQ2_S \(GGUF type IQ3_XXS\) needs"):
            check_imatrix(ours, mix, has_imatrix=False)
        proc = subprocess.run([str(tools["llama-quantize"]), str(f32), str(tmp_path / "q.gguf"), mix, "2"],
                              capture_output=True, text=True)
        assert proc.returncode != 0
        return
    theirs = _llamacpp_types(tools["llama-quantize"], f32, tmp_path / "q.gguf", mix)
    assert ours == theirs
    assert {"IQ3_S", "IQ4_NL"} <= set(ours.values())


def test_pure_matches_llama_quantize_pure(nano_f32, tmp_path):
    tools = require_llamacpp("llama-quantize")
    theirs = _llamacpp_types(tools["llama-quantize"], nano_f32, tmp_path / "p.gguf", "Q4_K_M", extra=["--pure"])
    cfg = parse_gguf(nano_f32)
    from quantkit.gguf.reader import config_from_kv

    assert tensor_types(config_from_kv(cfg.kv, cfg.tensors, nano_f32), "Q4_K_M", pure=True) == theirs


def test_mistral_7b_histograms_and_sizes():
    """Mistral-7B (formats/gguf.md, file types): Q4_K_M {F32 65, Q4_K 193, Q6_K 33}, 4,367,704,064 data bytes;
    Q5_K_M 5,130,674,176."""
    cfg = ModelConfig()  # Mistral-7B defaults
    for mix, default, size in (("Q4_K_M", "Q4_K", 4_367_704_064), ("Q5_K_M", "Q5_K", 5_130_674_176)):
        types = tensor_types(cfg, mix)
        hist = {t: list(types.values()).count(t) for t in set(types.values())}
        assert hist == {"F32": 65, default: 193, "Q6_K": 33}
        assert data_bytes(cfg, types) == size
    assert data_bytes(cfg, tensor_types(cfg, "Q8_0")) == 7_695_122_432
    assert data_bytes(cfg, tensor_types(cfg, "F16")) == 14_483_996_672


def test_use_more_bits_for_32_layers():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_every_mix_has_a_file_type():
    assert set(QUANT_MIXES) | set(IMATRIX_MIXES) | set(LATTICE_MIXES) | {"F32"} == set(FILE_TYPES)


def test_q4_0_with_imatrix_promotes_the_first_ffn_down_layers():
    cfg = ModelConfig()  # 32 layers: n/8 = 4
    types = tensor_types(cfg, "Q4_0", has_imatrix=True)
    downs = [types[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(32)]
    assert downs == ["Q4_1"] * 4 + ["Q4_0"] * 28
    assert all(t == "Q4_0" for n, t in tensor_types(cfg, "Q4_0").items() if "down_proj" in n)
