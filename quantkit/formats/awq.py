"""AWQ checkpoints, GEMM version (`quant_method: awq`, `version: gemm`), as AutoAWQ / GPTQModel write them.

Per quantized linear `<prefix>`: `qweight` int32 [in, out/8] and `qzeros` int32 [groups, out/8], both packed
along the output dim with the nibble order [0, 2, 4, 6, 1, 3, 5, 7], true zero points (no "minus one"), and
`scales` fp16 [groups, out]. 4 bits only, one group size for every module, no act-order. A symmetric 4-bit
scheme fits exactly too (every zero point is 8). See formats/awq.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantkit.errors import FormatError, SchemeError
from quantkit.formats import packing
from quantkit.formats.base import QuantizedCheckpoint, WriteOptions, register
from quantkit.formats.hf_dir import SafetensorsDir, checked_group_size, checked_setting, quantization_config_of
from quantkit.formats.hf_quant import (Codec, HFQuantWriter, ModuleQuant, build_checkpoint, group_stored,
                                       load_model_config, require)
from quantkit.model.config import ModelConfig
from quantkit.quant.scheme import Scheme
from quantkit.tensors import QuantTensor


class AWQCodec(Codec):
    name = "awq"
    description = "AWQ GEMM int32-packed 4-bit weights (qweight/qzeros/scales)"
    loaders = ["transformers + gptqmodel (`AutoModelForCausalLM.from_pretrained`)", "AutoAWQ",
               "vLLM (awq / awq_marlin)"]
    zeros_when_symmetric = True

    def scheme_problem(self, scheme: Scheme) -> str | None:
        if scheme.bits != 4:
            return f"AWQ GEMM packs 4-bit weights only, not {scheme.bits}-bit"
        if scheme.group_size == -1:
            return "AWQ GEMM needs a group size (per-channel is not written by AutoAWQ)"
        if scheme.scale_dtype != "float16":
            return f"AWQ stores float16 scales, not {scheme.scale_dtype}"
        if scheme.act_order:
            return "AWQ has no g_idx, so no act-order"
        return None

    def check_tensor(self, name: str, qt: QuantTensor) -> None:
        super().check_tensor(name, qt)
        if qt.has_act_order:
            raise SchemeError(f"{name}: AWQ has no g_idx and cannot hold an act-order (permuted-group) tensor; "
                              "use format gptq")
        if qt.out_features % 8:
            raise FormatError(f"{name}: AWQ packing needs out_features to be a multiple of 8, got {qt.out_features}")

    def encode(self, prefix: str, qt: QuantTensor) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.qweight": packing.awq_pack(qt.codes.t()),
            f"{prefix}.qzeros": packing.awq_pack(qt.zeros.t()),
            f"{prefix}.scales": qt.scales.t().to(torch.float16).contiguous(),
        }

    def quantization_config(self, modules: dict[str, ModuleQuant], unquantized: list[str],
                            provenance: dict[str, Any] | None = None) -> dict[str, Any]:
        if not modules:
            raise FormatError("no quantized linear was written; an AWQ checkpoint needs at least one")
        sizes = {m.group_size for m in modules.values()}
        if len(sizes) > 1:
            raise SchemeError(f"AWQ holds one group size for every module, got {sorted(sizes)}; use gptq or "
                              "compressed-tensors for mixed schemes")
        return {"quant_method": "awq", "zero_point": True, "group_size": sizes.pop(), "bits": 4,
                "version": "gemm", "modules_to_not_convert": unquantized or None}


class AWQFormat:
    name = "awq"

    def check_scheme(self, scheme: Scheme) -> None:
        AWQCodec().check_scheme(scheme)

    def stored_nbytes(self, target: Scheme | None, shape: tuple[int, ...], float_bytes: int) -> int:
        return AWQCodec().stored_nbytes(target, shape, float_bytes)

    def open_writer(self, out: Path, source_dir: Path | None, config: ModelConfig, schemes: dict[str, Any],
                    options: WriteOptions) -> HFQuantWriter:
        return HFQuantWriter(AWQCodec(), out, source_dir, config, schemes, options)

    def detect(self, path: Path) -> bool:
        qc = quantization_config_of(Path(path))
        return qc is not None and str(qc.get("quant_method", "")).lower() == "awq"

    def read(self, path: Path) -> QuantizedCheckpoint:
        return read_awq(Path(path))


def read_awq(path: Path) -> QuantizedCheckpoint:
    qc = quantization_config_of(path) or {}
    bits = qc.get("bits", qc.get("w_bit"))
    group_size = qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise FormatError(f"{path}: AWQ version {version!r} is not readable (quantkit reads the GEMM layout)")
    checked_setting(path, "bits", bits, (4,), "4 (the GEMM layout holds 4-bit weights)")
    checked_group_size(path, "group_size", group_size)
    # false (GPTQModel's symmetric AWQ): qzeros hold 2^(bits-1)
    zero_point = checked_setting(path, "zero_point", qc.get("zero_point", True), (True, False))
    config = load_model_config(path)
    files = SafetensorsDir(path)
    stored = group_stored(files, "qweight")

    def decode(prefix: str) -> QuantTensor:
        in_f, cols = files.matrix_shape(f"{prefix}.qweight")
        out_f = cols * 8
        gs = in_f if group_size == -1 else group_size
        groups = -(-in_f // gs)
        qweight = require(files, f"{prefix}.qweight", (in_f, cols), ("I32",))
        scales = require(files, f"{prefix}.scales", (groups, out_f), ("F16", "BF16", "F32"))
        if zero_point or f"{prefix}.qzeros" in files:
            qzeros = require(files, f"{prefix}.qzeros", (groups, cols), ("I32",))
            zeros = packing.awq_unpack(qzeros).t().contiguous().to(torch.int32)
            if not zero_point and not bool((zeros == 8).all()):
                raise FormatError(f"{path}: {prefix}.qzeros is not 8 everywhere although zero_point is false")
        else:
            zeros = torch.full((out_f, groups), 8, dtype=torch.int32)
        return QuantTensor(codes=packing.awq_unpack(qweight).t().contiguous(), scales=scales.t().contiguous(),
                           zeros=zeros, bits=4, group_size=gs, symmetric=bool((zeros == 8).all()))

    return build_checkpoint(path, "awq", config, stored, decode, qc)


register(AWQFormat())
