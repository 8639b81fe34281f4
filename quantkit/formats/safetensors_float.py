"""Full-precision safetensors checkpoints, two layouts, each a registry key:

- `hf`: Hugging Face (`config.json` + `model.safetensors` or `model-0000N-of-0000M.safetensors` + index),
  canonical names, rotate-half Q/K rows.
- `consolidated`: mistral-inference (`params.json` + `consolidated.safetensors`), its own names and interleaved
  Q/K rows (permuted on write, un-permuted on read by model.checkpoint).

Reading reuses `model.checkpoint.open_checkpoint`; writing streams tensors (cast to the requested dtype) into an
atomic output directory. Used by `quantkit convert` and as the source side of `read_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantkit.errors import FormatError, SchemeError
from quantkit.formats.base import QuantizedCheckpoint, StoredTensor, WriteOptions, register
from quantkit.formats.hf_dir import (OutputDir, base_model_name, model_card, provenance_record,
                                     quantization_config_of, source_config_dict)
from quantkit.model import arch
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.config import ModelConfig
from quantkit.quant.scheme import Scheme

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise FormatError(f"dtype {name!r}: choose bf16, f16 or f32") from None


class FloatWriter:
    """Streams float tensors into an `hf` or `consolidated` directory."""

    def __init__(self, layout: str, out: Path, source_dir: Path | None, config: ModelConfig, options: WriteOptions):
        self.layout = layout
        self.config = config
        self.source_dir = Path(source_dir) if source_dir else None
        self.options = options
        self.dtype = parse_dtype(options.extra.get("dtype")) or config.dtype
        max_shard = options.max_shard_bytes if layout == "hf" else 1 << 62  # consolidated is one file
        self.dir = OutputDir(out, force=options.force, max_shard_bytes=max_shard,
                             stem="model" if layout == "hf" else "consolidated")

    def add(self, name: str, tensor: StoredTensor) -> None:
        try:
            if not isinstance(tensor, torch.Tensor):
                raise FormatError(f"{name}: format {self.layout!r} holds float tensors only "
                                  f"(got {type(tensor).__name__}); dequantize first or choose a quantized format")
            t = tensor.to(self.dtype)
            if self.layout == "consolidated":
                heads = self.config.rope_heads(name)
                if heads:
                    t = arch.hf_to_interleaved(t, heads)
                try:
                    name = arch.to_consolidated(name)
                except KeyError:
                    raise FormatError(f"{name}: no mistral-inference name for this tensor") from None
            self.dir.add(name, t)
        except BaseException:
            self.abort()
            raise

    def finish(self) -> Path:
        try:
            dtype_name = str(self.dtype).replace("torch.", "")
            if self.layout == "hf":
                self.dir.write_json("config.json", source_config_dict(self.source_dir, self.config, dtype_name))
            else:
                self.dir.write_json("params.json", self.config.to_params_dict())
            self.dir.copy_tokenizer_files(self.source_dir)
            prov = dict(self.options.provenance)
            prov.setdefault("dtype", dtype_name)
            self.dir.write_json("quantkit.json", provenance_record(self.layout, self.source_dir, prov, {}, {}, None))
            if self.layout == "hf":
                card = model_card(self.layout, base_model_name(prov, self.source_dir),
                                  f"{dtype_name} safetensors, Hugging Face layout", [], prov, relation=None)
                self.dir.write_text("README.md", card)
            return self.dir.finish()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self.dir.closed:
            self.dir.abort()


class FloatFormat:
    def __init__(self, name: str):
        self.name = name

    def check_scheme(self, scheme: Scheme) -> None:
        raise SchemeError(f"format {self.name!r} holds unquantized weights only; nearest formats that hold "
                          f"{scheme.describe()}: gptq, compressed-tensors")

    def open_writer(self, out: Path, source_dir: Path | None, config: ModelConfig, schemes: dict[str, Any],
                    options: WriteOptions) -> FloatWriter:
        if any(s is not None for s in (schemes or {}).values()):
            raise SchemeError(f"format {self.name!r} holds unquantized weights only")
        return FloatWriter(self.name, Path(out), source_dir, config, options)

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir():
            return False
        if self.name == "consolidated":
            return (path / "params.json").is_file() and (path / "consolidated.safetensors").is_file() \
                and not (path / "config.json").is_file()
        return (path / "config.json").is_file() and quantization_config_of(path) is None and (
            (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())

    def read(self, path: Path) -> QuantizedCheckpoint:
        from quantkit.errors import CheckpointError

        try:
            ckpt = open_checkpoint(path)
        except CheckpointError as e:
            raise FormatError(str(e)) from None
        return QuantizedCheckpoint(path=ckpt.path, format=self.name, config=ckpt.config, names=ckpt.tensor_names(),
                                   loader=ckpt.get_tensor, tokenizer_path=ckpt.tokenizer_path,
                                   metadata={"layout": ckpt.layout, "dtypes": ckpt.dtypes()})


HF = register(FloatFormat("hf"))
CONSOLIDATED = register(FloatFormat("consolidated"))
