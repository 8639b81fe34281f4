"""Which vLLM kernel path a written `quantization_config` selects — the rules as data (vLLM cannot run here).

Sources (vLLM `model_executor/layers/quantization/`): `gptq_marlin.py` (`is_gptq_marlin_compatible`, TYPE_MAP
{(4, sym): uint4b8, (8, sym): uint8b128}), `awq_marlin.py` (`is_awq_marlin_compatible`, uint4 with zero point),
`utils/marlin_utils.py` (MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128], min capability 75/80),
`gptq.py` (exllama `gptq_gemm`, 2/3/4/8 bits, `use_v2_format` for checkpoint_format gptq_v2 since
vllm-project/vllm#26092), `compressed_tensors/schemes/compressed_tensors_wNa16.py` (WNA16_SUPPORTED_BITS
[4, 8]; kernel chosen by `choose_mp_linear_kernel`: Machete on SM90 with group -1/64/128, else Marlin, else
Exllama for symmetric types). The order of each list is vLLM's preference order.
See formats/gptq.md, formats/awq.md, formats/compressed-tensors.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MACHETE_GROUP_SIZES = (-1, 64, 128)


@dataclass(frozen=True)
class KernelRule:
    path: str  # what vLLM logs / the quantization method it uses
    bits: tuple[int, ...]
    symmetric: tuple[bool, ...]  # allowed values of sym / zero-point absence
    group_sizes: tuple[int, ...] | None  # None: any
    min_capability: int  # CUDA compute capability x10
    checkpoint_formats: tuple[str, ...] | None = None  # GPTQ only
    note: str = ""

    def accepts(self, bits: int, symmetric: bool, group_size: int, checkpoint_format: str | None = None) -> bool:
        return (bits in self.bits and symmetric in self.symmetric
                and (self.group_sizes is None or group_size in self.group_sizes)
                and (self.checkpoint_formats is None or (checkpoint_format or "gptq") in self.checkpoint_formats))


RULES: dict[str, tuple[KernelRule, ...]] = {
    "gptq": (
        KernelRule("gptq_marlin (Marlin)", (4, 8), (True,), MARLIN_GROUP_SIZES, 75,
                   note="uint4b8/uint8b128: symmetric only; desc_act with group_size -1 is treated as desc_act false"),
        KernelRule("gptq (ExLlama gptq_gemm)", (2, 3, 4, 8), (True, False), None, 60, ("gptq", "gptq_v2"),
                   note="asymmetric and 2/3-bit; gptq_v2 zeros need vLLM with PR #26092"),
    ),
    "awq": (
        KernelRule("awq_marlin (Marlin)", (4,), (False, True), MARLIN_GROUP_SIZES, 75,
                   note="uint4 with zero points (zero_point: true)"),
        KernelRule("awq (AWQ GEMM)", (4,), (False, True), None, 75),
    ),
    "compressed-tensors": (
        KernelRule("CompressedTensorsWNA16 (Machete)", (4, 8), (True, False), MACHETE_GROUP_SIZES, 90,
                   note="Hopper (SM90) only"),
        KernelRule("CompressedTensorsWNA16 (Marlin)", (4, 8), (True, False), MARLIN_GROUP_SIZES, 75),
        KernelRule("CompressedTensorsWNA16 (Exllama)", (4, 8), (True,), None, 60),
    ),
}


def module_settings(fmt: str, qc: dict[str, Any]) -> list[dict[str, Any]]:
    """The distinct (bits, symmetric, group_size, checkpoint_format) settings a config asks for."""
    out = []
    if fmt == "gptq":
        base = {"bits": qc["bits"], "symmetric": bool(qc.get("sym", True)), "group_size": qc["group_size"],
                "checkpoint_format": qc.get("checkpoint_format") or qc.get("format")}
        out.append(base)
        for pattern, override in (qc.get("dynamic") or {}).items():
            if not pattern.startswith("-:") and override:
                out.append(base | {"bits": override.get("bits", base["bits"]),
                                   "symmetric": bool(override.get("sym", base["symmetric"])),
                                   "group_size": override.get("group_size", base["group_size"])})
    elif fmt == "awq":
        out.append({"bits": qc.get("bits", qc.get("w_bit")), "symmetric": not qc.get("zero_point", True),
                    "group_size": qc.get("group_size", qc.get("q_group_size"))})
    elif fmt == "compressed-tensors":
        for group in (qc.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            gs = -1 if w.get("strategy") == "channel" else w.get("group_size")
            out.append({"bits": w.get("num_bits"), "symmetric": bool(w.get("symmetric", True)), "group_size": gs,
                        "format": group.get("format") or qc.get("format")})
    else:
        raise ValueError(f"no vLLM rules for format {fmt!r}")
    return out


def vllm_kernel(fmt: str, qc: dict[str, Any], capability: int = 90) -> list[str | None]:
    """The kernel path vLLM picks for each distinct setting of `qc` on a GPU of `capability` (None: no path)."""
    picks: list[str | None] = []
    for s in module_settings(fmt, qc):
        if fmt == "compressed-tensors" and s.get("format") != "pack-quantized":
            picks.append(None)
            continue
        if fmt == "awq" and s["symmetric"]:  # zero_point false: AWQ kernels need zero points
            picks.append(None)
            continue
        chosen = None
        for rule in RULES[fmt]:
            if capability >= rule.min_capability and rule.accepts(s["bits"], s["symmetric"], s["group_size"],
                                                                  s.get("checkpoint_format")):
                chosen = rule.path
                break
        picks.append(chosen)
    return picks
