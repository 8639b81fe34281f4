"""compressed-tensors checkpoints, `pack-quantized` (llm-compressor's W4A16 / W8A16 output; vLLM native).

Per quantized linear `<prefix>`: `weight_packed` int32 [out, ceil(in*bits/32)] (codes packed along the input
dim, LSB first, stored as signed value + 2^(bits-1), i.e. quantkit's unsigned code), `weight_scale` [out, groups]
in the scale dtype, `weight_shape` int64 [2] = [out, in], and for asymmetric schemes `weight_zero_point` int32
[ceil(out*bits/32), groups] (packed along dim 0). `quantization_config` has `config_groups` / `ignore` as
llm-compressor writes them (json keys sorted). See formats/compressed-tensors.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import FormatError, SchemeError
from quantkit.formats import packing
from quantkit.formats.base import QuantizedCheckpoint, WriteOptions, register
from quantkit.formats.hf_dir import SafetensorsDir, checked_group_size, checked_setting, quantization_config_of
from quantkit.formats.hf_quant import (Codec, HFQuantWriter, ModuleQuant, build_checkpoint, group_stored,
                                       load_model_config, majority, require)
from quantkit.model.config import ModelConfig
from quantkit.quant.scheme import Scheme
from quantkit.tensors import QuantTensor

FORMAT = "pack-quantized"
COMPRESSED_TENSORS_VERSION = "0.20.0"  # the release whose layout and config this writer reproduces


def weight_args(mq: ModuleQuant) -> dict[str, Any]:
    """A QuantizationArgs dict as llm-compressor serialises it for a weight-only int scheme."""
    return {
        "num_bits": mq.bits,
        "type": "int",
        "symmetric": mq.symmetric,
        "group_size": None if mq.group_size == -1 else mq.group_size,
        "strategy": "channel" if mq.group_size == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


class CompressedTensorsCodec(Codec):
    name = "compressed-tensors"
    description = "compressed-tensors pack-quantized int weights (weight_packed/weight_scale/weight_shape)"
    loaders = ["transformers + compressed-tensors (`AutoModelForCausalLM.from_pretrained`)",
               "vLLM (CompressedTensorsWNA16: Marlin / Machete)"]
    module_extra_bytes = 16  # weight_shape, int64 [2]

    def scheme_problem(self, scheme: Scheme) -> str | None:
        if scheme.bits not in (2, 3, 4, 8):
            return f"pack-quantized holds 2, 3, 4 or 8 bits here, not {scheme.bits}"
        return None

    def check_tensor(self, name: str, qt: QuantTensor) -> None:
        super().check_tensor(name, qt)
        if qt.has_act_order:
            raise SchemeError(f"{name}: compressed-tensors {COMPRESSED_TENSORS_VERSION} has no g_idx (actorder "
                              "'group' was removed), so it cannot hold a permuted-group tensor; use static groups "
                              "or format gptq")

    def encode(self, prefix: str, qt: QuantTensor) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}.weight_packed": packing.ct_pack_weight(qt.codes, qt.bits),
            f"{prefix}.weight_scale": qt.scales.contiguous(),
            f"{prefix}.weight_shape": torch.tensor(list(qt.shape), dtype=torch.int64),
        }
        if not qt.symmetric:
            out[f"{prefix}.weight_zero_point"] = packing.ct_pack_zero_point(qt.zeros, qt.bits)
        return out

    def quantization_config(self, modules: dict[str, ModuleQuant], unquantized: list[str],
                            provenance: dict[str, Any] | None = None) -> dict[str, Any]:
        if not modules:
            raise FormatError("no quantized linear was written; a compressed-tensors checkpoint needs at least one")
        distinct = sorted(set(modules.values()), key=lambda m: (m != majority(modules), m.bits, m.group_size))
        groups = {}
        for i, mq in enumerate(distinct):
            if len(distinct) == 1:
                targets = ["Linear"]
            else:
                targets = sorted(p for p, m in modules.items() if m == mq)
            groups[f"group_{i}"] = {"format": None, "input_activations": None, "output_activations": None,
                                    "targets": targets, "weights": weight_args(mq)}
        return {
            "config_groups": groups,
            "format": FORMAT,
            "global_compression_ratio": None,
            "ignore": ["lm_head"] + unquantized,
            "kv_cache_scheme": None,
            "moe_sparsity_config": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": COMPRESSED_TENSORS_VERSION,
        }

    def config_sort_keys(self) -> bool:
        return True


class CompressedTensorsFormat:
    name = "compressed-tensors"

    def check_scheme(self, scheme: Scheme) -> None:
        CompressedTensorsCodec().check_scheme(scheme)

    def stored_nbytes(self, target: Scheme | None, shape: tuple[int, ...], float_bytes: int) -> int:
        return CompressedTensorsCodec().stored_nbytes(target, shape, float_bytes)

    def open_writer(self, out: Path, source_dir: Path | None, config: ModelConfig, schemes: dict[str, Any],
                    options: WriteOptions) -> HFQuantWriter:
        return HFQuantWriter(CompressedTensorsCodec(), out, source_dir, config, schemes, options)

    def detect(self, path: Path) -> bool:
        qc = quantization_config_of(Path(path))
        return qc is not None and str(qc.get("quant_method", "")).lower() == "compressed-tensors"

    def read(self, path: Path) -> QuantizedCheckpoint:
        return read_compressed_tensors(Path(path))


# ---- reading ----

def _target_matches(path: Path, target: str, module: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target[3:], module) is not None
        except re.error as e:
            raise FormatError(f"{path}: quantization_config target {target!r} is not a valid regex ({e})") from None
    return target == module or target == "Linear"


def _scheme_for(path: Path, module: str, qc: dict[str, Any]) -> dict[str, Any] | None:
    """The config group that quantizes `module`: exact names and regexes win over the class name 'Linear'."""
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise FormatError(f"{path}: quantization_config config_groups = {groups!r}: expected an object of groups")
    best, best_rank = None, -1
    for gname, group in groups.items():
        targets = group.get("targets") if isinstance(group, dict) else None
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise FormatError(f"{path}: quantization_config config_groups.{gname}: expected an object with "
                              "'targets', a list of module names or 're:' patterns")
        for target in targets:
            if _target_matches(path, target, module):
                rank = 0 if target == "Linear" else 1
                if rank > best_rank:
                    best, best_rank = group, rank
    return best


def read_compressed_tensors(path: Path) -> QuantizedCheckpoint:
    qc = quantization_config_of(path) or {}
    status = qc.get("quantization_status")
    if status not in (None, "compressed"):
        raise FormatError(f"{path}: quantization_status {status!r}; only saved 'compressed' checkpoints are readable")
    config = load_model_config(path)
    files = SafetensorsDir(path)
    stored = group_stored(files, "weight_packed")

    def decode(prefix: str) -> QuantTensor:
        group = _scheme_for(path, prefix, qc)
        if group is None:
            raise FormatError(f"{path}: {prefix} has weight_packed but no config_groups entry targets it")
        fmt = group.get("format") or qc.get("format")
        if fmt != FORMAT:
            raise FormatError(f"{path}: {prefix}: compression format {fmt!r} is not readable (quantkit reads {FORMAT})")
        w = group.get("weights")
        if not isinstance(w, dict):
            raise FormatError(f"{path}: {prefix}: config group has no 'weights' object")
        where = f"{path} ({prefix})"
        bits = checked_setting(where, "weights.num_bits", w.get("num_bits"), (2, 3, 4, 8))
        sym = checked_setting(where, "weights.symmetric", w.get("symmetric", True), (True, False))
        checked_setting(where, "weights.type", w.get("type", "int"), ("int",))
        strategy = checked_setting(where, "weights.strategy", w.get("strategy"), ("group", "channel"))
        out_f, in_f = require(files, f"{prefix}.weight_shape", (2,), ("I64", "I32")).tolist()
        if out_f <= 0 or in_f <= 0:
            raise FormatError(f"{files.path}: tensor {prefix + '.weight_shape'!r} = {[out_f, in_f]}: expected "
                              "positive sizes")
        if strategy == "group":
            gs = checked_group_size(where, "weights.group_size", w.get("group_size"), channel=())
        else:
            gs = in_f
        groups = -(-in_f // gs)
        packed = require(files, f"{prefix}.weight_packed", (out_f, packing.packed_length(in_f, bits)), ("I32",))
        scale = require(files, f"{prefix}.weight_scale", (out_f, groups), ("F16", "BF16", "F32"))
        if sym:
            zeros = torch.full((out_f, groups), 1 << (bits - 1), dtype=torch.int32)
        else:
            zp = require(files, f"{prefix}.weight_zero_point", (packing.packed_length(out_f, bits), groups), ("I32",))
            zeros = packing.ct_unpack_zero_point(zp, bits, out_f).to(torch.int32)
        g_idx = None
        if f"{prefix}.weight_g_idx" in files:
            g = require(files, f"{prefix}.weight_g_idx", (in_f,), ("I32", "I64")).to(torch.int32)
            if int(g.min()) < 0 or int(g.max()) >= groups:
                raise FormatError(f"{path}: {prefix}.weight_g_idx has values outside [0, {groups})")
            if not torch.equal(g.long(), torch.arange(in_f) // gs):
                g_idx = g
        return QuantTensor(codes=packing.ct_unpack_weight(packed, bits, in_f), scales=scale, zeros=zeros,
                           bits=bits, group_size=gs, symmetric=bool(sym), g_idx=g_idx)

    return build_checkpoint(path, "compressed-tensors", config, stored, decode, qc)


register(CompressedTensorsFormat())
