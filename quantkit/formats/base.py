"""The format registry and the writer/reader protocol every output format implements.

Registry key = CLI string (`--format gptq`) = on-disk string (`quant_method` / `format` / file type).
A Format writes a stream of tensors (quantized or float) and reads a checkpoint back as QuantizedCheckpoint,
which serves every tensor under its canonical HF name and HF row order (Q/K un-permuted for GGUF):
  - QuantTensor (integer group-affine), GGMLTensor (ggml blocks), or a float torch.Tensor (norms, embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from quantkit.errors import FormatError
from quantkit.model.config import ModelConfig
from quantkit.quant.scheme import Scheme
from quantkit.tensors import GGMLTensor, QuantTensor

StoredTensor = QuantTensor | GGMLTensor | torch.Tensor
# what the pipeline turns one source tensor into: an integer Scheme, a ggml type name, or None (kept float)
Target = Scheme | str | None


@dataclass
class QuantizedCheckpoint:
    """A quantized (or float) checkpoint as read back by a Format: lazy tensor access by canonical name."""

    path: Path
    format: str
    config: ModelConfig
    names: list[str]
    loader: Callable[[str], StoredTensor]  # canonical name -> tensor
    tokenizer_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # quantization_config, provenance, GGUF KVs, ...

    def get(self, name: str) -> StoredTensor:
        if name not in self.names:
            raise FormatError(f"{self.path}: no tensor {name!r}")
        return self.loader(name)

    def __contains__(self, name: str) -> bool:
        return name in self.names


@dataclass
class WriteOptions:
    force: bool = False
    max_shard_bytes: int = 5 * 1000**3
    provenance: dict[str, Any] = field(default_factory=dict)  # written to quantkit.json / GGUF quantkit.* keys
    file_type: str | None = None  # GGUF: the llama-quantize file type (Q4_K_M, ...) the targets come from
    importance_meta: dict[str, Any] | None = None  # GGUF: where the importance matrix came from (imatrix.* keys)
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific (e.g. GGUF file type name)


class Writer(Protocol):
    """Streaming writer: `add` each tensor in file order, then `finish` (atomic rename) or `abort`."""

    def add(self, name: str, tensor: StoredTensor) -> None: ...

    def finish(self) -> Path: ...

    def abort(self) -> None: ...


class Format(Protocol):
    name: str  # registry key

    def check_scheme(self, scheme: Scheme) -> None:
        """Raise SchemeError (naming the nearest scheme it can hold) if this format cannot hold `scheme` exactly."""

    def stored_nbytes(self, target: Target, shape: tuple[int, ...], float_bytes: int) -> int:
        """Bytes one tensor of `shape` occupies in this format under `target` (`float_bytes` per element when
        it stays float): what the plan reports, so the plan holds no per-format rules."""

    def open_writer(self, out: Path, source_dir: Path, config: ModelConfig, schemes: dict[str, Any],
                    options: WriteOptions) -> Writer: ...

    def detect(self, path: Path) -> bool: ...

    def read(self, path: Path) -> QuantizedCheckpoint: ...


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def _load_builtin_formats() -> None:
    import importlib

    for module in ("gptq", "awq", "compressed_tensors", "gguf", "safetensors_float", "dump"):
        importlib.import_module(f"quantkit.formats.{module}")


def get_format(name: str) -> Format:
    _load_builtin_formats()
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(sorted(FORMATS))}") from None


def detect_format(path: str | Path) -> Format:
    _load_builtin_formats()
    path = Path(path)
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt
    raise FormatError(f"{path}: not a checkpoint quantkit can read "
                      "(no GGUF, GPTQ, AWQ, compressed-tensors or float layout)")


def read_checkpoint(path: str | Path) -> QuantizedCheckpoint:
    """Any checkpoint quantkit reads (quantized formats and full-precision safetensors) as a QuantizedCheckpoint."""
    return detect_format(path).read(Path(path))


