"""GPTQ checkpoints (`quant_method: gptq`), as AutoGPTQ / GPTQModel write them and transformers, vLLM load them.

Per quantized linear `<prefix>`: `qweight` int32 [in*bits/32, out] (packed along the input dim, LSB first),
`qzeros` int32 [groups, out*bits/32], `scales` fp16 [groups, out], `g_idx` int32 [in]. Zero points are stored
"minus one" for `checkpoint_format: gptq` (v1) and as they are for `gptq_v2`. See formats/gptq.md.

quantkit writes v1 for symmetric schemes (every loader reads it; vLLM picks GPTQ-Marlin) and v2 for asymmetric
ones (v1 cannot hold a zero point of 0 exactly for loaders that add the one back per value, e.g. vLLM's and
ExLlama's kernels). `WriteOptions.extra["checkpoint_format"]` forces one; forcing v1 is the symmetric-only path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from quantkit import __version__
from quantkit.errors import FormatError, SchemeError
from quantkit.formats import packing
from quantkit.formats.base import QuantizedCheckpoint, WriteOptions, register
from quantkit.formats.hf_dir import checked_group_size, checked_setting, quantization_config_of, read_json
from quantkit.formats.hf_quant import (Codec, HFQuantWriter, ModuleQuant, build_checkpoint, group_stored,
                                       load_model_config, majority, require)
from quantkit.formats.hf_dir import SafetensorsDir
from quantkit.model.config import ModelConfig
from quantkit.quant.scheme import Scheme
from quantkit.tensors import QuantTensor

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class GPTQCodec(Codec):
    name = "gptq"
    description = "GPTQ int32-packed weights (qweight/qzeros/scales/g_idx)"
    loaders = ["transformers + optimum + gptqmodel (`AutoModelForCausalLM.from_pretrained`)",
               "GPTQModel (`GPTQModel.load`)", "vLLM (gptq / gptq_marlin)"]
    zeros_when_symmetric = True
    always_g_idx = True

    def __init__(self, checkpoint_format: str | None = None):
        if checkpoint_format not in (None, *CHECKPOINT_FORMATS):
            raise SchemeError(f"checkpoint_format {checkpoint_format!r}: choose one of {', '.join(CHECKPOINT_FORMATS)}")
        self.checkpoint_format = checkpoint_format

    def scheme_problem(self, scheme: Scheme) -> str | None:
        if scheme.bits not in (2, 3, 4, 8):
            return f"GPTQ packs 2, 3, 4 or 8 bits, not {scheme.bits}"
        if scheme.scale_dtype != "float16":
            return f"GPTQ stores float16 scales, not {scheme.scale_dtype}"
        if self.checkpoint_format == "gptq" and not scheme.symmetric:
            return "checkpoint_format 'gptq' (v1, zero minus one) holds only symmetric schemes exactly (use gptq_v2)"
        return None

    def format_for(self, symmetric: bool) -> str:
        return self.checkpoint_format or ("gptq" if symmetric else "gptq_v2")

    def check_tensor(self, name: str, qt: QuantTensor) -> None:
        super().check_tensor(name, qt)
        if (qt.in_features * qt.bits) % 32 or (qt.out_features * qt.bits) % 32:
            raise FormatError(f"{name}: GPTQ packing needs in*bits and out*bits to be multiples of 32 "
                              f"(shape {list(qt.shape)}, {qt.bits} bits)")

    def encode(self, prefix: str, qt: QuantTensor) -> dict[str, torch.Tensor]:
        v1 = self.format_for(self._symmetric) == "gptq"
        return {
            f"{prefix}.qweight": packing.gptq_pack_qweight(qt.codes, qt.bits),
            f"{prefix}.qzeros": packing.gptq_pack_qzeros(qt.zeros, qt.bits, v1=v1),
            f"{prefix}.scales": qt.scales.t().to(torch.float16).contiguous(),
            f"{prefix}.g_idx": qt.group_index().to(torch.int32),
        }

    _symmetric = True  # set by the writer from the schemes before any tensor arrives

    def quantization_config(self, modules: dict[str, ModuleQuant], unquantized: list[str],
                            provenance: dict[str, Any] | None = None) -> dict[str, Any]:
        if not modules:
            raise FormatError("no quantized linear was written; a GPTQ checkpoint needs at least one")
        main = majority(modules)
        fmt = self.format_for(self._symmetric)
        qc: dict[str, Any] = {  # the keys and order GPTQModel 7.6 writes
            "bits": main.bits,
            "group_size": main.group_size,
            "desc_act": any(m.act_order for m in modules.values()),
            "lm_head": False,
            "method": "gptq",
            "quant_method": "gptq",
            "format": fmt,
            "checkpoint_format": fmt,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"quantkit:{__version__}"], **_gptq_meta(provenance or {})},
            "sym": main.symmetric,
        }
        dynamic: dict[str, dict] = {}
        for prefix, mq in sorted(modules.items()):
            if mq != main:
                dynamic[f"+:^{re.escape(prefix)}$"] = {"bits": mq.bits, "group_size": mq.group_size,
                                                       "sym": mq.symmetric, "desc_act": mq.act_order}
        for prefix in unquantized:
            dynamic[f"-:^{re.escape(prefix)}$"] = {}
        if dynamic:
            qc["dynamic"] = dynamic
        return qc

    def extra_files(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        return {"quantize_config.json": quantization_config}


class GPTQFormat:
    name = "gptq"

    def check_scheme(self, scheme: Scheme, checkpoint_format: str | None = None) -> None:
        GPTQCodec(checkpoint_format).check_scheme(scheme)

    def stored_nbytes(self, target: Scheme | None, shape: tuple[int, ...], float_bytes: int) -> int:
        return GPTQCodec().stored_nbytes(target, shape, float_bytes)

    def open_writer(self, out: Path, source_dir: Path | None, config: ModelConfig, schemes: dict[str, Any],
                    options: WriteOptions) -> HFQuantWriter:
        codec = GPTQCodec(options.extra.get("checkpoint_format"))
        real = [s for s in (schemes or {}).values() if isinstance(s, Scheme)]
        codec._symmetric = all(s.symmetric for s in real) if real else True
        return _GPTQWriter(codec, out, source_dir, config, schemes, options)

    def detect(self, path: Path) -> bool:
        path = Path(path)
        qc = quantization_config_of(path)
        if qc is not None:
            return str(qc.get("quant_method", "")).lower() == "gptq"
        return path.is_dir() and (path / "quantize_config.json").is_file() and (path / "config.json").is_file()

    def read(self, path: Path) -> QuantizedCheckpoint:
        return read_gptq(Path(path))


class _GPTQWriter(HFQuantWriter):
    def _add(self, name, tensor):
        if (isinstance(tensor, QuantTensor) and not tensor.symmetric
                and self.codec.format_for(self.codec._symmetric) == "gptq"):
            if self.codec.checkpoint_format == "gptq":
                raise SchemeError(f"{name}: asymmetric tensor cannot go into checkpoint_format 'gptq' (v1) exactly")
            raise SchemeError(f"{name}: asymmetric tensor in a run whose schemes are all symmetric")
        super()._add(name, tensor)


# ---- reading ----

SETTINGS = ("bits", "group_size", "sym", "desc_act")


def gptq_settings(path: Path) -> dict[str, Any]:
    """config.json's quantization_config, else quantize_config.json; when both exist they must agree on the
    settings that decode the weights (a disagreement is an error, never a silent choice)."""
    qc = quantization_config_of(path)
    separate = path / "quantize_config.json"
    if separate.exists():
        other = read_json(separate)
        if qc is None:
            qc = other
        for key in SETTINGS:
            if key in qc and key in other and qc[key] != other[key]:
                raise FormatError(f"{path}: config.json has quantization_config {key} = {qc[key]!r} but "
                                  f"quantize_config.json has {other[key]!r}: expected them to agree")
    if qc is None:
        raise FormatError(f"{path}: no quantization_config in config.json and no quantize_config.json")
    return qc


def _dynamic_rules(path: Path, qc: dict[str, Any]) -> list[tuple[re.Pattern, dict[str, Any]]]:
    """GPTQModel's per-module `dynamic` overrides ('+:regex' or 'regex' -> settings; '-:regex' skips a module,
    which leaves it unquantized and so needs no rule here), compiled and checked before any tensor is read."""
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise FormatError(f"{path}: quantization_config dynamic = {dynamic!r}: expected an object of rules")
    rules = []
    for pattern, override in dynamic.items():
        if pattern.startswith("-:") or not isinstance(override, dict):
            continue
        try:
            regex = re.compile(pattern[2:] if pattern.startswith("+:") else pattern)
        except re.error as e:
            raise FormatError(f"{path}: quantization_config dynamic rule {pattern!r} is not a valid regex ({e})"
                              ) from None
        override = {k: v for k, v in override.items() if k in SETTINGS}
        _check_settings(f"{path} (dynamic rule {pattern!r})", override)
        rules.append((regex, override))
    return rules


def _check_settings(where: str, settings: dict[str, Any]) -> dict[str, Any]:
    if "bits" in settings:
        checked_setting(where, "bits", settings["bits"], (2, 3, 4, 8))
    if "group_size" in settings:
        checked_group_size(where, "group_size", settings["group_size"], channel=(-1, 0))
    for key in ("sym", "desc_act"):
        if settings.get(key) is not None:
            checked_setting(where, key, settings[key], (True, False))
    return settings


def read_gptq(path: Path) -> QuantizedCheckpoint:
    qc = gptq_settings(path)
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in CHECKPOINT_FORMATS:
        raise FormatError(f"{path}: GPTQ checkpoint_format {fmt!r} is not readable (quantkit reads gptq and gptq_v2; "
                          "marlin/bitblas repacks are kernel-specific)")
    defaults = _check_settings(str(path), {"bits": qc.get("bits"), "group_size": qc.get("group_size"),
                                           "sym": qc.get("sym"), "desc_act": qc.get("desc_act")})
    rules = _dynamic_rules(path, qc)
    config = load_model_config(path)
    files = SafetensorsDir(path)
    stored = group_stored(files, "qweight")
    for prefix in stored.quantized:
        if f"{prefix}.bias" in files:
            raise FormatError(f"{path}: {prefix}.bias present; Mistral/Llama linears have no bias")
    v1 = fmt == "gptq"

    def decode(prefix: str) -> QuantTensor:
        s = dict(defaults)
        s.update(next((override for regex, override in rules if regex.match(prefix)), {}))
        bits, group_size = s["bits"], s["group_size"]
        rows, out_f = files.matrix_shape(f"{prefix}.qweight")
        in_f = rows * 32 // bits
        gs = in_f if group_size in (-1, 0) else group_size
        groups = -(-in_f // gs)
        qweight = require(files, f"{prefix}.qweight", (rows, out_f), ("I32",))
        qzeros = require(files, f"{prefix}.qzeros", (groups, out_f * bits // 32), ("I32",))
        scales = require(files, f"{prefix}.scales", (groups, out_f), ("F16", "BF16", "F32"))
        g_idx = None
        if f"{prefix}.g_idx" in files:
            g_idx = require(files, f"{prefix}.g_idx", (in_f,), ("I32", "I64")).to(torch.int32)
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
                raise FormatError(f"{path}: {prefix}.g_idx has values outside [0, {groups})")
            if torch.equal(g_idx.long(), torch.arange(in_f) // gs):
                g_idx = None
        zeros = packing.gptq_unpack_qzeros(qzeros, bits, out_f, v1=v1)
        symmetric = s["sym"] is not False
        if v1 and symmetric and not bool((zeros == 1 << (bits - 1)).all()):
            # some writers label true (v2) zeros "gptq": a symmetric checkpoint's zeros must all be 2^(bits-1)
            raw = packing.gptq_unpack_qzeros(qzeros, bits, out_f, v1=False)
            if bool((raw == 1 << (bits - 1)).all()):
                zeros = raw
        return QuantTensor(
            codes=packing.gptq_unpack_qweight(qweight, bits, in_f),
            scales=scales.t().contiguous(),
            zeros=zeros.to(torch.int32),
            bits=bits, group_size=gs, symmetric=symmetric, g_idx=g_idx,
        )

    return build_checkpoint(path, "gptq", config, stored, decode, qc, {"checkpoint_format": fmt})


register(GPTQFormat())


def _gptq_meta(provenance: dict[str, Any]) -> dict[str, Any]:
    """GPTQModel's `meta` fields for how the weights were solved, from the run's provenance (none for RTN)."""
    gptq = provenance.get("gptq")
    if not gptq:
        return {}
    return {"damp_percent": gptq["damp"], "static_groups": gptq["static_groups"],
            "act_group_aware": gptq["group_aware"], "true_sequential": True, "mse": 0.0}
