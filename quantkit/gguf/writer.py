"""Streaming GGUF writer for llama-architecture models (Mistral, Llama) with the `gguf` package.

The tensor types are planned up front (`mixes.tensor_types`), so the header — KVs and tensor infos with their
offsets — is written first with `gguf.GGUFWriter`; each tensor's bytes are then written at its own offset as it
arrives (any order), and released. Peak memory is one tensor. The file is built as a temporary sibling and
renamed on `finish`; `abort` (or an exception inside `with`) deletes it.

Metadata follows llama.cpp's converter for `LlamaModel` (formats/gguf.md): general.*, llama.* hyper-parameters
(rope freq base, head counts, norm epsilon, context length, ...), file type, quantization version 2, the
sentencepiece vocabulary. Q/K rows are permuted from HF (rotate-half) order to GGUF's interleaved order
(`arch.hf_to_interleaved`) — for block bytes too: a row permutation of ggml rows is exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from quantkit import __version__
from quantkit.errors import FormatError
from quantkit.ggml_types import tensor_nbytes
from quantkit.gguf import codec
from quantkit.gguf.mixes import get_file_type
from quantkit.gguf.tokenizer_export import GGUFVocab
from quantkit.io import check_output_path, move_into_place, temp_file_beside
from quantkit.model import arch
from quantkit.model.config import ModelConfig
from quantkit.tensors import GGMLTensor, QuantTensor

if TYPE_CHECKING:
    from quantkit.gguf.encode_pool import ProcessEncoder

ALIGNMENT = 32
QUANTIZATION_VERSION = 2


@dataclass
class PlannedTensor:
    name: str  # canonical
    gguf_name: str
    shape: tuple[int, ...]  # numpy order ([out, in])
    type_name: str
    nbytes: int
    offset: int = 0  # relative to the data section
    written: bool = False


def _size_label(n_params: int) -> str:
    from gguf.utility import size_label

    return size_label(n_params, 0, 0, 0)


def display_name(source_name: str) -> str:
    """'mistral-nano' -> 'Mistral Nano', as llama.cpp's converter names models after their directory."""
    return " ".join(w.title() if w.islower() and not w[:1].isdigit() and not (w[:1] == "v" and w[1:2].isdigit())
                    else w for w in source_name.strip().replace("-", " ").split())


def model_kvs(config: ModelConfig, file_type: int, name: str | None,
              describe: bool = True) -> list[tuple[str, str, Any]]:
    """The general.* and llama.* KVs of llama.cpp's converter, in its order (`describe`: name and size label)."""
    prefix = config.arch.gguf_arch
    kvs: list[tuple[str, str, Any]] = [("general.type", "STRING", "model")]
    if describe and name:
        kvs.append(("general.name", "STRING", name))
    if describe:
        kvs.append(("general.size_label", "STRING", _size_label(config.num_parameters())))
    kvs += [
        (f"{prefix}.block_count", "UINT32", config.num_hidden_layers),
        (f"{prefix}.context_length", "UINT32", config.max_position_embeddings),
        (f"{prefix}.embedding_length", "UINT32", config.hidden_size),
        (f"{prefix}.feed_forward_length", "UINT32", config.intermediate_size),
        (f"{prefix}.attention.head_count", "UINT32", config.num_attention_heads),
        (f"{prefix}.attention.head_count_kv", "UINT32", config.num_key_value_heads),
        (f"{prefix}.rope.freq_base", "FLOAT32", float(config.rope_theta)),
        (f"{prefix}.attention.layer_norm_rms_epsilon", "FLOAT32", float(config.rms_norm_eps)),
        (f"{prefix}.attention.key_length", "UINT32", config.head_dim),
        (f"{prefix}.attention.value_length", "UINT32", config.head_dim),
        ("general.file_type", "UINT32", int(file_type)),
        (f"{prefix}.vocab_size", "UINT32", config.vocab_size),
        (f"{prefix}.rope.dimension_count", "UINT32", config.head_dim),
        ("general.quantization_version", "UINT32", QUANTIZATION_VERSION),
    ]
    return kvs


def _model_card_metadata(model_dir, name: str | None, quantized_by: str, config: ModelConfig):
    """general.* from the source's model card (README.md front matter) exactly as llama.cpp's converter reads it
    (the `gguf` package's own `Metadata.load`)."""
    from gguf.metadata import Metadata

    n_params = config.num_parameters()
    meta = Metadata.load(None, Path(model_dir), None, n_params)
    if meta.name is None and name:
        meta.name = name
    if meta.size_label is None:
        meta.size_label = _size_label(n_params)
    meta.quantized_by = quantized_by
    return meta


def _add_kv(w: GGUFWriter, key: str, vtype: str, value: Any) -> None:
    if vtype.startswith("ARRAY:"):
        w.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType[vtype[6:]])
    else:
        w.add_key_value(key, value, GGUFValueType[vtype])


def permute_rows_for_gguf(name: str, rows: np.ndarray, config: ModelConfig) -> np.ndarray:
    """HF -> GGUF row order for q_proj / k_proj (any per-row data: floats or ggml block bytes)."""
    heads = config.rope_heads(name)
    if not heads:
        return rows
    return arch.hf_to_interleaved(torch.from_numpy(rows), heads).numpy()


class GGUFFileWriter:
    """Write one GGUF file: tensors arrive as float torch tensors (encoded here) or GGMLTensors (HF row order)."""

    def __init__(self, out: str | Path, config: ModelConfig, types: dict[str, str], *, ftype: str,
                 vocab: GGUFVocab | None = None, name: str | None = None, quantized_by: str = "quantkit",
                 extra_kvs: list[tuple[str, str, Any]] = (), importance: dict[str, torch.Tensor] | None = None,
                 force: bool = False, progress: bool = True, model_dir: str | Path | None = None,
                 encoder_pool: ProcessEncoder | None = None):
        self.out = check_output_path(out, force)
        self.encoder_pool = encoder_pool
        self.config = config
        self.importance = importance or {}
        expected = config.expected_shapes()
        unknown = [n for n in types if n not in expected]
        if unknown:
            raise FormatError(f"{self.out}: tensor {unknown[0]!r} is not part of a {config.architecture} model")
        missing = [n for n in expected if n not in types]
        if missing:
            raise FormatError(f"{self.out}: no GGUF type planned for tensor {missing[0]!r}")
        self.plan: dict[str, PlannedTensor] = {}
        offset = 0
        for n, t in types.items():
            shape = expected[n]
            p = PlannedTensor(n, arch.to_gguf(n), shape, t, tensor_nbytes(shape, t), offset)
            offset += -(-p.nbytes // ALIGNMENT) * ALIGNMENT
            self.plan[n] = p
        self.data_size = offset

        self.tmp = temp_file_beside(self.out)
        try:
            w = GGUFWriter(None, config.arch.gguf_arch)
            meta = _model_card_metadata(model_dir, name, quantized_by, config) if model_dir else None
            kvs = model_kvs(config, get_file_type(ftype).llama_ftype, name, describe=meta is None)
            if meta is None:
                kvs.insert(2 if name else 1, ("general.quantized_by", "STRING", quantized_by))
            _add_kv(w, *kvs[0])
            if meta is not None:
                meta.set_gguf_meta_model(w)  # general.name, size_label, license, tags, languages, ... (model card)
            for key, vtype, value in kvs[1:]:
                _add_kv(w, key, vtype, value)
            for key, vtype, value in (vocab.kvs() if vocab else []):
                _add_kv(w, key, vtype, value)
            _add_kv(w, "quantkit.version", "STRING", __version__)
            _add_kv(w, "quantkit.architecture", "STRING", config.architecture)
            for key, vtype, value in extra_kvs:
                _add_kv(w, key, vtype, value)
            for p in self.plan.values():
                w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes,
                                  raw_dtype=GGMLQuantizationType[p.type_name])
            w.write_header_to_file(self.tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            self._f = w.fout[0]
            header_end = self._f.tell()
            self.data_start = -(-header_end // ALIGNMENT) * ALIGNMENT
            self._f.write(b"\0" * (self.data_start - header_end))
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        self._bar = None
        if progress:
            from quantkit.progress import progress as progress_bar

            self._bar = progress_bar(total=self.data_size, unit="B", unit_scale=True, desc=f"writing {self.out.name}",
                                     leave=False)
        self._done = False

    # ---- Writer protocol ----

    def add(self, name: str, tensor: Any) -> None:
        p = self.plan.get(name)
        if p is None:
            raise FormatError(f"{self.out}: tensor {name!r} is not in the GGUF plan")
        if p.written:
            raise FormatError(f"{self.out}: tensor {name!r} added twice")
        if isinstance(tensor, QuantTensor):
            raise FormatError(f"{self.out}: tensor {name!r} is an integer group-affine QuantTensor; GGUF holds ggml "
                              f"block types only (quantize it to {p.type_name} with a ggml grid)")
        if isinstance(tensor, torch.Tensor):
            if tuple(tensor.shape) != p.shape:
                raise FormatError(f"{self.out}: tensor {name!r} has shape {list(tensor.shape)}, "
                                  f"expected {list(p.shape)}")
            tensor = codec.encode(tensor, p.type_name, self.importance.get(name), name=name, pool=self.encoder_pool)
        if not isinstance(tensor, GGMLTensor):
            raise FormatError(f"{self.out}: tensor {name!r}: cannot write a {type(tensor).__name__} to GGUF")
        if tensor.type_name != p.type_name or tuple(tensor.shape) != p.shape:
            raise FormatError(f"{self.out}: tensor {name!r} is {tensor.type_name} {list(tensor.shape)}, "
                              f"the plan says {p.type_name} {list(p.shape)}")
        rows = codec.raw_bytes(tensor)
        if rows.nbytes != p.nbytes:
            raise FormatError(f"{self.out}: tensor {name!r} has {rows.nbytes} bytes of {p.type_name} data, "
                              f"expected {p.nbytes}")
        rows = permute_rows_for_gguf(name, rows, self.config)
        with self._naming_faults():
            self._f.seek(self.data_start + p.offset)
            self._f.write(np.ascontiguousarray(rows).data)
        p.written = True
        if self._bar is not None:
            self._bar.update(p.nbytes)

    def finish(self) -> Path:
        missing = [n for n, p in self.plan.items() if not p.written]
        if missing:
            self.abort()
            raise FormatError(f"{self.out}: tensor {missing[0]!r} was never written ({len(missing)} missing)")
        with self._naming_faults():
            self._f.truncate(self.data_start + self.data_size)
            self._f.flush()
            self._f.close()
        if self._bar is not None:
            self._bar.close()
        move_into_place(self.tmp, self.out)
        self._done = True
        return self.out

    @contextlib.contextmanager
    def _naming_faults(self):
        """A failed write (disk full, file-size limit) names the output, not an anonymous file object."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                e.filename = str(self.out)
            raise

    def abort(self) -> None:
        if self._done:
            return
        try:
            self._f.close()
        except Exception:
            pass
        if self._bar is not None:
            self._bar.close()
        self.tmp.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> "GGUFFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
