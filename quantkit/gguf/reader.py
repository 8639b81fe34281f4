"""Read any GGUF file (quantkit's or llama.cpp's) defensively and serve its tensors by canonical name.

The header is parsed here with a bounds check before every read — counts, string and array lengths, dimensions,
type ids, offsets and sizes are checked against the file size before anything is allocated — so a corrupt or
hostile file gives one clear `FormatError` naming the field, never a multi-gigabyte allocation. Tensor data is
memory-mapped and sliced per tensor on demand.

Tensors come back under canonical HF names in HF row order (Q/K rows un-permuted: a row permutation of ggml
block bytes is exact), as `GGMLTensor` for block types and float `torch.Tensor` for F32/F16/BF16.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from quantkit.errors import FormatError
from quantkit.ggml_types import is_float_type, sizes, torch_dtype
from quantkit.model import arch
from quantkit.model.config import ModelConfig
from quantkit.tensors import GGMLTensor

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 4
# (struct format, size) of the scalar value types
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
          7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFTensorInfo:
    name: str  # name in the file
    shape: tuple[int, ...]  # numpy order (ne reversed)
    type_name: str
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    kv: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]  # file name -> info, in file order
    alignment: int
    data_start: int


class _Cursor:
    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated or corrupt GGUF header: {what} needs {n} bytes at offset "
                              f"{self.pos}, but the file has {self.size} bytes")

    def scalar(self, vtype: int, what: str):
        fmt, n = _SCALARS[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            raise FormatError(f"{self.path}: corrupt GGUF: {what} is {n} bytes long, more than the {limit} allowed")
        if n > self.size - self.pos:
            raise FormatError(f"{self.path}: corrupt GGUF: {what} claims {n} bytes at offset {self.pos}, "
                              f"but only {self.size - self.pos} bytes remain in the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            v = self.scalar(vtype, what)
            if vtype == 7:
                if v not in (0, 1):
                    raise FormatError(f"{self.path}: {what}: invalid BOOL value {v}")
                return bool(v)
            return v
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise FormatError(f"{self.path}: {what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
            etype = self.u32(f"{what} element type")
            count = self.u64(f"{what} element count")
            if etype not in _SCALARS and etype not in (STRING, ARRAY):
                raise FormatError(f"{self.path}: {what}: unknown array element type {etype}")
            min_size = _SCALARS[etype][1] if etype in _SCALARS else (8 if etype == STRING else 12)
            if count * min_size > self.size - self.pos:
                raise FormatError(f"{self.path}: corrupt GGUF: {what} claims {count} elements "
                                  f"(at least {count * min_size} bytes) at offset {self.pos}, but only "
                                  f"{self.size - self.pos} bytes remain")
            if etype in _SCALARS:
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos)
                self.pos += count * min_size
                return (arr.astype(bool) if etype == 7 else arr).tolist()
            return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]
        raise FormatError(f"{self.path}: {what}: unknown value type {vtype}")


def parse_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF header; raises FormatError naming the first problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        if size < 24:
            raise FormatError(f"{path}: not a GGUF file (only {size} bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(buf, size, path)
    finally:
        buf.close()


def _parse(buf, size: int, path: Path) -> GGUFFile:
    c = _Cursor(buf, size, path)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    c.pos = 4
    version = c.u32("version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = c.u64("tensor_count")
    n_kv = c.u64("metadata_kv_count")
    # every KV takes >= 8 (key length) + 4 (type) + 1 bytes; every tensor info >= 8 + 4 + 8 + 4 + 8 bytes
    if n_kv * 13 > size - c.pos:
        raise FormatError(f"{path}: corrupt GGUF: metadata_kv_count {n_kv} cannot fit in a {size}-byte file")
    if n_tensors * 32 > size - c.pos:
        raise FormatError(f"{path}: corrupt GGUF: tensor_count {n_tensors} cannot fit in a {size}-byte file "
                          f"(at least {n_tensors * 32} bytes of tensor infos)")
    kv: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", limit=65535)
        vtype = c.u32(f"type of {key!r}")
        if key in kv:
            raise FormatError(f"{path}: duplicate metadata key {key!r}")
        kv[key] = c.value(vtype, f"metadata {key!r}")
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment {alignment!r} is not a power of two")
    raw_infos = []
    names = set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor #{i}", limit=1024)
        if name in names:
            raise FormatError(f"{path}: duplicate tensor name {name!r}")
        names.add(name)
        n_dims = c.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(f"{path}: tensor {name!r} has {n_dims} dimensions (expected 1..{MAX_DIMS})")
        ne = [c.u64(f"dimension {j} of tensor {name!r}") for j in range(n_dims)]
        type_id = c.u32(f"type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise FormatError(f"{path}: tensor {name!r} has unknown ggml type id {type_id}") from None
        if qtype.name not in sizes():
            raise FormatError(f"{path}: tensor {name!r} has ggml type {qtype.name} with no known block size")
        offset = c.u64(f"offset of tensor {name!r}")
        blck, tsize = sizes()[qtype.name]
        if any(d == 0 for d in ne) or ne[0] % blck:
            raise FormatError(f"{path}: tensor {name!r} has dimensions {ne}; ne[0] must be a positive multiple of "
                              f"the {qtype.name} block size {blck}")
        n_rows = 1
        for d in ne[1:]:
            n_rows *= d
        if n_rows > size or ne[0] > size * blck:  # cheap overflow guard before multiplying
            raise FormatError(f"{path}: tensor {name!r} dimensions {ne} are larger than the file could hold")
        nbytes = ne[0] // blck * tsize * n_rows
        if offset % alignment:
            raise FormatError(f"{path}: tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        raw_infos.append((name, tuple(reversed(ne)), qtype.name, offset, nbytes))
    data_start = -(-c.pos // alignment) * alignment
    data_size = size - data_start
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, type_name, offset, nbytes in raw_infos:
        if offset + nbytes > data_size:
            raise FormatError(f"{path}: truncated GGUF: tensor {name!r} ({type_name}, {nbytes} bytes at data offset "
                              f"{offset}) ends past the end of the file (data section has {max(data_size, 0)} bytes)")
        tensors[name] = GGUFTensorInfo(name, shape, type_name, data_start + offset, nbytes)
    previous = None
    for info in sorted(tensors.values(), key=lambda t: t.offset):
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise FormatError(f"{path}: corrupt GGUF: tensor {info.name!r} (data offset {info.offset - data_start}) "
                              f"overlaps tensor {previous.name!r} (data offset {previous.offset - data_start}, "
                              f"{previous.nbytes} bytes); every tensor needs its own bytes")
        previous = info
    return GGUFFile(path, version, kv, tensors, alignment, data_start)


# ---- tensors by canonical name (formats/gguf.py wraps them as a QuantizedCheckpoint) ----

def config_from_kv(kv: dict[str, Any], tensors: dict[str, GGUFTensorInfo], path: Path) -> ModelConfig:
    gguf_arch = kv.get("general.architecture")
    if gguf_arch != "llama":
        raise FormatError(f"{path}: general.architecture is {gguf_arch!r}; "
                          "quantkit reads 'llama' GGUFs (Mistral, Llama)")

    keys = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
            "num_attention_heads": "attention.head_count", "intermediate_size": "feed_forward_length",
            "vocab_size": "vocab_size", "num_key_value_heads": "attention.head_count_kv",
            "head_dim": "attention.key_length", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
            "rope_theta": "rope.freq_base", "max_position_embeddings": "context_length"}
    values = {f: kv.get(f"llama.{k}") for f, k in keys.items()}
    keys = {f: f"llama.{k}" for f, k in keys.items()}
    for f in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        if values[f] is None:
            raise FormatError(f"{path}: metadata {keys[f]} is missing")
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise FormatError(f"{path}: tensor token_embd.weight is missing")
    if values["head_dim"] is None:
        values["head_dim"], keys["head_dim"] = kv.get("llama.rope.dimension_count"), "llama.rope.dimension_count"
    eps = values["rms_norm_eps"]
    defaults = {"vocab_size": embd.shape[0], "num_key_value_heads": values["num_attention_heads"],
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768}
    values |= {f: d for f, d in defaults.items() if values[f] is None}
    if isinstance(eps, float):  # stored as float32: the shortest decimal that rounds to it
        values["rms_norm_eps"] = float(f"{eps:.7g}")
    architecture = kv.get("quantkit.architecture")
    if architecture not in ("MistralForCausalLM", "LlamaForCausalLM"):
        name = str(kv.get("general.name", "")).lower() + str(kv.get("general.basename", "")).lower()
        architecture = "MistralForCausalLM" if "mistral" in name else "LlamaForCausalLM"
    keys |= {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id"}
    return ModelConfig(
        architecture=architecture,
        **values,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=kv.get("tokenizer.ggml.bos_token_id", 1),
        eos_token_id=kv.get("tokenizer.ggml.eos_token_id", 2),
        torch_dtype="float32",
        raw={"gguf": True},
        source=str(path),
        keys=keys,
    )


def unpermute_rows(name: str, rows: np.ndarray | torch.Tensor, config: ModelConfig):
    """GGUF -> HF row order for q_proj / k_proj."""
    heads = config.rope_heads(name)
    if not heads:
        return rows
    if isinstance(rows, np.ndarray):
        return arch.interleaved_to_hf(torch.from_numpy(rows), heads).numpy()
    return arch.interleaved_to_hf(rows, heads)


class GGUFModel:
    """A parsed GGUF with lazy, validated per-tensor access under canonical names."""

    def __init__(self, path: str | Path):
        self.file = parse_gguf(path)
        self.path = self.file.path
        self._bytes: torch.Tensor | None = None  # the file's private mapping (_mapping)
        self._unpermuted: set[str] = set()  # q/k tensors already put in HF row order inside it
        self.config = config_from_kv(self.file.kv, self.file.tensors, self.path)
        self.names: dict[str, GGUFTensorInfo] = {}
        expected = self.config.expected_shapes()
        for gname, info in self.file.tensors.items():
            try:
                canonical = arch.from_gguf(gname)
            except KeyError:
                continue  # e.g. rope_freqs.weight: not used by Mistral/Llama-2
            if canonical in expected and tuple(expected[canonical]) != info.shape:
                raise FormatError(f"{self.path}: tensor {gname!r} has shape {list(info.shape)}, expected "
                                  f"{list(expected[canonical])} from the metadata")
            self.names[canonical] = info
        missing = [n for n in expected if n not in self.names]
        if missing:
            raise FormatError(f"{self.path}: tensor {arch.to_gguf(missing[0])!r} is missing")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored in the file (GGUF row order), [rows, bytes per row], read-only."""
        info = self.names[name]
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        return data.reshape(_rows(info), -1)

    def _mapping(self) -> torch.Tensor:
        """The whole file as one uint8 tensor over a private (copy-on-write) memory map, made on first use. `load`
        serves views into it: nothing is copied at load, pages come in from the page cache as they are first read,
        and tensors that are neighbours in the file stay neighbours in memory (runtime/model.py fuses such q|k|v and
        gate|up rows without a copy)."""
        if self._bytes is None:
            with open(self.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._bytes = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the map alive as long as any view
        return self._bytes

    def load(self, name: str):
        """The tensor under its canonical name, in HF row order: a view into the file's private mapping (q/k rows
        are un-permuted in place there, once: those pages become private to this process). Every load of a name
        returns the same bytes; callers must not write into them."""
        info = self.names[name]
        rows = self._mapping()[info.offset:info.offset + info.nbytes].numpy().reshape(_rows(info), -1)
        if self.config.rope_heads(name) and name not in self._unpermuted:
            rows[...] = np.array(unpermute_rows(name, rows, self.config))
            self._unpermuted.add(name)
        if is_float_type(info.type_name):
            return torch.from_numpy(np.ascontiguousarray(rows)).view(torch_dtype(info.type_name)).reshape(info.shape)
        return GGMLTensor(info.type_name, info.shape, np.ascontiguousarray(rows))


def _rows(info: GGUFTensorInfo) -> int:
    rows = 1
    for d in info.shape[:-1]:
        rows *= d
    return rows


def tokenizer_model_path(kv: dict[str, Any], cache_dir: Path | None = None) -> Path | None:
    """Rebuild (once, cached by content hash) a sentencepiece tokenizer.model from the GGUF vocabulary."""
    from quantkit.gguf.tokenizer_export import sentencepiece_from_vocab, vocab_from_kvs

    try:
        vocab = vocab_from_kvs(kv, "gguf")
        if vocab is None or vocab.extra.get("model") != "llama":
            return None
        blob = sentencepiece_from_vocab(vocab)
    except FormatError:
        return None
    digest = hashlib.sha256(blob).hexdigest()[:16]
    if cache_dir is None:
        from quantkit.cache import cache_dir as quantkit_cache

        cache_dir = quantkit_cache() / "gguf-tokenizers"
    target = cache_dir / digest / "tokenizer.model"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(target)
    return target
