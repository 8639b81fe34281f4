"""The configs quantkit writes for its presets select the vLLM 0.32 methods / kernels (or refusals) that formats/*.md
state, by the rules quantkit/formats/vllm_rules.py re-states from vLLM 0.32.0's source."""

import pytest

from quantkit.formats.awq import AWQCodec
from quantkit.formats.compressed_tensors import CompressedTensorsCodec
from quantkit.formats.gptq import GPTQCodec
from quantkit.formats.hf_quant import ModuleQuant
from quantkit.formats.vllm_rules import module_settings, vllm_kernel, vllm_paths
from quantkit.quant.scheme import PRESETS

LINEARS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
GPUS = (75, 80, 86, 89, 90, 100, 120)  # Turing, A100, Ampere consumer, Ada, Hopper, Blackwell
MACHETE_GROUPS = (-1, 64, 128)


def config_for(fmt, scheme, modules=None):
    codec = {"gptq": GPTQCodec(), "awq": AWQCodec(), "compressed-tensors": CompressedTensorsCodec()}[fmt]
    if codec.scheme_problem(scheme):
        return None
    codec._symmetric = scheme.symmetric
    mq = ModuleQuant(scheme.bits, scheme.group_size, scheme.symmetric, False)
    return codec.quantization_config(modules or {m: mq for m in LINEARS}, [])


def gpu_kernel(s):
    """Hopper (exactly SM 9.0) takes Machete for its group sizes; every other GPU from SM 7.5 takes Marlin."""
    return lambda cap: "Machete" if cap == 90 and s.group_size in MACHETE_GROUPS else "Marlin"


def refusal(fmt, qc, cap=80, **kw):
    [path] = vllm_paths(fmt, qc, cap, **kw)
    assert path.kernel is None and path.label is None
    return path.refused


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gptq_presets(preset):
    s = PRESETS[preset]
    qc = config_for("gptq", s)
    if s.symmetric and s.bits in (4, 8):  # AutoGPTQConfig.TYPE_MAP: (4, sym) uint4b8, (8, sym) uint8b128
        assert qc["checkpoint_format"] == "gptq"
        for cap in GPUS:
            assert vllm_kernel("gptq", qc, cap) == [f"auto_gptq ({gpu_kernel(s)(cap)})"]
        # below Turing: the config's min capability (60) passes, but AutoGPTQLinearMethod's Marlin check has no types
        assert "Only types = [] are supported" in refusal("gptq", qc, 70)
        if s.bits == 4:
            assert vllm_kernel("gptq", qc, platform="cpu") == ["auto_gptq (CPUWNA16)"]
        else:  # measured on vLLM 0.32 CPU: the CPU build has 4-bit kernels only
            assert refusal("gptq", qc, platform="cpu").startswith(
                "Marlin does not support weight_bits = uint8b128. Only types = [ScalarType.uint4b8] are supported")
    else:  # asymmetric (gptq_v2) or 2/3-bit: refused when the config is parsed, on every platform
        assert qc["checkpoint_format"] == ("gptq" if s.symmetric else "gptq_v2")
        why = f"Unsupported quantization config: bits={s.bits}, sym={s.symmetric}"
        for cap in (*GPUS, 60):
            assert refusal("gptq", qc, cap) == why
        assert refusal("gptq", qc, platform="cpu") == why


def test_gptq_act_order():
    """desc_act with groups is refused (measured on CPU); with one group per channel it is a no-op."""
    grouped = {m: ModuleQuant(4, 128, True, True) for m in LINEARS}
    qc = GPTQCodec().quantization_config(grouped, [])
    assert qc["desc_act"] is True
    for platform in ("cuda", "cpu"):
        assert refusal("gptq", qc, platform=platform).startswith(
            "GPTQ group activation ordering (desc_act=True) is no longer supported")
    channel = GPTQCodec().quantization_config({m: ModuleQuant(4, -1, True, True) for m in LINEARS}, [])
    assert channel["desc_act"] is True
    assert vllm_kernel("gptq", channel, 80) == ["auto_gptq (Marlin)"]
    # one act-order module with groups inside a channel-wise checkpoint: refused through its dynamic rule
    channel_q = ModuleQuant(4, -1, True, False)
    mixed = {LINEARS[0]: channel_q, "model.layers.1.mlp.up_proj": channel_q,
             LINEARS[1]: ModuleQuant(4, 128, True, True)}
    qc = GPTQCodec().quantization_config(mixed, [])
    assert qc["group_size"] == -1 and len(module_settings("gptq", qc)) == 2
    paths = vllm_paths("gptq", qc, 80)
    assert len(paths) == 2 and all("is enabled by dynamic rule" in p.refused for p in paths)


def test_gptq_dynamic_rules_are_checked_per_module():
    main, other = ModuleQuant(4, 128, True, False), ModuleQuant(8, 32, True, False)
    qc = GPTQCodec().quantization_config({LINEARS[0]: main, LINEARS[1]: other, "model.layers.1.mlp.up_proj": main},
                                         ["model.layers.1.mlp.down_proj"])
    assert len(qc["dynamic"]) == 2  # one "+:" override, one "-:" skip
    assert vllm_kernel("gptq", qc, 90) == ["auto_gptq (Machete)", "auto_gptq (Marlin)"]  # g32: no Machete
    assert vllm_kernel("gptq", qc, platform="cpu") == ["auto_gptq (CPUWNA16)", None]  # the 8-bit module
    asym = dict(qc, dynamic={"+:^x$": {"bits": 4, "group_size": 128, "sym": False, "desc_act": False}})
    paths = vllm_paths("gptq", asym, 80)
    assert paths[0].label == "auto_gptq (Marlin)"
    assert paths[1].refused == "Unsupported quantization config: bits=4, sym=False"  # gptq_utils.override_config


def test_gptq_group_sizes_outside_marlin_are_refused():
    """vLLM 0.32 has no ExLlama `gptq` method: AutoGPTQLinearMethod verifies Marlin support on every platform."""
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 256, "desc_act": False, "sym": True,
          "checkpoint_format": "gptq"}
    why = "Marlin does not support group_size = 256. Only group_sizes = [-1, 32, 64, 128] are supported."
    assert refusal("gptq", qc, 80) == why
    assert refusal("gptq", qc, 90) == why
    assert refusal("gptq", qc, platform="cpu") == why
    assert refusal("gptq", dict(qc, group_size=128), 50).startswith(
        "The quantization method auto_gptq is not supported for the current GPU. Minimum capability: 60.")
    missing = {k: v for k, v in qc.items() if k != "sym"}
    assert refusal("gptq", missing) == "Cannot find any of ['sym'] in the model's quantization config."


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_awq_presets(preset):
    s = PRESETS[preset]
    qc = config_for("awq", s)
    if qc is None:
        assert s.bits != 4 or s.group_size == -1
        return
    assert qc["zero_point"] is True and qc["version"] == "gemm"
    for cap in GPUS:  # AutoAWQMarlinLinearMethod: Marlin-family kernels via choose_mp_linear_kernel
        [path] = vllm_paths("awq", qc, cap)
        assert (path.method, path.linear, path.kernel) == ("auto_awq", "AutoAWQMarlinLinearMethod",
                                                           gpu_kernel(s)(cap))
    assert refusal("awq", qc, 70).startswith(
        "The quantization method auto_awq is not supported for the current GPU. Minimum capability: 75.")
    # on CPU the override returns None: the method stays "awq" (measured: CPUWNA16LinearKernel)
    assert vllm_kernel("awq", qc, platform="cpu") == ["awq (CPUWNA16)"]


def test_awq_outside_marlin():
    qc = {"quant_method": "awq", "zero_point": True, "group_size": 256, "bits": 4, "version": "gemm"}
    [path] = vllm_paths("awq", qc, 80)
    assert (path.linear, path.kernel) == ("AutoAWQLinearMethod", "AWQ GEMM")  # Marlin has no group 256
    assert vllm_kernel("awq", qc, platform="cpu") == ["awq (CPUWNA16)"]  # CPU skips the Marlin check
    assert refusal("awq", dict(qc, bits=8, group_size=128)).startswith("Unsupported num_bits = 8. Supported: 4.")
    # zero_point false: Marlin has no zero-point-free uint4, so CUDA falls back to the AWQ GEMM method
    assert vllm_kernel("awq", dict(qc, group_size=128, zero_point=False), 90) == ["auto_awq (AWQ GEMM)"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_compressed_tensors_presets(preset):
    s = PRESETS[preset]
    qc = config_for("compressed-tensors", s)
    if s.bits in (4, 8):  # Machete: uint4b8/uint8b128 or uint4/uint8 (zp); Marlin: uint4b8/uint8b128 or uint4 (zp)
        for cap in GPUS:
            assert vllm_kernel("compressed-tensors", qc, cap) == [f"compressed-tensors ({gpu_kernel(s)(cap)})"]
        assert refusal("compressed-tensors", qc, 70).startswith(
            "Quantization scheme is not supported for the current GPU. Min capability: 75.")
        assert refusal("compressed-tensors", qc, 60).startswith(
            "The quantization method compressed-tensors is not supported for the current GPU. Minimum capability: 70")
    else:  # 2/3 bits: WNA16 parses 2-8 bits, but no mixed-precision kernel takes uint2 / uint3
        assert not s.symmetric
        for cap in GPUS:
            assert refusal("compressed-tensors", qc, cap).startswith(
                "Failed to find a kernel that can implement the WNA16 linear layer")
        assert vllm_kernel("compressed-tensors", qc, 80, installed={"humming"}) == ["compressed-tensors (Humming)"]
    if s.bits == 4:
        assert vllm_kernel("compressed-tensors", qc, platform="cpu") == ["compressed-tensors (CPUWNA16)"]
    else:  # measured on vLLM 0.32 CPU for W8A16
        assert (f"CPUWNA16 cannot implement due to: Quant type ({'uint8b128' if s.bits == 8 else f'uint{s.bits}'}) "
                "not supported by CPUWNA16") in refusal("compressed-tensors", qc, platform="cpu")


def ct(bits, symmetric, group_size, **weights):
    return {"format": "pack-quantized", "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
        "strategy": "channel" if group_size is None else "group", **weights}}}}


def test_compressed_tensors_later_kernels():
    """Group sizes neither Machete nor Marlin take fall to Exllama (float16, symmetric) or TritonW4A16 (4 bits)."""
    def kernel(qc, cap=80, **kw):
        [label] = vllm_kernel("compressed-tensors", qc, cap, **kw)
        return label and label.removeprefix("compressed-tensors ")

    assert kernel(ct(4, True, 256), act_dtype="float16") == "(Exllama)"
    assert kernel(ct(4, True, 256)) == "(TritonW4A16)"  # bfloat16: Exllama needs float16
    assert kernel(ct(4, False, 256)) == "(TritonW4A16)"
    assert kernel(ct(8, True, 256), act_dtype="float16") == "(Exllama)"
    assert kernel(ct(8, True, 256)) is None
    # 8-bit with zero points: Machete (uint8) on Hopper only; Marlin's zero-point type is uint4
    assert kernel(ct(8, False, 128), 90) == "(Machete)"
    assert kernel(ct(8, False, 128)) is None
    assert kernel(ct(8, False, 128), installed={"conch"}) == "(Conch)"
    assert kernel(ct(4, True, 128), platform="cpu", installed={"zentorch"}) == "(ZentorchWNA16)"


def test_compressed_tensors_refusals():
    assert refusal("compressed-tensors", ct(4, True, 128, actorder="group")).startswith(
        "Compressed-tensors group/dynamic activation ordering (actorder='group') is no longer supported")
    assert vllm_kernel("compressed-tensors", ct(4, True, 128, actorder="weight"), 80) == ["compressed-tensors (Marlin)"]
    assert refusal("compressed-tensors", ct(4, True, None, strategy="group")).startswith(
        "Pack-quantized format requires group quantization or channelwise quantization")
    assert refusal("compressed-tensors", ct(9, True, 128)).startswith("Unsupported num_bits = 9.")
    assert refusal("compressed-tensors", dict(ct(4, True, 128), format="naive-quantized")).startswith(
        "No compressed-tensors compatible scheme was found")


def test_machete_needs_aligned_shapes_and_exactly_sm90():
    qc = config_for("gptq", PRESETS["w4a16-g128"])
    assert vllm_kernel("gptq", qc, 90, in_out=(4096, 4096)) == ["auto_gptq (Machete)"]
    assert vllm_kernel("gptq", qc, 90, in_out=(4096, 4160)) == ["auto_gptq (Marlin)"]  # out % 128
    assert vllm_kernel("gptq", qc, 90, in_out=(4160, 4096)) == ["auto_gptq (Machete)"]  # Machete checks in % 64 only
    channel = config_for("gptq", PRESETS["w4a16"])
    assert vllm_kernel("gptq", channel, 90, in_out=(4000, 4096)) == ["auto_gptq (Marlin)"]  # in % 64
    for cap in (89, 100, 120):
        assert vllm_kernel("gptq", qc, cap) == ["auto_gptq (Marlin)"]


def test_humming_outranks_marlin_on_sm90_only():
    qc = config_for("gptq", PRESETS["w4a16-g32"])
    assert vllm_kernel("gptq", qc, 90, installed={"humming"}) == ["auto_gptq (Humming)"]
    assert vllm_kernel("gptq", qc, 80, installed={"humming"}) == ["auto_gptq (Marlin)"]
    assert vllm_kernel("gptq", config_for("gptq", PRESETS["w4a16-g128"]), 90, installed={"humming"}) == [
        "auto_gptq (Machete)"]


def test_default_preset_loads_everywhere():
    s = PRESETS["w4a16-g128"]
    for fmt in ("gptq", "awq", "compressed-tensors"):
        qc = config_for(fmt, s)
        for cap in GPUS:
            [path] = vllm_paths(fmt, qc, cap)
            assert path.refused is None and path.kernel == gpu_kernel(s)(cap)
        [path] = vllm_paths(fmt, qc, platform="cpu")
        assert path.kernel == "CPUWNA16"
