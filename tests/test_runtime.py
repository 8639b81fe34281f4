"""The runtime (QuantLinear / GGMLLinear model + generator) against the dequantized reference model."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from quantkit.errors import DeviceError, FormatError, GenerationError
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.reference import Transformer
from quantkit.quant.rtn import quantize_rtn
from quantkit.quant.scheme import PRESETS, Scheme
from quantkit.tensors import GGMLTensor, QuantTensor
from quantkit.runtime.generate import Generator, SamplingParams, generate, sample
from quantkit.runtime.model import Source, load_model, open_source
from quantkit.runtime.qlinear import GGMLLinear, QuantLinear
from quantkit.testing import make_random_checkpoint

PROMPT = [1, 6843, 3714, 264, 727, 28725, 736, 403, 264]  # "<s> Once upon a time, there was a" (any ids work)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference_from(source: Source) -> Transformer:
    """The dequantized-reference model: every stored tensor expanded to fp32, in the plain reference module."""
    cfg = source.config
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    for name in model.state_dict():
        stored = "model.embed_tokens.weight" if name not in source.names and name == "lm_head.weight" else name
        t = source.get(stored)
        state[name] = t.dequantize(torch.float32) if isinstance(t, (QuantTensor, GGMLTensor)) else t.float()
    model.load_state_dict(state, assign=True)
    return model.eval()


def rtn_source(path, schemes) -> Source:
    """A Source serving RTN QuantTensors (scheme chosen per linear by `schemes(name)`) — no writer involved."""
    ckpt = open_checkpoint(path)
    cache = {}

    def get(name):
        if name not in cache:
            t = ckpt.get_tensor(name)
            scheme = schemes(name) if t.dim() == 2 and "proj" in name else None
            cache[name] = quantize_rtn(t, scheme) if scheme else t
            if scheme and scheme.act_order:  # act-order style g_idx (codes are re-grouped, values stay exact)
                qt = cache[name]
                g = torch.Generator().manual_seed(len(name))
                perm = torch.randperm(qt.in_features, generator=g)
                qt.g_idx = (torch.arange(qt.in_features) // qt.group_size)[perm].to(torch.int32)
        return cache[name]

    return Source(ckpt.path, "rtn", ckpt.config, ckpt.tensor_names(), get, ckpt.tokenizer_path)


def mixed_schemes(name):
    if "down_proj" in name:
        return Scheme(8, -1, True)
    if "k_proj" in name or "v_proj" in name:
        return Scheme(4, 32, False, act_order=True)
    if "gate" in name:
        return Scheme(4, 64, False)
    return PRESETS["w4a16-g128"]


def test_float_source_matches_reference_exactly(nano_path):
    ref = Transformer.from_checkpoint(open_checkpoint(nano_path), torch.float32)
    model = load_model(nano_path)
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert model.runtime_info["format"] in ("float", "hf")  # full-precision reader (formats/) or open_checkpoint


def test_rtn_quant_tensors_logits_match_dequantized_reference(nano_path):
    source = rtn_source(nano_path, mixed_schemes)
    model = load_model(source)
    assert isinstance(model.model.layers[0].self_attn.k_proj, QuantLinear)
    assert model.model.layers[0].self_attn.k_proj.perm is not None  # act-order path exercised
    ref = reference_from(source)
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert rel(got, want) <= 1e-3


def test_generator_kv_cache_matches_full_forward(nano_path):
    model = load_model(rtn_source(nano_path, lambda n: PRESETS["w4a16-g32"]))
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        full, full_b = model(x), model(x[:, 2:6])
    gen = Generator(model, max_len=32)
    first = gen.forward(x[:, :5], 0)
    assert rel(first, full[:, 4]) <= 1e-5
    for pos in range(5, len(PROMPT)):
        step = gen.decode_step(x[0, pos:pos + 1], pos)
        assert rel(step, full[:, pos]) <= 1e-4
    # two generators on one model, interleaved: each runs on its own caches
    a, b = Generator(model, max_len=32), Generator(model, max_len=16)
    a.forward(x[:, :5], 0)
    b.forward(x[:, 2:5], 0)  # other tokens at the same positions
    step_a, step_b = a.decode_step(x[0, 5:6], 5), b.decode_step(x[0, 5:6], 3)
    assert rel(step_a, full[:, 5]) <= 1e-4 and rel(step_b, full_b[:, 3]) <= 1e-4


def test_generator_borrows_the_model_caches(nano_path):
    """A generator attaches its KV caches to the model while it runs and gives them back: the model's own forward
    stays the plain full forward around generation (even on a sequence longer than the generator's cache)."""
    model = load_model(nano_path)
    x = torch.tensor([PROMPT * 3])
    with torch.no_grad():
        full = model(x)
    gen = Generator(model, max_len=16)
    assert model.kv_caches is None
    gen.generate(PROMPT[:4], 4)
    assert model.kv_caches is None and gen.caches[0].k.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(model(x), full)
    gen.decode_step(torch.tensor([PROMPT[4]]), 4)  # the hot path leaves them attached
    assert model.kv_caches is gen.caches
    assert [layer.self_attn.kv_cache for layer in model.model.layers] == gen.caches


def test_greedy_generation_is_deterministic_and_seeded_sampling_reproducible(nano_path):
    model = load_model(nano_path)
    a = generate(model, PROMPT, 12)
    b = generate(model, PROMPT, 12)
    assert a.tokens == b.tokens and len(a.tokens) == 12
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=7)
    c = generate(model, PROMPT, 12, params)
    d = generate(model, PROMPT, 12, params)
    assert c.tokens == d.tokens
    assert generate(model, PROMPT, 12, SamplingParams(temperature=1.0, top_k=1, seed=3)).tokens == a.tokens


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.9]])
    assert sample(logits, SamplingParams()).tolist() == [2]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(50)}
    assert draws == {2, 3}
    draws = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.4), g)) for _ in range(50)}
    assert draws == {2}  # the top token alone holds >= 40% of the mass
    with pytest.raises(GenerationError):
        SamplingParams(top_p=0)


def test_stop_at_eos(nano_path):
    model = load_model(nano_path)
    greedy = generate(model, PROMPT, 6).tokens
    result = generate(model, PROMPT, 20, eos_id=greedy[2])
    assert result.tokens == greedy[:3] and result.stop_reason == "eos"


def test_chat_prefix_reuse_gives_same_tokens(nano_path):
    model = load_model(nano_path)
    gen = Generator(model, max_len=64)
    first = gen.generate(PROMPT, 5)
    follow = PROMPT + first.tokens + [1, 523]
    again = gen.generate(follow, 5)
    assert gen.last.reused_tokens > len(PROMPT)
    assert again.tokens == Generator(model, max_len=64).generate(follow, 5).tokens


def test_bad_input_errors(nano_path, tmp_path, monkeypatch):
    model = load_model(nano_path)
    with pytest.raises(GenerationError, match="context"):
        Generator(model, max_len=8).generate(PROMPT, 4)
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(FormatError):
        load_model(bad)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="GPU"):
            load_model(nano_path, backend="triton")
        with pytest.raises(DeviceError, match="CUDA"):
            load_model(nano_path, device="cuda")


def test_triton_backend_matches_torch_backend_in_interpreter(tmp_path):
    """Whole (tiny) model through the Triton kernels (TRITON_INTERPRET=1 on CPU) vs the torch backend."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    path = make_random_checkpoint(tmp_path / "m", hidden=128, layers=1, heads=4, kv_heads=2, intermediate=256,
                                  vocab=96)
    source = rtn_source(path, mixed_schemes)
    device = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    a = load_model(source, device=device, backend="torch")
    b = load_model(source, device=device, backend="triton")
    x = torch.tensor([[1, 5, 9, 13, 40]], device=device)
    with torch.no_grad():
        assert rel(b(x), a(x)) <= 1e-4
        assert rel(b(x[:, :1]), a(x[:, :1])) <= 1e-4  # decode-sized (gemv kernel)
    with torch.no_grad():
        full = a(x)
    # + the Triton RMSNorm / RoPE-cache kernels of the GPU path
    gen = Generator(b, max_len=8, fused_kernels=True, cuda_graph=False)
    assert rel(gen.forward(x[:, :4], 0), full[:, 3]) <= 1e-4
    assert rel(gen.decode_step(x[0, 4:5], 4), full[:, 4]) <= 1e-4
    uniform = load_model(rtn_source(path, lambda n: PRESETS["w4a16-g32"]), device=device, backend="triton")
    assert uniform.model.layers[0].self_attn.qkv is not None  # so the fused RoPE + cache kernel runs
    assert uniform.model.layers[0].mlp.gate_up is not None  # and the SwiGLU kernel
    with torch.no_grad():
        full = uniform(x)
    gen = Generator(uniform, max_len=8, fused_kernels=True, cuda_graph=False)
    assert rel(gen.forward(x[:, :4], 0), full[:, 3]) <= 1e-4
    assert rel(gen.decode_step(x[0, 4:5], 4), full[:, 4]) <= 1e-4


def test_ggml_linear_torch_and_triton_match_dequantized(tmp_path):
    pytest.importorskip("gguf")
    from quantkit.gguf.quants import quantize_ggml

    w = torch.randn(40, 512)
    for type_name in ("Q4_K", "Q6_K", "Q8_0", "Q5_0"):  # Q5_0: no Triton kernel -> dequantize fallback
        t = quantize_ggml(w, type_name)
        x = torch.randn(3, 512)
        want = x @ t.dequantize().t()
        for backend in ("torch", "triton"):
            got = GGMLLinear.from_ggml_tensor(t, backend)(x)
            assert rel(got, want) <= 1e-5, (type_name, backend)


@pytest.fixture(scope="module")
def quantized_outputs(tmp_path_factory, nano_path):
    """mistral-nano written by the real writers: GPTQ (w4 g128), AWQ (asym), compressed-tensors (w8), GGUF Q4_K_M."""
    from quantkit.pipeline.export import export_rtn

    import quantkit

    out = tmp_path_factory.mktemp("q")
    paths = {}
    for fmt, preset in (("gptq", "w4a16-g128"), ("awq", "w4a16-g128-asym"), ("compressed-tensors", "w8a16")):
        paths.update(export_rtn(nano_path, {fmt: out / fmt}, PRESETS[preset]))  # a broken writer fails, never skips
    paths["gguf"] = quantkit.quantize(nano_path, out / "nano-Q4_K_M.gguf", gguf_type="Q4_K_M").paths["gguf"]
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors", "gguf"])
def test_each_format_logits_match_dequantized_reference(quantized_outputs, fmt):
    source = open_source(quantized_outputs[fmt])
    assert source.format == fmt
    model = load_model(source)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("GGMLLinear" if fmt == "gguf" else "QuantLinear") in kinds
    ref = reference_from(source)
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        assert rel(model(x), ref(x)) <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("which", ["source", "gptq", "gguf"])
def test_cli_generate_streams_text_and_reports_speed(quantized_outputs, nano_path, which, capfd):
    from quantkit.cli import main

    path = nano_path if which == "source" else quantized_outputs[which]
    main(["generate", str(path), "Once upon a time", "--max-tokens", "16"])
    out, err = capfd.readouterr()
    assert out.startswith("Once upon a time")
    words = out.split()
    assert len(words) >= 8 and sum(w.isalpha() for w in words) >= len(words) // 2  # readable-ish English
    assert "tok/s" in err


def test_cli_chat_reads_turns_from_stdin(nano_path, capfd, monkeypatch):
    import io

    from quantkit.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nTell me a story\n/exit\n"))
    main(["chat", str(nano_path), "--max-tokens", "8", "-v"])
    out, err = capfd.readouterr()
    assert len([line for line in out.splitlines() if line.strip()]) >= 1
    assert err.count("tok/s") >= 2


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU (run without TRITON_INTERPRET)")
def test_gpu_cuda_graph_decode_matches_eager(nano_path):
    model = load_model(rtn_source(nano_path, mixed_schemes), device="cuda", backend="triton", dtype=torch.float16)
    eager = Generator(model, max_len=48, cuda_graph=False).generate(PROMPT, 16)
    graph = Generator(model, max_len=48, cuda_graph=True).generate(PROMPT, 16)
    assert graph.tokens == eager.tokens
    ref = reference_from(rtn_source(nano_path, mixed_schemes)).cuda().half()
    x = torch.tensor([PROMPT], device="cuda")
    with torch.no_grad():
        assert rel(model(x).float(), ref(x).float()) <= 2e-2
