"""The part GPTQ, AWQ and compressed-tensors share: a streaming writer that encodes QuantTensors with the
format's codec, keeps float tensors in the model dtype, and on `finish` writes config.json (with the format's
`quantization_config`), provenance and card; and a reader skeleton that serves QuantTensors by canonical name.

A format module supplies a `Codec`: which schemes it holds (`check_scheme`, `check_tensor`), how one QuantTensor
becomes stored tensors (`encode`) and back (`decode`), and the `quantization_config` for the modules it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import FormatError, SchemeError
from quantkit.formats.base import QuantizedCheckpoint, StoredTensor, WriteOptions
from quantkit.formats.hf_dir import (OutputDir, SafetensorsDir, base_model_name, model_card, provenance_record,
                                     read_json, source_config_dict, tokenizer_in)
from quantkit.model import arch
from quantkit.model.config import ModelConfig
from quantkit.quant.scheme import PRESETS, Scheme
from quantkit.tensors import GGMLTensor, QuantTensor


@dataclass(frozen=True)
class ModuleQuant:
    """What the config needs to know about one quantized module."""

    bits: int
    group_size: int  # -1 for per-channel
    symmetric: bool
    act_order: bool

    def scheme(self) -> Scheme:
        return Scheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, act_order=self.act_order)


def module_quant(qt: QuantTensor, scheme: Scheme | None) -> ModuleQuant:
    if scheme is not None:
        gs = scheme.group_size
    else:
        gs = -1 if qt.num_groups == 1 else qt.group_size
    return ModuleQuant(qt.bits, gs, qt.symmetric, qt.has_act_order or bool(scheme and scheme.act_order))


def nearest_preset(want: Scheme, allowed) -> str:
    """The preset name closest to `want` among those `allowed(scheme)` accepts (for refusal messages)."""
    def distance(s: Scheme) -> tuple:
        return (s.bits != want.bits, s.symmetric != want.symmetric, abs(s.group_size - want.group_size), s.bits)

    fits = [(distance(s), name) for name, s in PRESETS.items() if allowed(s)]
    return min(fits)[1] if fits else "(none)"


def majority(items: dict[str, ModuleQuant]) -> ModuleQuant | None:
    counts: dict[ModuleQuant, int] = {}
    for mq in items.values():
        counts[mq] = counts.get(mq, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


class Codec:
    """Format-specific behaviour; subclasses fill it in."""

    name: str = ""
    description: str = ""
    loaders: list[str] = []
    zeros_when_symmetric: bool = False  # GPTQ and AWQ store packed zero points even for symmetric schemes
    always_g_idx: bool = False  # GPTQ stores g_idx for every quantized linear; others only with act-order
    module_extra_bytes: int = 0  # fixed bytes per quantized linear (compressed-tensors' weight_shape)

    def scheme_problem(self, scheme: Scheme) -> str | None:
        """Why this format cannot hold `scheme` exactly, or None."""
        return None

    def check_scheme(self, scheme: Scheme) -> None:
        problem = self.scheme_problem(scheme)
        if problem:
            nearest = nearest_preset(scheme, lambda s: self.scheme_problem(s) is None)
            raise SchemeError(f"format {self.name!r} cannot hold {scheme.describe()} exactly: {problem}; "
                              f"nearest scheme it holds: {nearest}")

    def stored_nbytes(self, target: Scheme | None, shape: tuple[int, ...], float_bytes: int) -> int:
        """Bytes one [out, in] weight occupies in this format: packed codes, 16-bit scales, packed zeros, g_idx
        (a float tensor: `float_bytes` per element)."""
        numel = 1
        for d in shape:
            numel *= d
        if target is None:
            return numel * float_bytes
        out_f, in_f = shape
        groups = target.groups_for(in_f)
        scales = out_f * groups * (4 if target.scale_dtype == "float32" else 2)
        words = lambda n: -(-n * target.bits // 32)  # noqa: E731  (n codes packed into int32 words)
        zeros = groups * words(out_f) * 4 if (not target.symmetric or self.zeros_when_symmetric) else 0
        g_idx = in_f * 4 if (self.always_g_idx or target.act_order) else 0
        return out_f * words(in_f) * 4 + scales + zeros + g_idx + self.module_extra_bytes

    def check_tensor(self, name: str, qt: QuantTensor) -> None:
        qt.validate(name)
        problem = self.scheme_problem(Scheme(bits=qt.bits, group_size=qt.group_size, symmetric=qt.symmetric,
                                             scale_dtype=str(qt.scales.dtype).replace("torch.", "")))
        if problem:
            raise SchemeError(f"{name}: format {self.name!r} cannot hold this tensor: {problem}")

    def encode(self, prefix: str, qt: QuantTensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantization_config(self, modules: dict[str, ModuleQuant], unquantized: list[str],
                            provenance: dict[str, Any] | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def extra_files(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        return {}

    def config_sort_keys(self) -> bool:
        return False


class HFQuantWriter:
    """Streaming writer for a quantized HF-layout directory (see the module docstring)."""

    def __init__(self, codec: Codec, out: Path, source_dir: Path | None, config: ModelConfig,
                 schemes: dict[str, Any], options: WriteOptions):
        self.codec = codec
        self.config = config
        self.source_dir = Path(source_dir) if source_dir else None
        self.schemes = {k[: -len(".weight")] if k.endswith(".weight") else k: v for k, v in (schemes or {}).items()}
        for module, scheme in self.schemes.items():
            if isinstance(scheme, Scheme):
                codec.check_scheme(scheme)
        self.options = options
        self.float_dtype = config.dtype
        self.modules: dict[str, ModuleQuant] = {}
        self.float_linears: list[str] = []
        self.errors: dict[str, dict] = {}
        self.dir = OutputDir(out, force=options.force, max_shard_bytes=options.max_shard_bytes)

    def add(self, name: str, tensor: StoredTensor) -> None:
        try:
            self._add(name, tensor)
        except BaseException:
            self.abort()
            raise

    def _add(self, name: str, tensor: StoredTensor) -> None:
        if isinstance(tensor, QuantTensor):
            if not name.endswith(".weight"):
                raise FormatError(f"{name}: a quantized tensor must be a '.weight'")
            prefix = name[: -len(".weight")]
            self.codec.check_tensor(name, tensor)
            for key, t in self.codec.encode(prefix, tensor).items():
                self.dir.add(key, t)
            self.modules[prefix] = module_quant(tensor, self.schemes.get(prefix))
            if tensor.error:
                self.errors[prefix] = {k: v for k, v in tensor.error.items() if isinstance(v, (int, float, str, bool))}
        elif isinstance(tensor, GGMLTensor):
            raise FormatError(f"{name}: format {self.codec.name!r} cannot store a ggml {tensor.type_name} tensor")
        else:
            if arch.is_quantizable_linear(name):
                self.float_linears.append(name[: -len(".weight")])
            self.dir.add(name, tensor.to(self.float_dtype))

    def _check_complete(self) -> None:
        written = set(self.dir.tensor_names()) | {m + ".weight" for m in self.modules}
        for name in arch.canonical_names(self.config.num_hidden_layers):
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name not in written:
                raise FormatError(f"{self.dir.out}: tensor {name!r} was never written; output not created")

    def finish(self) -> Path:
        try:
            self._check_complete()
            prov = dict(self.options.provenance)
            qc = self.codec.quantization_config(self.modules, sorted(self.float_linears), prov)
            cfg = source_config_dict(self.source_dir, self.config, str(self.float_dtype).replace("torch.", ""))
            cfg["quantization_config"] = qc
            self.dir.write_json("config.json", cfg, sort_keys=self.codec.config_sort_keys())
            for fname, obj in self.codec.extra_files(qc).items():
                self.dir.write_json(fname, obj)
            self.dir.copy_tokenizer_files(self.source_dir)
            record = provenance_record(self.codec.name, self.source_dir, prov, self.schemes, self.errors, qc)
            self.dir.write_json("quantkit.json", record)
            base = base_model_name(prov, self.source_dir)
            self.dir.write_text("README.md", model_card(self.codec.name, base, self.codec.description,
                                                        self.codec.loaders, prov))
            return self.dir.finish()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self.dir.closed:
            self.dir.abort()


# ---- reading ----

@dataclass
class StoredModules:
    """A quantized directory's tensors grouped: quantized module prefixes and plain float tensors."""

    files: SafetensorsDir
    quantized: list[str] = field(default_factory=list)
    floats: list[str] = field(default_factory=list)


def group_stored(files: SafetensorsDir, marker: str) -> StoredModules:
    """Split stored names into quantized modules (those with `<prefix>.<marker>`) and float tensors."""
    out = StoredModules(files)
    suffix = "." + marker
    prefixes = {n[: -len(suffix)] for n in files.names() if n.endswith(suffix)}
    out.quantized = sorted(prefixes)
    out.floats = [n for n in files.names() if not any(n.startswith(p + ".") for p in prefixes)]
    return out


def load_model_config(path: Path) -> ModelConfig:
    from quantkit.errors import ConfigError

    try:
        return ModelConfig.from_hf_dict(read_json(path / "config.json"), str(path / "config.json"))
    except ConfigError as e:
        raise FormatError(str(e)) from None


def build_checkpoint(path: Path, fmt: str, config: ModelConfig, stored: StoredModules, decode, qc: dict,
                     metadata: dict | None = None) -> QuantizedCheckpoint:
    """A QuantizedCheckpoint over `stored`: '<prefix>.weight' of a quantized module -> decode(prefix)."""
    files = stored.files
    quantized = {p + ".weight": p for p in stored.quantized}
    float_names = [n for n in stored.floats if n in set(arch.canonical_names(config.num_hidden_layers))]
    known = set(quantized) | set(float_names)
    names = [n for n in arch.canonical_names(config.num_hidden_layers) if n in known]
    expected = config.expected_shapes()
    missing = [n for n in expected if n not in known and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise FormatError(f"{path}: tensor {missing[0]!r} is missing (neither quantized nor float)")
    for n in float_names:
        if n in expected and files.shape(n) != expected[n]:
            raise FormatError(f"{files.files[n]}: tensor {n!r} has shape {list(files.shape(n))}, "
                              f"expected {list(expected[n])} from config.json")

    def loader(name: str) -> StoredTensor:
        if name in quantized:
            qt = decode(quantized[name])
            if name in expected and tuple(qt.shape) != expected[name]:
                raise FormatError(f"{path}: quantized {name!r} decodes to shape {list(qt.shape)}, "
                                  f"expected {list(expected[name])}")
            qt.validate(name)
            return qt
        return files.get(name)

    meta = {"quantization_config": qc}
    if (path / "quantkit.json").exists():
        try:
            meta["provenance"] = read_json(path / "quantkit.json")
        except FormatError:
            pass
    meta.update(metadata or {})
    return QuantizedCheckpoint(path=path, format=fmt, config=config, names=names, loader=loader,
                               tokenizer_path=tokenizer_in(path), metadata=meta)


def require(files: SafetensorsDir, name: str, shape: tuple[int, ...] | None = None,
            dtypes: tuple[str, ...] = ()) -> torch.Tensor:
    """Read a stored tensor, checking presence, shape and dtype with a message that names it."""
    if name not in files:
        raise FormatError(f"{files.path}: tensor {name!r} is missing")
    if shape is not None and files.shape(name) != tuple(shape):
        raise FormatError(f"{files.files[name]}: tensor {name!r} has shape {list(files.shape(name))}, "
                          f"expected {list(shape)}")
    if dtypes and files.dtype(name) not in dtypes:
        raise FormatError(f"{files.files[name]}: tensor {name!r} has dtype {files.dtype(name)}, "
                          f"expected {' or '.join(dtypes)}")
    return files.get(name)
