"""The configs quantkit writes for its presets select the vLLM kernel paths that formats/*.md promise."""

import pytest

from quantkit.formats.awq import AWQCodec
from quantkit.formats.compressed_tensors import CompressedTensorsCodec
from quantkit.formats.gptq import GPTQCodec
from quantkit.formats.hf_quant import ModuleQuant
from quantkit.formats.vllm_rules import vllm_kernel
from quantkit.quant.scheme import PRESETS

LINEARS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def config_for(fmt, scheme):
    codec = {"gptq": GPTQCodec(), "awq": AWQCodec(), "compressed-tensors": CompressedTensorsCodec()}[fmt]
    if codec.scheme_problem(scheme):
        return None
    codec._symmetric = scheme.symmetric
    mq = ModuleQuant(scheme.bits, scheme.group_size, scheme.symmetric, False)
    return codec.quantization_config({m: mq for m in LINEARS}, [])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gptq_presets(preset):
    s = PRESETS[preset]
    [kernel] = vllm_kernel("gptq", config_for("gptq", s), capability=80)
    if s.symmetric and s.bits in (4, 8):
        assert kernel == "gptq_marlin (Marlin)"  # needs sym: true, 4/8 bits, group -1/32/64/128
        assert config_for("gptq", s)["checkpoint_format"] == "gptq"
    else:
        assert kernel == "gptq (ExLlama gptq_gemm)"
        assert config_for("gptq", s)["checkpoint_format"] == "gptq_v2"  # vLLM reads v2 zeros since #26092


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_awq_presets(preset):
    qc = config_for("awq", PRESETS[preset])
    if qc is None:
        assert PRESETS[preset].bits != 4 or PRESETS[preset].group_size == -1
        return
    assert qc["zero_point"] is True and qc["version"] == "gemm"
    assert vllm_kernel("awq", qc, capability=80) == ["awq_marlin (Marlin)"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_compressed_tensors_presets(preset):
    s = PRESETS[preset]
    qc = config_for("compressed-tensors", s)
    marlin = vllm_kernel("compressed-tensors", qc, capability=80)
    hopper = vllm_kernel("compressed-tensors", qc, capability=90)
    if s.bits in (4, 8):
        assert marlin == ["CompressedTensorsWNA16 (Marlin)"]
        expect = "Machete" if s.group_size in (-1, 64, 128) else "Marlin"
        assert hopper == [f"CompressedTensorsWNA16 ({expect})"]
    else:
        assert marlin == [None]  # 2/3-bit pack-quantized: transformers only (WNA16 supports 4/8 bits)


def test_default_preset_gets_marlin_everywhere():
    s = PRESETS["w4a16-g128"]
    assert vllm_kernel("gptq", config_for("gptq", s), 80) == ["gptq_marlin (Marlin)"]
    assert vllm_kernel("awq", config_for("awq", s), 80) == ["awq_marlin (Marlin)"]
    assert (vllm_kernel("compressed-tensors", config_for("compressed-tensors", s), 80)
            == ["CompressedTensorsWNA16 (Marlin)"])


def test_rules_reject_what_marlin_cannot_run():
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 256, "sym": True, "checkpoint_format": "gptq"}
    assert vllm_kernel("gptq", qc, 80) == ["gptq (ExLlama gptq_gemm)"]  # group 256 is not a Marlin group size
    assert vllm_kernel("gptq", qc, 50) == [None]  # no kernel below SM60
    ct = {"format": "pack-quantized", "config_groups": {"g": {"weights": {"num_bits": 4, "symmetric": False,
                                                                          "strategy": "group", "group_size": 256}}}}
    assert vllm_kernel("compressed-tensors", ct, 80) == [None]  # asym + group 256: no Marlin, no Exllama
