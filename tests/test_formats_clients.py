"""Real clients: transformers loads quantkit's GPTQ / AWQ / compressed-tensors outputs of mistral-nano on CPU and
computes the logits quantkit's dequantized model computes; quantkit reads GPTQModel-written checkpoints and
computes the logits GPTQModel computes."""

from pathlib import Path

import pytest
import torch

from quantkit.formats.base import read_checkpoint
from quantkit.formats.clients import missing_client, transformers_logits_fn
from quantkit.formats.dequantized import dequantized_model
from quantkit.pipeline.export import export_rtn
from quantkit.quant.scheme import PRESETS

pytestmark = pytest.mark.compat
FIXTURES = Path(__file__).parent / "fixtures"
PROMPT = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28705, 13, 1014, 349, 264, 1369, 302, 272, 1526]])


def rel_err(test, ref):
    return float((test - ref).abs().max() / ref.abs().max())


def need(fmt):
    reason = missing_client(fmt)
    if reason:
        pytest.skip(reason)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,preset", [("gptq", "w4a16-g128"), ("gptq", "w4a16-g128-asym"),
                                        ("awq", "w4a16-g128-asym"), ("compressed-tensors", "w4a16-g128"),
                                        ("compressed-tensors", "w8a16")])
def test_transformers_loads_nano_and_matches_quantkit(nano_path, tmp_path, fmt, preset):
    need(fmt)
    out = export_rtn(nano_path, {fmt: tmp_path / fmt}, PRESETS[preset])[fmt]
    with torch.no_grad():
        ours = dequantized_model(out)(PROMPT)
    client = transformers_logits_fn(out)(PROMPT)
    assert client.shape == ours.shape
    assert rel_err(client, ours) <= 1e-3


@pytest.mark.parametrize("name", ["gptqmodel-sym-g32", "gptqmodel-asym-actorder-g32"])
def test_quantkit_reads_gptqmodel_checkpoint(name):
    """GPTQModel 7.6 wrote these (scripts/make_gptqmodel_fixture.py): v1 zeros, sym and asym, act-order g_idx."""
    path = FIXTURES / name
    ckpt = read_checkpoint(path)
    assert ckpt.format == "gptq"
    q = ckpt.get("model.layers.0.self_attn.q_proj.weight")
    assert q.bits == 4 and q.group_size == 32
    if "actorder" in name:
        assert q.has_act_order and not q.symmetric
    saved = torch.load(path / "reference_logits.pt")
    prompt = torch.tensor(saved["prompt_ids"])
    with torch.no_grad():
        ours = dequantized_model(ckpt)(prompt)
    # GPTQModel's own CPU forward (recorded when the fixture was made) rounds inside its kernel: ~2e-3
    assert rel_err(ours, saved["logits"]) <= 1e-2
    if missing_client("gptq") is None:
        # transformers loading the same GPTQModel checkpoint agrees to fp32 precision
        assert rel_err(ours, transformers_logits_fn(path)(prompt)) <= 1e-3


def test_gptqmodel_dequantizes_exactly_what_quantkit_reads():
    """Every linear: GPTQModel's own dequantize_weight() equals quantkit's QuantTensor.dequantize() bit for bit."""
    need("gptq")
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel

    for name in ("gptqmodel-sym-g32", "gptqmodel-asym-actorder-g32"):
        path = FIXTURES / name
        ckpt = read_checkpoint(path)
        model = GPTQModel.load(str(path), device="cpu", dtype=torch.float32).model
        checked = 0
        for mod_name, module in model.named_modules():
            if hasattr(module, "dequantize_weight") and mod_name + ".weight" in ckpt:
                theirs = module.dequantize_weight().T.float()
                assert torch.equal(theirs, ckpt.get(mod_name + ".weight").dequantize()), (name, mod_name)
                checked += 1
        assert checked == 14, (name, checked)


def write_with_compressed_tensors(directory, preset: str, group_size: int):
    """A checkpoint saved the way llm-compressor saves one: compressed-tensors' own apply_quantization_config,
    calculate_qparams (min-max), ModelCompressor.compress_model, save_pretrained, update_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
                        tie_word_embeddings=False)
    model = MistralForCausalLM(cfg).to(torch.bfloat16)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None and hasattr(module, "weight_scale"):
            w = module.weight.data.float()
            groups = w.reshape(w.shape[0], -1, group_size)
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), module.quantization_scheme.weights)
            module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    return directory


def library_decompress(path, prefix, scheme_dict):
    """compressed-tensors' own PackedQuantizationCompressor.decompress of one module (float weight)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        state = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    return PackedQuantizationCompressor.decompress(state, QuantizationScheme.model_validate(scheme_dict))["weight"]


@pytest.mark.parametrize("preset", ["W4A16", "W4A16_ASYM"])
def test_quantkit_reads_compressed_tensors_library_output(tmp_path, preset):
    """What llm-compressor writes (through compressed-tensors' compressor) reads back exactly."""
    need("compressed-tensors")
    path = write_with_compressed_tensors(tmp_path / "llmc", preset, 32)
    ckpt = read_checkpoint(path)
    assert ckpt.format == "compressed-tensors"
    scheme = ckpt.metadata["quantization_config"]["config_groups"]["group_0"]
    for name in ckpt.names:
        q = ckpt.get(name)
        if isinstance(q, torch.Tensor):
            continue
        assert q.bits == 4 and q.group_size == 32 and q.symmetric == (preset == "W4A16")
        assert q.scales.dtype == torch.bfloat16
        theirs = library_decompress(path, name[: -len(".weight")], scheme)
        assert torch.equal(theirs, q.dequantize(theirs.dtype)), name  # same bf16 arithmetic, same bits
    prompt = torch.tensor([[1, 17, 250, 3, 99, 400, 12, 77, 5, 301, 222, 8]])
    with torch.no_grad():
        ours = dequantized_model(ckpt)(prompt)
    if preset == "W4A16":
        assert rel_err(ours, transformers_logits_fn(path)(prompt)) <= 1e-3
    else:
        # transformers 5.24 + compressed-tensors 0.20 cannot load packed zero points, not even the library's own
        # output: it expects weight_zero_point [out, groups] (see formats/compressed-tensors.md)
        with pytest.raises(RuntimeError, match="mismatch"):
            transformers_logits_fn(path)


def test_quantkit_reads_gptqmodel_awq_checkpoint():
    """GPTQModel 7.6 wrote AutoAWQ's GEMM layout (zero_point false: symmetric, qzeros all 8)."""
    path = FIXTURES / "gptqmodel-awq-gemm-g32"
    ckpt = read_checkpoint(path)
    assert ckpt.format == "awq"
    q = ckpt.get("model.layers.0.mlp.down_proj.weight")
    assert q.bits == 4 and q.group_size == 32 and q.symmetric
    saved = torch.load(path / "reference_logits.pt")
    prompt = torch.tensor(saved["prompt_ids"])
    with torch.no_grad():
        ours = dequantized_model(ckpt)(prompt)
    assert rel_err(ours, saved["logits"]) <= 1e-2  # GPTQModel's own CPU forward (bf16 inside its kernel)
    if missing_client("awq") is None:
        assert rel_err(ours, transformers_logits_fn(path)(prompt)) <= 1e-3


def test_gptqmodel_loads_mixed_scheme_gptq(tmp_path):
    """Per-module schemes and float linears go to GPTQModel's `dynamic`; GPTQModel honours it exactly
    (transformers 5.24 ignores `dynamic`, see formats/gptq.md)."""
    need("gptq")
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel

    from quantkit.quant.scheme import parse_override
    from quantkit.testing import make_random_checkpoint

    src = make_random_checkpoint(tmp_path / "src", hidden=128, heads=4, kv_heads=2, intermediate=256, layers=2,
                                 vocab=512)
    # (4-bit overrides: GPTQModel's CPU kernel choice follows the top-level bits, so an 8-bit module fails there)
    overrides = [parse_override("re:.*down_proj=w4a16-g128-asym"),
                 parse_override("-:model\\.layers\\.1\\.self_attn\\.o_proj")]
    out = export_rtn(src, {"gptq": tmp_path / "g"}, PRESETS["w4a16-g32"], overrides=overrides)["gptq"]
    assert len(read_checkpoint(out).metadata["quantization_config"]["dynamic"]) == 3
    ckpt = read_checkpoint(out)
    model = GPTQModel.load(str(out), device="cpu", dtype=torch.float32).model
    checked = 0
    for name in ckpt.names:
        t = ckpt.get(name)
        if isinstance(t, torch.Tensor):
            continue
        module = model.get_submodule(name[: -len(".weight")])
        assert (module.bits, module.group_size) == (t.bits, t.group_size), name
        assert torch.equal(module.dequantize_weight().T.float(), t.dequantize()), name
        checked += 1
    assert checked == 13
    o_proj = model.get_submodule("model.layers.1.self_attn.o_proj")
    assert isinstance(o_proj, torch.nn.Linear)
    assert torch.equal(o_proj.weight.float(), ckpt.get("model.layers.1.self_attn.o_proj.weight").float())
