"""ggml's CPU activation rounding (quantkit.gguf.activations) against the gguf package's Q8_0 (ggml's scalar
reference) and against scalar numpy transcriptions of the C code that runs on x86 (quantize_row_q8_0 / q8_1 AVX
paths, quantize_row_q8_K_ref), element by element in float32."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from quantkit.errors import QuantkitError
from quantkit.ggml_types import f16_to_f32
from quantkit.gguf.activations import (GGMLNumericsLinear, VEC_DOT_TYPE, apply_ggml_numerics, block_mins,
                                       q8_0_blocks, q8_1_blocks, q8_K_blocks, quantize_activations)
from quantkit.gguf.quants import quantize_ggml

F32 = np.float32


def _rows(seed: int, n: int) -> torch.Tensor:
    """Activation-like rows: normal values, heavy outliers, a zero block, exact .5 ties and +-max ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, n, generator=g)
    x[1] *= torch.exp(2 * torch.randn(n, generator=g))  # wide dynamic range
    x[2, :32] = 0  # all-zero block (Q8_0) / zero prefix
    x[3] = torch.randint(-255, 256, (n,), generator=g).float() / 2  # halves; with |max| 127 every .5 is a tie
    x[3, ::32] = 127.0
    x[4] = -x[3]
    x[5, 7], x[5, 3] = 9.0, -9.0  # equal magnitudes, negative first
    return x


def _q8_0_x86_scalar(x: np.ndarray):
    """ggml-cpu/arch/x86/quants.c quantize_row_q8_0 (AVX2 branch), one float32 operation at a time."""
    codes, scales = [], []
    for b in x.reshape(-1, 32):
        amax = F32(0)
        for v in b:
            amax = max(amax, F32(abs(v)))
        d = F32(amax / F32(127))
        inv = F32(F32(127) / amax) if amax != 0 else F32(0)
        codes.append([int(np.clip(np.rint(F32(v * inv)), -128, 127)) for v in b])  # _mm256_round_ps: half to even
        scales.append(np.float16(d))
    return np.array(codes), np.array(scales)


def _q8_1_x86_scalar(x: np.ndarray):
    codes, scales = _q8_0_x86_scalar(x)
    sums = []
    for b, q in zip(x.reshape(-1, 32), codes):
        amax = max(F32(abs(v)) for v in b)
        d = F32(amax / F32(127))
        sums.append(np.float16(F32(d * F32(int(q.sum())))))
    return codes, scales, np.array(sums)


def _nearest_int(fval: np.float32) -> int:
    """ggml-quants.c nearest_int: add 1.5 * 2^23 in float32 and read the low mantissa bits."""
    val = np.array([F32(fval + F32(12582912.0))], dtype=np.float32).view(np.int32)[0]
    return int(val & 0x007FFFFF) - 0x00400000


def _q8_K_ref_scalar(x: np.ndarray):
    """ggml-quants.c quantize_row_q8_K_ref."""
    codes, scales = [], []
    for b in x.reshape(-1, 256):
        amax, mx = F32(0), F32(0)
        for v in b:
            if abs(v) > amax:
                amax, mx = F32(abs(v)), v
        if amax == 0:
            codes.append([0] * 256)
            scales.append(F32(0))
            continue
        iscale = F32(F32(-127) / mx)
        codes.append([min(127, _nearest_int(F32(iscale * v))) for v in b])
        scales.append(F32(F32(1) / iscale))
    return np.array(codes), np.array(scales, dtype=np.float32)


def test_q8_0_ref_rounding_bit_exact_with_gguf_package():
    x = _rows(0, 512)
    q, d = q8_0_blocks(x, rounding="ref")
    blocks = np.concatenate([d.numpy().astype(np.float16).view(np.uint8).reshape(-1, 2),
                             q.numpy().astype(np.int8).view(np.uint8).reshape(-1, 32)], axis=1)
    expected = quantize(x.numpy(), GGMLQuantizationType.Q8_0).reshape(-1, 34)
    np.testing.assert_array_equal(blocks, expected)


def test_q8_0_x86_matches_scalar_transcription():
    x = _rows(1, 256)
    q, d = q8_0_blocks(x)
    codes, scales = _q8_0_x86_scalar(x.numpy())
    np.testing.assert_array_equal(q.reshape(-1, 32).numpy().astype(np.int64), codes)
    np.testing.assert_array_equal(d.reshape(-1).numpy(), scales.astype(np.float32))


def test_x86_and_reference_rounding_differ_on_ties():
    """The AVX path rounds half to even with 127/amax; the scalar reference rounds half away with 1/(amax/127)."""
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5] + [0.0] * 28])
    x86 = quantize_activations(x, "Q8_0")[0, 1:4].tolist()
    ref = quantize_activations(x, "Q8_0", rounding="ref")[0, 1:4].tolist()
    assert x86 == [2.0, -4.0, 0.0] and ref == [3.0, -4.0, 1.0]


def test_q8_1_matches_scalar_transcription():
    x = _rows(2, 256)
    q, d, s = q8_1_blocks(x)
    codes, scales, sums = _q8_1_x86_scalar(x.numpy())
    np.testing.assert_array_equal(q.reshape(-1, 32).numpy().astype(np.int64), codes)
    np.testing.assert_array_equal(d.reshape(-1).numpy(), scales.astype(np.float32))
    np.testing.assert_array_equal(s.reshape(-1).numpy(), sums.astype(np.float32))


def test_q8_K_matches_scalar_transcription():
    x = _rows(3, 512)
    x[2] = 0  # an all-zero super-block row
    q, d = q8_K_blocks(x)
    codes, scales = _q8_K_ref_scalar(x.numpy())
    np.testing.assert_array_equal(q.reshape(-1, 256).numpy().astype(np.int64), codes)
    np.testing.assert_array_equal(d.reshape(-1).numpy(), scales)
    deq = quantize_activations(x, "Q8_K").reshape(-1, 256).numpy()
    np.testing.assert_array_equal(deq, (codes * scales[:, None]).astype(np.float32))


def test_float_vec_dot_types_round_to_nearest_even():
    x = torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8])
    assert quantize_activations(x, "F16").tolist() == [1.0, 1 + 2 * 2.0 ** -10, 1 + 2.0 ** -8]
    assert quantize_activations(x, "BF16").tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(quantize_activations(x, "F32"), x)


def test_vec_dot_types_follow_ggml_cpu_type_traits():
    assert {t: VEC_DOT_TYPE[t] for t in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1", "Q2_K", "Q6_K", "F16", "BF16")} == {
        "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1", "Q2_K": "Q8_K",
        "Q6_K": "Q8_K", "F16": "F16", "BF16": "BF16"}
    with pytest.raises(QuantkitError, match="multiple of 256"):
        quantize_activations(torch.ones(2, 96), "Q8_K")


def _q4_1_dot_reference(wt, x: torch.Tensor) -> np.ndarray:
    """ggml_vec_dot_q4_1_q8_1 in float64: sum over blocks of d_w*d_y*sum(q_w*q_y) + m_w*s_y (from the block bytes)."""
    blocks = wt.data.reshape(wt.shape[0], -1, 20)
    dw = f16_to_f32(blocks[..., 0:2]).astype(np.float64)
    mw = f16_to_f32(blocks[..., 2:4]).astype(np.float64)
    qs = blocks[..., 4:20]
    qw = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64)  # [out, nb, 32]
    qy, dy, sy = (t.numpy().astype(np.float64) for t in q8_1_blocks(x))  # [T, nb, 32], [T, nb, 1], [T, nb, 1]
    isum = np.einsum("onj,tnj->ton", qw, qy)
    return (dw[None] * dy[:, None, :, 0] * isum + mw[None] * sy[:, None, :, 0]).sum(-1)


@pytest.mark.parametrize("weight_type", ["Q4_1", "Q5_1"])
def test_q8_1_product_includes_fp16_block_sum(weight_type):
    """Q4_1/Q5_1 x Q8_1: the weight min multiplies fp16(d*sum(q)), which GGMLNumericsLinear reproduces."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 128, generator=g) * 0.05 + 0.02
    x = torch.randn(8, 128, generator=g) * 3
    wt = quantize_ggml(w, weight_type)
    layer = GGMLNumericsLinear(wt.dequantize(torch.float32), weight_type, block_mins(wt), accumulate=torch.float64)
    y = layer(x).double().numpy()
    no_correction = torch.nn.functional.linear(quantize_activations(x, "Q8_1").double(), layer.weight.double()).numpy()
    if weight_type == "Q4_1":
        expected = _q4_1_dot_reference(wt, x)
        scale = np.abs(expected).max()
        assert np.abs(y - expected).max() <= 1e-6 * scale
        assert np.abs(no_correction - expected).max() > 10 * np.abs(y - expected).max()
    assert block_mins(wt).shape == (16, 4)
    assert not np.allclose(y, no_correction, rtol=0, atol=1e-7)


def test_apply_swaps_every_linear_with_its_tensor_type():
    from quantkit.model.config import ModelConfig
    from quantkit.model.reference import Transformer

    cfg = ModelConfig.from_hf_dict({"architectures": ["MistralForCausalLM"], "hidden_size": 256,
                                    "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "vocab_size": 64, "rms_norm_eps": 1e-5,
                                    "rope_theta": 10000.0, "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        before = model(tokens)
    types = {name: "F32" for name in model.state_dict() if name != "lm_head.weight"}
    types["model.layers.0.mlp.down_proj.weight"] = "Q8_0"
    types["model.embed_tokens.weight"] = "Q6_K"  # tied head: multiplies by token_embd
    apply_ggml_numerics(model, types)
    kinds = {n: m.vec_dot_type for n, m in model.named_modules() if isinstance(m, GGMLNumericsLinear)}
    assert len(kinds) == 8 and kinds["lm_head"] == "Q8_K" and kinds["model.layers.0.mlp.down_proj"] == "Q8_0"
    assert kinds["model.layers.0.self_attn.q_proj"] == "F32"
    with torch.no_grad():
        after = model(tokens)
    assert 0 < (after - before).abs().max() < 0.1 * before.abs().max()
    with pytest.raises(QuantkitError, match="block mins"):
        apply_ggml_numerics(Transformer(cfg).eval(), {**types, "model.layers.0.mlp.up_proj.weight": "Q4_1"})


# ---- against llama.cpp's own matrix products ----

# quantkit linear -> (llama.cpp graph tensor holding its input, the one holding its output); {l} = layer
_MATMULS = {
    "self_attn.q_proj": ("attn_norm-{l}", "Qcur-{l}"), "self_attn.k_proj": ("attn_norm-{l}", "Kcur-{l}"),
    "self_attn.v_proj": ("attn_norm-{l}", "Vcur-{l}"), "self_attn.o_proj": ("kqv_out-{l}", "attn_out-{l}"),
    "mlp.gate_proj": ("ffn_norm-{l}", "ffn_gate-{l}"), "mlp.up_proj": ("ffn_norm-{l}", "ffn_up-{l}"),
    "mlp.down_proj": ("ffn_swiglu-{l}", "ffn_out-{l}"),
}
FAST_DUMP_TYPES = ["Q4_K_M", "Q4_1"]
SLOW_DUMP_TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q5_K_M", "F16", "BF16"]


@pytest.fixture(scope="module")
def dump_tool(tmp_path_factory):
    """tests/tools/llamacpp_dump_tensors.cpp compiled against the static llama.cpp build (skips without one)."""
    import shutil
    import subprocess

    from quantkit.testing import LLAMACPP_DIR, REPO_ROOT

    libs = [LLAMACPP_DIR / "build" / p for p in ("src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a",
                                                 "ggml/src/libggml-base.a")]
    compiler = shutil.which("c++")
    if compiler is None or not all(p.exists() for p in libs):
        pytest.skip("needs a C++ compiler and llama.cpp's static libraries (scripts/build_llamacpp.sh)")
    exe = tmp_path_factory.mktemp("tool") / "llamacpp_dump_tensors"
    proc = subprocess.run([compiler, "-O2", "-std=c++17", str(REPO_ROOT / "tests/tools/llamacpp_dump_tensors.cpp"),
                           f"-I{LLAMACPP_DIR / 'include'}", f"-I{LLAMACPP_DIR / 'ggml/include'}", "-o", str(exe),
                           *map(str, libs), "-fopenmp", "-lpthread", "-ldl"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build the llama.cpp dump tool against this llama.cpp: {proc.stderr[-500:]}")
    return exe


def _dumped(directory, name: str, rows: int) -> torch.Tensor:
    (path,) = [p for p in directory.glob(f"{name}__*.f32") if p.stem.rsplit("__", 1)[0] == name]
    return torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(rows, -1))


def _llamacpp_matmul_errors(dump_tool, nano_path, ftype, tmp_path):
    import subprocess

    from quantkit.gguf.convert import write_gguf
    from quantkit.gguf.reader import GGUFModel
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.model.tokenizer import load_tokenizer
    from quantkit.tensors import GGMLTensor
    from quantkit.testing import REPO_ROOT

    ckpt = open_checkpoint(nano_path)
    gguf = write_gguf(ckpt, tmp_path / f"nano-{ftype}.gguf", ftype, progress=False)
    text = (REPO_ROOT / "calib" / "prose.txt").read_text()[:2000]
    tokens = np.array(load_tokenizer(ckpt.tokenizer_path).encode(text, bos=True)[:64], dtype="<i4")
    tokens.tofile(tmp_path / "tokens.i32")
    out = tmp_path / "dump"
    out.mkdir()
    subprocess.run([str(dump_tool), str(gguf), str(tmp_path / "tokens.i32"), str(out)], check=True,
                   capture_output=True, timeout=600)
    model = GGUFModel(gguf)
    rows = len(tokens)
    pairs = {f"model.layers.{l}.{m}": (i.format(l=l), o.format(l=l))
             for l in range(ckpt.config.num_hidden_layers) for m, (i, o) in _MATMULS.items()}
    pairs["lm_head"] = ("result_norm", "result_output")
    errors = {}
    for name, (inp, outp) in pairs.items():
        info = model.names[name + ".weight"]  # file row order (Q/K interleaved), as llama.cpp multiplies
        wt = GGMLTensor(info.type_name, info.shape, np.array(model.raw(name + ".weight")))
        layer = GGMLNumericsLinear(wt.dequantize(torch.float32), info.type_name, block_mins(wt),
                                   accumulate=torch.float64)
        x, y = _dumped(out, inp, rows), _dumped(out, outp, rows).double()
        with torch.no_grad():
            ggml = layer(x).double()
            plain = torch.nn.functional.linear(x.double(), layer.weight.double())
        scale = y.abs().max().item()
        errors[name] = (info.type_name, (ggml - y).abs().max().item() / scale, (plain - y).abs().max().item() / scale)
    return errors


def _check_llamacpp_matmuls(dump_tool, nano_path, ftype, tmp_path):
    errors = _llamacpp_matmul_errors(dump_tool, nano_path, ftype, tmp_path)
    worst = max(errors.items(), key=lambda kv: kv[1][1])
    print(ftype, "worst ggml-numerics relative error", worst)
    for name, (wtype, ggml, plain) in errors.items():
        # llama.cpp's product equals the dequantized weight times the rounded activations, up to float32 sums
        assert ggml <= 2e-6, (name, wtype, ggml, plain)
        # ...and not the unrounded activations: the rounding is what makes the difference
        assert plain >= 20 * max(ggml, 1e-7), (name, wtype, ggml, plain)


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", FAST_DUMP_TYPES)
def test_llamacpp_matmuls_equal_ggml_numerics(dump_tool, nano_path, ftype, tmp_path):
    _check_llamacpp_matmuls(dump_tool, nano_path, ftype, tmp_path)


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("ftype", SLOW_DUMP_TYPES)
def test_llamacpp_matmuls_equal_ggml_numerics_all_types(dump_tool, nano_path, ftype, tmp_path):
    _check_llamacpp_matmuls(dump_tool, nano_path, ftype, tmp_path)
