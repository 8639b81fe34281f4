"""Property-based fuzzing of the readers of untrusted files (issue 13 part 5).

Every reader starts from a VALID tiny file quantkit wrote itself (safetensors checkpoints in the three layouts, a
GGUF with and without a tokenizer, GPTQ / AWQ / compressed-tensors outputs of `quantkit.quantize`) and reads it
back after hypothesis MUTATES it: JSON values swapped for other types, huge or negative numbers, keys removed,
safetensors `data_offsets` reversed / overlapping / missized, tensors duplicated or present in two shards, GGUF
counts, dimensions, type ids, offsets and KV types rewritten, bytes flipped, inserted or truncated.

Property: the public reading path (`open_checkpoint`, `read_checkpoint`, `quantkit.inspect`, `quantkit.load`, the
config and GGUF parsers) either succeeds or raises a `QuantkitError`. Anything else -- TypeError, KeyError,
OverflowError, MemoryError, RecursionError, struct.error, a SafetensorError, a hang -- is a finding, and the test
fails with hypothesis's minimal falsifying mutation. Each example runs under a per-example deadline and a hard
timer, with the address space capped a few GiB above the current size, so a blow-up is a failure, not a dead
machine.

This file is the SHORT run (derandomized, a few dozen examples per reader, well under a minute on one core):

    pytest tests/test_fuzz_readers.py
    QUANTKIT_FUZZ_PROFILE=quantkit-fuzz-dev pytest tests/test_fuzz_readers.py     # more examples, random seed

The LONG run, which collects every distinct finding instead of stopping at the first, is
`python benchmarks/fuzz_readers.py --examples 300` (it imports the machinery below).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import math
import os
import resource
import shutil
import signal
import struct
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit.errors import QuantkitError

# ---- hypothesis profiles: CI is reproducible (derandomized), dev explores ----

settings.register_profile(
    "quantkit-fuzz-ci", max_examples=40, derandomize=True, database=None, deadline=5000, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile(
    "quantkit-fuzz-dev", max_examples=400, derandomize=False, database=None, deadline=5000, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
FUZZ = settings.get_profile(os.environ.get("QUANTKIT_FUZZ_PROFILE", "quantkit-fuzz-ci"))

HARD_TIMEOUT_S = 30.0  # one example; the hypothesis deadline (5 s) reports slow ones, this stops a hang
MEMORY_HEADROOM = 3 << 30  # address space an example may add before allocations fail (MemoryError: a finding)

# ---- mutation values ----

INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 4096, 32000,
                    2**31 - 1, 2**31, 2**32 - 1, 2**32, 10**9, 10**12, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                    10**30, -2**31, -2**63, -10**9]
INTERESTING_FLOATS = [0.0, -0.0, 0.5, 1.5, -1.0, 1e-45, 1e308, float("inf"), float("-inf"), float("nan")]
class LongStr(str):
    """A long string whose repr stays short in a reproducer."""

    def __repr__(self) -> str:
        return f"{self[:1]!r} * {len(self)}"


INTERESTING_STRINGS = ["", "abc", "32", "-1", "1e9", "null", "(", "+:(", "re:(", "-:(", "re:.*", "Linear", "gptq",
                       "gptq_v2", "marlin", "awq", "gemm", "gemv", "pack-quantized", "compressed", "frozen", "group",
                       "channel", "tensor", "int", "float", "MistralForCausalLM", "LlamaForCausalLM",
                       "Qwen2ForCausalLM", "bfloat16", "float16", "torch.float32", "int8", "linear", "yarn", "llama",
                       "gpt2", "../x", "/dev/null", "\x00", "é\u2028\U0001f600", "model.safetensors",
                       "model-00001-of-00003.safetensors", "model.layers.0.self_attn.q_proj", LongStr("a" * 70000)]


class Deep(NamedTuple):
    """A JSON array nested `depth` levels deep (written as raw text: json.dumps would recurse itself)."""

    depth: int


class Raw(NamedTuple):
    """Bytes written as they are where a string goes (invalid UTF-8 in a GGUF string)."""

    data: bytes


json_scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(INTERESTING_INTS), st.integers(),
    st.sampled_from(INTERESTING_FLOATS), st.floats(), st.sampled_from(INTERESTING_STRINGS), st.text(max_size=12))
json_values = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(["type", "rope_type", "bits", "group_size", "factor", "weights",
                                               "targets", "format", "num_bits", "strategy"]), st.text(max_size=6)),
                    json_scalars, max_size=3),
    st.builds(Deep, st.sampled_from([3, 64, 2000, 100_000])),
    st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6),
)


def near(value) -> st.SearchStrategy:
    """Values close to a valid one: off by one, doubled, halved, negated, of a neighbouring type."""
    if isinstance(value, bool):
        return st.sampled_from([not value, 0, 1, 2, "true", None])
    if isinstance(value, int):
        return st.sampled_from(sorted({value - 1, value + 1, 2 * value, value // 2, -value, value * 1000,
                                       value * 10**9, 0, float(value), str(value)}, key=repr))
    if isinstance(value, float):
        return st.sampled_from([-value, value * 1e30, 0.0, int(value), str(value)])
    if isinstance(value, str):
        return st.sampled_from([value.upper(), value + "x", value[:-1], [value], None])
    if isinstance(value, list):
        return st.one_of(st.just(value[:-1]), st.just(value + value), st.just(list(reversed(value))),
                         st.lists(json_scalars, min_size=len(value), max_size=len(value)))
    return st.nothing()


def dumps(value) -> str:
    """JSON text for `value`, with Deep nesting written raw and NaN/Infinity as Python's json writes them."""
    if isinstance(value, Deep):
        return "[" * value.depth + "]" * value.depth
    if isinstance(value, Raw):
        return json.dumps(value.data.decode("latin-1"))
    if isinstance(value, dict):
        return "{" + ", ".join(json.dumps(str(k)) + ": " + dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


# ---- mutation operations (their repr is the reproducer a finding reports) ----

class JsonSet(NamedTuple):
    file: str
    path: tuple
    value: Any


class JsonDel(NamedTuple):
    file: str
    path: tuple


class JsonRoot(NamedTuple):
    file: str
    value: Any


class StSet(NamedTuple):  # one field (dtype / shape / data_offsets) of one safetensors header entry
    file: str
    tensor: str
    field: str
    value: Any


class StDelField(NamedTuple):
    file: str
    tensor: str
    field: str


class StEntry(NamedTuple):  # a whole header entry replaced by some other JSON value
    file: str
    tensor: str
    value: Any


class StReshape(NamedTuple):  # shape and dtype changed consistently (data resized, offsets laid out again)
    file: str
    tensor: str
    shape: list
    dtype: str


class StAdd(NamedTuple):  # a tensor added (consistently), its values copied from tensor `like`
    file: str
    tensor: str
    shape: list
    dtype: str
    like: str


class StDrop(NamedTuple):
    file: str
    tensor: str


class StDup(NamedTuple):  # the same key twice in the header, the second time with these data_offsets
    file: str
    tensor: str
    data_offsets: Any


class StRename(NamedTuple):
    file: str
    tensor: str
    name: str


class StMeta(NamedTuple):  # __metadata__ replaced (None: removed)
    file: str
    value: Any


class StRoot(NamedTuple):  # the header is not an object
    file: str
    value: Any


class StHeaderLen(NamedTuple):  # the u64 header length prefix lies
    file: str
    value: int


class StCopyTo(NamedTuple):  # the tensor is present in two shards
    file: str
    tensor: str
    other: str


class StIntData(NamedTuple):  # an integer tensor's data element (index -1: every element) rewritten
    file: str
    tensor: str
    index: int
    value: int


class GgHeader(NamedTuple):  # magic / version / tensor_count / metadata_kv_count
    field: str
    value: Any


class GgKvSet(NamedTuple):  # a metadata KV (new or existing) with this value type and value
    key: str
    vtype: int
    value: Any


class GgKvDel(NamedTuple):
    key: str


class GgKvDup(NamedTuple):
    key: str


class GgKvArray(NamedTuple):  # an array KV: truncated to `index` items, one item set, or item appended
    key: str
    action: str
    index: int
    value: Any


class GgTensor(NamedTuple):  # a tensor info field: ne / type / offset / name, or drop / dup
    tensor: str
    field: str
    value: Any


class GgPatch(NamedTuple):  # a raw header field (a length, count, type id, ...) overwritten where it lies
    field: tuple
    value: int


class Bytes(NamedTuple):  # byte-level: truncate / flip / insert / append at pos (modulo the file length)
    file: str
    action: str
    pos: int
    data: bytes


class FileOp(NamedTuple):  # remove / empty / directory (a directory where the file should be)
    file: str
    action: str


RAW_OPS = (Bytes,)


# ---- safetensors files ----

@dataclass
class SafetensorsDoc:
    """A safetensors file as [name, meta, data] entries. An entry whose data is None keeps the data_offsets its
    meta says (a raw edit); with `repack`, the others are laid out again back to back and their offsets rewritten,
    so a consistent edit (reshape, drop, a tensor added) passes the container checks and reaches the format."""

    entries: list  # [name, meta, bytes | None] in file order (duplicates allowed)
    data: bytes
    root: Any = None  # a non-object header replacing everything
    header_len: int | None = None  # a lying length prefix
    repack: bool = False

    @classmethod
    def parse(cls, blob: bytes) -> "SafetensorsDoc":
        (n,) = struct.unpack_from("<Q", blob, 0)
        pairs = json.loads(blob[8:8 + n], object_pairs_hook=list)
        data = blob[8 + n:]
        entries = []
        for k, v in pairs:
            meta = dict(v) if isinstance(v, list) else v
            part = None
            if k != "__metadata__":
                start, end = meta["data_offsets"]
                part = data[start:end]
            entries.append([k, meta, part])
        return cls(entries, data)

    def find(self, name: str):
        for e in self.entries:
            if e[0] == name:
                return e
        return None

    def tensors(self) -> list[tuple[str, dict]]:
        return [(k, v) for k, v, _ in self.entries if k != "__metadata__"]

    def serialize(self) -> bytes:
        data = self.data
        if self.repack:
            out = bytearray()
            for entry in self.entries:
                if entry[2] is not None and isinstance(entry[1], dict):
                    entry[1]["data_offsets"] = [len(out), len(out) + len(entry[2])]
                    out += entry[2]
            data = bytes(out)
        text = dumps(self.root) if self.root is not None else (
            "{" + ", ".join(json.dumps(k) + ": " + dumps(v) for k, v, _ in self.entries) + "}")
        head = text.encode("utf-8", "surrogatepass")
        head += b" " * (-len(head) % 8)
        n = len(head) if self.header_len is None else self.header_len % 2**64
        return struct.pack("<Q", n) + head + data


INT_DTYPES = {"I8": "<b", "U8": "<B", "I16": "<h", "U16": "<H", "I32": "<i", "U32": "<I", "I64": "<q", "U64": "<Q"}
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_RESHAPE_BYTES = 1 << 24


def _resized(blob: bytes, nbytes: int) -> bytes:
    """`blob` repeated or cut to `nbytes` (the new tensor keeps realistic values)."""
    if nbytes <= len(blob):
        return blob[:nbytes]
    return (blob * (nbytes // max(len(blob), 1) + 1))[:nbytes] if blob else bytes(nbytes)


def _apply_safetensors(doc: SafetensorsDoc, op, seeds: "Seeds", seed: str) -> None:
    entry = doc.find(op.tensor) if hasattr(op, "tensor") else None
    meta = entry[1] if entry is not None and isinstance(entry[1], dict) else None
    if isinstance(op, StSet):
        if meta is not None:
            meta[op.field] = op.value
            if op.field == "data_offsets":
                entry[2] = None
    elif isinstance(op, StDelField):
        if meta is not None:
            meta.pop(op.field, None)
            if op.field == "data_offsets":
                entry[2] = None
    elif isinstance(op, StEntry):
        if entry is not None:
            entry[1] = op.value
    elif isinstance(op, StReshape):
        if meta is not None and op.dtype in ITEM_BYTES and entry[2] is not None:
            nbytes = ITEM_BYTES[op.dtype] * math.prod(op.shape)
            if nbytes <= MAX_RESHAPE_BYTES:
                meta["shape"], meta["dtype"] = list(op.shape), op.dtype
                entry[2] = _resized(entry[2], nbytes)
                doc.repack = True
    elif isinstance(op, StAdd):
        if op.dtype in ITEM_BYTES and ITEM_BYTES[op.dtype] * math.prod(op.shape) <= MAX_RESHAPE_BYTES:
            nbytes = ITEM_BYTES[op.dtype] * math.prod(op.shape)
            donor = doc.find(op.like)
            doc.entries.append([op.tensor, {"dtype": op.dtype, "shape": list(op.shape)},
                                _resized(donor[2] if donor and donor[2] else b"\1", nbytes)])
            doc.repack = True
    elif isinstance(op, StDrop):
        doc.entries = [e for e in doc.entries if e[0] != op.tensor]
        doc.repack = True
    elif isinstance(op, StDup):
        if entry is not None:
            dup = dict(meta) if meta is not None else {}
            dup["data_offsets"] = op.data_offsets
            doc.entries.append([op.tensor, dup, None])
    elif isinstance(op, StRename):
        if entry is not None:
            entry[0] = op.name
    elif isinstance(op, StMeta):
        doc.entries = [e for e in doc.entries if e[0] != "__metadata__"]
        if op.value is not None:
            doc.entries.insert(0, ["__metadata__", op.value, None])
    elif isinstance(op, StRoot):
        doc.root = op.value
    elif isinstance(op, StHeaderLen):
        doc.header_len = op.value
    elif isinstance(op, StCopyTo):
        src = seeds.parsed(seed, op.other).find(op.tensor)
        if src is not None:
            doc.entries.append([op.tensor, {k: v for k, v in src[1].items() if k != "data_offsets"}, src[2]])
            doc.repack = True
    elif isinstance(op, StIntData):
        if meta is not None and meta.get("dtype") in INT_DTYPES and entry[2] is not None:
            fmt = INT_DTYPES[meta["dtype"]]
            size = struct.calcsize(fmt)
            count = len(entry[2]) // size
            data = bytearray(entry[2])
            for i in range(count) if op.index < 0 else [op.index % max(count, 1)]:
                if (i + 1) * size <= len(data):
                    struct.pack_into(fmt, data, i * size, _fit(fmt, op.value))
            entry[2] = bytes(data)
            doc.repack = True


# ---- GGUF files ----

class GT(enum.IntEnum):
    """GGUF value type ids; repr is the name, so a reproducer reads GgKvSet('llama.block_count', UINT8, 0)."""

    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)

    def __repr__(self) -> str:
        return self.name


def gt(vtype: int):
    """A value type id as GT when it is a known one (unknown ids stay plain ints)."""
    return GT(vtype) if 0 <= vtype < 13 else vtype


GG_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
GG_STRING, GG_ARRAY = GT.STRING, GT.ARRAY


@dataclass
class GGUFDoc:
    magic: bytes
    version: int
    kvs: list  # [key, vtype, value]; an array value is (etype, [items])
    tensors: list  # [name, ne, type_id, offset, bytes | None]: as SafetensorsDoc, None keeps a raw offset
    data: bytes
    n_tensors: int | None = None  # lying counts
    n_kv: int | None = None
    alignment: int = 32
    patches: list = field(default_factory=list)
    repack: bool = False

    @classmethod
    def parse(cls, blob: bytes) -> "GGUFDoc":
        pos = 0

        def take(fmt):
            nonlocal pos
            (v,) = struct.unpack_from(fmt, blob, pos)
            pos += struct.calcsize(fmt)
            return v

        def string():
            nonlocal pos
            n = take("<Q")
            s = blob[pos:pos + n].decode("utf-8")
            pos += n
            return s

        def value(vtype):
            if vtype in GG_SCALARS:
                return take(GG_SCALARS[vtype])
            if vtype == GG_STRING:
                return string()
            etype, count = gt(take("<I")), take("<Q")
            return (etype, [value(etype) for _ in range(count)])

        magic = blob[:4]
        pos = 4
        version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        kvs = []
        for _ in range(n_kv):
            key = string()
            vtype = gt(take("<I"))
            kvs.append([key, vtype, value(vtype)])
        tensors = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("<I")
            ne = [take("<Q") for _ in range(n_dims)]
            tensors.append([name, ne, take("<I"), take("<Q"), None])
        alignment = next((v for k, _, v in kvs if k == "general.alignment"), 32)
        start = -(-pos // alignment) * alignment
        for t in tensors:
            t[4] = blob[start + t[3]:start + t[3] + ggml_nbytes(t[1], t[2])]
        return cls(magic, version, kvs, tensors, blob[start:], alignment=alignment)

    def serialize(self) -> bytes:
        out = bytearray()
        fields: dict[tuple, tuple[int, str]] = {}

        def put(fid, fmt, v):
            if fid is not None:
                fields[fid] = (len(out), fmt)
            out.extend(struct.pack(fmt, _fit(fmt, v)))

        def put_string(fid, s):
            raw = s.data if isinstance(s, Raw) else str(s).encode("utf-8", "surrogatepass")
            put(fid, "<Q", len(raw))
            out.extend(raw)

        def put_value(fid, vtype, v, depth=0):
            sub = (lambda *x: None) if fid is None else (lambda *x: fid + x)
            if vtype in GG_SCALARS:
                fmt = GG_SCALARS[vtype]
                if fmt in ("<f", "<d"):
                    v = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0
                    if fmt == "<f" and v == v and abs(v) > 3.4e38:
                        v = float("inf") if v > 0 else float("-inf")
                    out.extend(struct.pack(fmt, v))
                else:
                    put(None, fmt, v)
            elif vtype == GG_STRING:
                put_string(sub("len"), v if isinstance(v, (str, Raw)) else str(v))
            elif vtype == GG_ARRAY:
                etype, items = v if isinstance(v, tuple) and len(v) == 2 else (GT.UINT32, [])
                put(sub("etype"), "<I", etype)
                put(sub("count"), "<Q", len(items))
                for i, item in enumerate(items):
                    put_value(sub(i) if depth == 0 and i < 4 else None, etype, item, depth + 1)
            elif isinstance(v, (bytes, Raw)):  # an unknown value type: whatever bytes follow
                out.extend(v.data if isinstance(v, Raw) else v)

        out.extend(self.magic)
        put(("version",), "<I", self.version)
        put(("tensor_count",), "<Q", len(self.tensors) if self.n_tensors is None else self.n_tensors)
        put(("kv_count",), "<Q", len(self.kvs) if self.n_kv is None else self.n_kv)
        for i, (key, vtype, value) in enumerate(self.kvs):
            put_string(("kv", key, "key_len"), key)
            put(("kv", key, "type"), "<I", vtype)
            put_value(("kv", key, "value"), vtype, value)
        data = self.data
        if self.repack:
            packed = bytearray()
            for t in self.tensors:
                if t[4] is not None:
                    packed.extend(b"\0" * (-len(packed) % self.alignment))
                    t[3] = len(packed)
                    packed.extend(t[4])
            data = bytes(packed)
        for name, ne, type_id, offset, _ in self.tensors:
            put_string(("tensor", name, "name_len"), name)
            put(("tensor", name, "n_dims"), "<I", len(ne))
            for j, d in enumerate(ne):
                put(("tensor", name, "ne", j), "<Q", d)
            put(("tensor", name, "type"), "<I", type_id)
            put(("tensor", name, "offset"), "<Q", offset)
        out.extend(b"\0" * (-len(out) % self.alignment))
        out.extend(data)
        for fid, value in self.patches:
            if fid in fields:
                pos, fmt = fields[fid]
                struct.pack_into(fmt, out, pos, _fit(fmt, value))
        return bytes(out)


def ggml_nbytes(ne: list, type_id: int) -> int:
    """Bytes of a tensor of `ne` elements of ggml type `type_id` (block size and bytes per block from gguf-py)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return 0
    rows = math.prod(ne[1:]) if len(ne) > 1 else 1
    return (ne[0] // block if ne else 0) * size * rows


def _gguf_fields(doc: GGUFDoc) -> list[tuple]:
    out = [("version",), ("tensor_count",), ("kv_count",)]
    for key, vtype, value in doc.kvs:
        out += [("kv", key, "key_len"), ("kv", key, "type")]
        if vtype == GG_STRING:
            out.append(("kv", key, "value", "len"))
        if vtype == GG_ARRAY:
            out += [("kv", key, "value", "etype"), ("kv", key, "value", "count")]
            if value[0] == GG_STRING and value[1]:
                out.append(("kv", key, "value", 0, "len"))
    for name, ne, _, _, _ in doc.tensors:
        out += [("tensor", name, "name_len"), ("tensor", name, "n_dims"), ("tensor", name, "type"),
                ("tensor", name, "offset")] + [("tensor", name, "ne", j) for j in range(len(ne))]
    return out


def _fit(fmt: str, v) -> int:
    """An integer wrapped into the range of a struct integer format (two's complement for signed ones)."""
    if fmt in ("<f", "<d"):
        return v
    bits = 8 * struct.calcsize(fmt)
    v = v % 2**bits if isinstance(v, int) else 0
    if fmt[1].islower() and v >= 2 ** (bits - 1):
        v -= 2**bits
    return v


def _apply_gguf(doc: GGUFDoc, op) -> None:
    if isinstance(op, GgHeader):
        setattr(doc, {"tensor_count": "n_tensors", "kv_count": "n_kv"}.get(op.field, op.field), op.value)
    elif isinstance(op, GgKvSet):
        for kv in doc.kvs:
            if kv[0] == op.key:
                kv[1], kv[2] = op.vtype, op.value
                break
        else:
            doc.kvs.append([op.key, op.vtype, op.value])
    elif isinstance(op, GgKvDel):
        doc.kvs = [kv for kv in doc.kvs if kv[0] != op.key]
    elif isinstance(op, GgKvDup):
        doc.kvs += [list(kv) for kv in doc.kvs if kv[0] == op.key][:1]
    elif isinstance(op, GgKvArray):
        for kv in doc.kvs:
            if kv[0] == op.key and kv[1] == GG_ARRAY:
                etype, items = kv[2]
                items = list(items)
                if op.action == "truncate":
                    items = items[:op.index % (len(items) + 1)]
                elif op.action == "set" and items:
                    items[op.index % len(items)] = op.value
                elif op.action == "append":
                    items.append(op.value)
                elif op.action == "etype":
                    etype = op.value
                kv[2] = (etype, items)
    elif isinstance(op, GgTensor):
        entry = next((t for t in doc.tensors if t[0] == op.tensor), None)
        if entry is None:
            return
        if op.field == "ne":
            entry[1] = list(op.value)
        elif op.field == "type":
            entry[2] = op.value
        elif op.field == "offset":
            if isinstance(op.value, tuple):  # ("like", other tensor, delta): overlap another tensor
                other = next((t for t in doc.tensors if t[0] == op.value[1]), entry)
                entry[3] = other[3] + op.value[2]
            else:
                entry[3] = op.value
            entry[4] = None
        elif op.field == "name":
            entry[0] = op.value
        elif op.field == "drop":
            doc.tensors.remove(entry)
            doc.repack = True
        elif op.field == "dup":
            doc.tensors.append(list(entry))
        elif op.field == "reshape":  # (ne, type id): consistent, the data resized and every offset laid out again
            ne, type_id = op.value
            nbytes = ggml_nbytes(ne, type_id)
            if entry[4] is not None and nbytes <= MAX_RESHAPE_BYTES:
                entry[1], entry[2], entry[4] = list(ne), type_id, _resized(entry[4], nbytes)
                doc.repack = True
    elif isinstance(op, GgPatch):
        doc.patches.append((op.field, op.value))


# ---- applying a list of operations to a copy of a seed ----

def _apply_bytes(blob: bytes, op: Bytes) -> bytes:
    n = len(blob)
    pos = op.pos % (n + 1)
    if op.action == "truncate":
        return blob[:pos]
    if op.action == "flip" and n:
        b = bytearray(blob)
        for i, x in enumerate(op.data or b"\xff"):
            b[(pos + i) % n] ^= x or 0xFF
        return bytes(b)
    if op.action == "insert":
        return blob[:pos] + op.data + blob[pos:]
    if op.action == "append":
        return blob + op.data
    return blob


def materialize(seeds: "Seeds", seed: str, ops: list, dest: Path) -> Path:
    """A copy of seed `seed` in `dest` with `ops` applied; returns `dest`."""
    shutil.copytree(seeds.path(seed), dest, symlinks=True)
    by_file: dict[str, list] = {}
    for op in ops:
        name = getattr(op, "file", None) or "model.gguf"
        by_file.setdefault(name, []).append(op)
    for name, fops in by_file.items():
        target = dest / name
        structural = [op for op in fops if not isinstance(op, (Bytes, FileOp))]
        if structural:
            doc = copy.deepcopy(seeds.parsed(seed, name))
            for op in structural:
                if isinstance(doc, SafetensorsDoc):
                    _apply_safetensors(doc, op, seeds, seed)
                elif isinstance(doc, GGUFDoc):
                    _apply_gguf(doc, op)
                else:
                    doc = _apply_json(doc, op)
            blob = _serialize(doc)
        elif target.is_file():
            blob = target.read_bytes()
        else:
            blob = b""
        for op in fops:
            if isinstance(op, Bytes):
                blob = _apply_bytes(blob, op)
        target.write_bytes(blob)
        for op in fops:
            if isinstance(op, FileOp):
                if target.is_dir():
                    shutil.rmtree(target)
                target.unlink(missing_ok=True)
                if op.action == "empty":
                    target.write_bytes(b"")
                elif op.action == "directory":
                    target.mkdir()
    return dest


class _JsonDoc(NamedTuple):
    value: Any


def _apply_json(doc, op):
    if isinstance(op, JsonRoot):
        return _JsonDoc(op.value)
    root = doc.value if isinstance(doc, _JsonDoc) else doc
    parent = root
    for key in op.path[:-1]:
        if isinstance(parent, dict) and key in parent:
            parent = parent[key]
        elif isinstance(parent, list) and isinstance(key, int) and key < len(parent):
            parent = parent[key]
        else:
            return doc
    last = op.path[-1]
    if isinstance(op, JsonSet):
        if isinstance(parent, dict):
            parent[last] = op.value
        elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
            parent[last] = op.value
    elif isinstance(op, JsonDel):
        if isinstance(parent, dict):
            parent.pop(last, None)
        elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
            del parent[last]
    return doc


def _serialize(doc) -> bytes:
    if isinstance(doc, (SafetensorsDoc, GGUFDoc)):
        return doc.serialize()
    value = doc.value if isinstance(doc, _JsonDoc) else doc
    return (dumps(value) + "\n").encode("utf-8", "surrogatepass")


# ---- seeds: valid tiny files quantkit wrote ----

TINY = dict(hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, vocab=256, tokenizer=False)


@dataclass
class Seeds:
    root: Path
    dirs: dict[str, Path] = field(default_factory=dict)
    _parsed: dict = field(default_factory=dict)

    def path(self, seed: str) -> Path:
        return self.dirs[seed]

    def parsed(self, seed: str, name: str):
        key = (seed, name)
        if key not in self._parsed:
            blob = (self.dirs[seed] / name).read_bytes()
            if name.endswith(".safetensors"):
                self._parsed[key] = SafetensorsDoc.parse(blob)
            elif name.endswith(".gguf"):
                self._parsed[key] = GGUFDoc.parse(blob)
            else:
                self._parsed[key] = json.loads(blob)
        return self._parsed[key]

    def files(self, seed: str, suffix: str) -> list[str]:
        return sorted(p.name for p in self.dirs[seed].iterdir() if p.name.endswith(suffix))


# a sentencepiece (llama) vocabulary as llama.cpp's converter stores it, small enough to fuzz quickly: the special
# pieces, the 256 byte-fallback pieces sentencepiece insists on, a few normal ones
TINY_VOCAB = (["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
              + ["\u2581", "\u2581t", "he", "\u2581the", "ll", "o", "\u2581hello"])


def tiny_tokenizer_kvs() -> list:
    n_normal = len(TINY_VOCAB) - 259
    return [
        ["tokenizer.ggml.model", GT.STRING, "llama"],
        ["tokenizer.ggml.pre", GT.STRING, "default"],
        ["tokenizer.ggml.tokens", GT.ARRAY, (GT.STRING, list(TINY_VOCAB))],
        ["tokenizer.ggml.scores", GT.ARRAY, (GT.FLOAT32, [-1000.0] * 3 + [0.0] * 256 + [-float(i) for i in
                                                                                       range(n_normal)])],
        ["tokenizer.ggml.token_type", GT.ARRAY, (GT.INT32, [3, 3, 3] + [6] * 256 + [1] * n_normal)],
        ["tokenizer.ggml.bos_token_id", GT.UINT32, 1],
        ["tokenizer.ggml.eos_token_id", GT.UINT32, 2],
        ["tokenizer.ggml.unknown_token_id", GT.UINT32, 0],
        ["tokenizer.ggml.add_bos_token", GT.BOOL, 1],
        ["tokenizer.ggml.add_eos_token", GT.BOOL, 0],
        ["tokenizer.chat_template", GT.STRING, "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"],
    ]


def build_seeds(root: Path, tokenizer_gguf: bool = True) -> Seeds:
    """Every seed checkpoint, written once (about a second): the fuzzed files are copies of these."""
    import quantkit
    from quantkit.gguf.convert import write_gguf
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.testing import make_random_checkpoint

    root = Path(root)
    seeds = Seeds(root)
    for layout in ("hf-single", "hf-sharded", "consolidated"):
        seeds.dirs[layout] = make_random_checkpoint(root / layout, layout=layout, shards=3, **TINY)
    (root / "gguf").mkdir()
    write_gguf(open_checkpoint(seeds.dirs["hf-single"]), root / "gguf" / "model.gguf", "Q8_0", progress=False)
    seeds.dirs["gguf"] = root / "gguf"
    if tokenizer_gguf:
        src = make_random_checkpoint(root / "tok-src", layout="hf-single", **{**TINY, "vocab": len(TINY_VOCAB)})
        (root / "gguf-tokenizer").mkdir()
        path = write_gguf(open_checkpoint(src), root / "gguf-tokenizer" / "model.gguf", "Q8_0", progress=False)
        doc = GGUFDoc.parse(path.read_bytes())
        doc.kvs += tiny_tokenizer_kvs()
        path.write_bytes(doc.serialize())
        seeds.dirs["gguf-tokenizer"] = root / "gguf-tokenizer"
    result = quantkit.quantize(seeds.dirs["hf-single"], root / "quantized", preset="w4a16-g32-asym",
                               formats=["gptq", "awq", "compressed-tensors"])
    for fmt, path in result.paths.items():
        seeds.dirs[fmt] = path
    return seeds


# ---- strategies per file kind ----

def json_paths(value, prefix=(), depth=0) -> list[tuple]:
    out = []
    if depth >= 4:
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out.append(prefix + (k,))
            out += json_paths(v, prefix + (k,), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out.append(prefix + (i,))
            out += json_paths(v, prefix + (i,), depth + 1)
    return out


def _get(value, path):
    for k in path:
        value = value[k]
    return value


# keys a valid file may lack but a reader looks at
EXTRA_JSON_KEYS = {
    "config.json": ["head_dim", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "dtype",
                    "torch_dtype", "num_key_value_heads", "sliding_window", "eos_token_id", "bos_token_id",
                    "rope_theta", "quantization_config", "tie_word_embeddings", "max_position_embeddings"],
    "params.json": ["n_kv_heads", "head_dim", "moe", "rope_theta", "sliding_window", "max_seq_len", "norm_eps"],
    "quantize_config.json": ["bits", "group_size", "checkpoint_format", "format", "dynamic", "sym", "desc_act"],
    "model.safetensors.index.json": ["weight_map", "metadata"],
}
EXTRA_QC_KEYS = ["bits", "group_size", "checkpoint_format", "format", "dynamic", "sym", "desc_act", "w_bit",
                 "q_group_size", "zero_point", "version", "quant_method", "quantization_status", "config_groups",
                 "ignore", "modules_to_not_convert"]


SHARD_NAME_VALUES = ["config.json", ".", "", "model.safetensors", "model-00004-of-00003.safetensors"]


def json_ops(seeds: Seeds, seed: str, name: str, deep: bool = False) -> st.SearchStrategy:
    """Edits of one JSON file. deep: only edits inside the part a format reads past the generic checks
    (quantization_config, the index's weight_map), mostly near-valid values, the file kept valid JSON."""
    doc = seeds.parsed(seed, name)
    paths = json_paths(doc)
    if deep and name == "config.json":
        paths = [p for p in paths if p[0] == "quantization_config" and len(p) > 1] or paths
    if deep and name == "model.safetensors.index.json":
        paths = [p for p in paths if p[0] == "weight_map" and len(p) > 1]
    extra = [(k,) for k in EXTRA_JSON_KEYS.get(name, []) if k not in doc and not deep]
    if name == "config.json" and isinstance(doc.get("quantization_config"), dict):
        extra += [("quantization_config", k) for k in EXTRA_QC_KEYS if k not in doc["quantization_config"]]
        if isinstance(doc["quantization_config"].get("config_groups"), dict):
            extra += [("quantization_config", "config_groups", g, k) for g in doc["quantization_config"]
                      ["config_groups"] for k in ("format", "targets", "weights")]
    if name == "model.safetensors.index.json":
        extra += [("weight_map", "model.layers.99.mlp.up_proj.weight")]
    existing = st.sampled_from(paths)
    values = (lambda p: weighted((3, near(_get(doc, p))), (1, json_values))) if deep else (
        lambda p: st.one_of(near(_get(doc, p)), json_values))
    if name == "model.safetensors.index.json":
        shard_names = sorted(set(doc["weight_map"].values())) + SHARD_NAME_VALUES
        values = (lambda p, v=values: st.one_of(st.sampled_from(shard_names), v(p)) if p[0] == "weight_map"
                  else v(p))
    set_existing = existing.flatmap(lambda p: st.builds(JsonSet, st.just(name), st.just(p), values(p)))
    set_extra = st.builds(JsonSet, st.just(name), st.sampled_from(extra or paths), json_values)
    if deep:
        return weighted((6, set_existing), (2, set_extra), (1, st.builds(JsonDel, st.just(name), existing)))
    return weighted(
        (6, set_existing),
        (2, set_extra),
        (2, st.builds(JsonDel, st.just(name), existing)),
        (1, st.one_of(st.builds(JsonRoot, st.just(name), json_values),
                      st.builds(Bytes, st.just(name), st.sampled_from(["truncate", "flip", "insert"]),
                                st.integers(0, 4096), st.binary(min_size=1, max_size=4)))),
    )


def weighted(*options: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """one_of with integer weights (a strategy listed w times is drawn about w times as often)."""
    return st.one_of([strategy for w, strategy in options for _ in range(w)])


def _offset_specials(start: int, end: int, data_len: int) -> list:
    return [[end, start], [start, end + 1], [start, end - 1], [start, start], [0, end - start], [start, end, end],
            [start], [], [start, 2**63], [start, 2**64], [-1, end], [start, -1], [float(start), float(end)],
            [str(start), str(end)], [start, data_len * 2], [None, end], [start + 1, end + 1], [2**64 + start, end]]


def _shape_specials(shape: list) -> list:
    return [[], [0], [-1], [0] + shape[1:], [-s for s in shape], [2**63], [2**32, 2**32], [10**9, 10**9],
            list(reversed(shape)), shape + [1], shape[:-1], [s * 2 for s in shape], [1.5], [str(s) for s in shape],
            [shape], [True] + shape[1:], [s + 1 for s in shape], [2**64 - 1] * len(shape)]


def _reshape_specials(shape: list) -> list:
    """Shapes a consistent reshape tries: off by one, doubled, halved, transposed, flattened, empty, one more dim."""
    out = [shape[::-1], [0] + shape[1:], shape[:-1] + [0], [shape[0] + 1] + shape[1:], shape[:-1] + [shape[-1] + 1],
           [shape[0] * 2] + shape[1:], shape[:-1] + [max(shape[-1] // 2, 1)], shape + [1], [1] + shape, shape[:1],
           [math.prod(shape)], [], [1], [shape[0] * 8] + shape[1:], shape[:-1] + [shape[-1] * 32]]
    if shape[0] > 1:
        out.append([shape[0] - 1] + shape[1:])
    if shape[-1] > 1:
        out.append(shape[:-1] + [shape[-1] - 1])
    return out


DTYPE_NAMES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "U64", "BOOL", "F8_E4M3", "F8_E5M2",
               "F4", "", "f32", "float32", "Q4_0"]


def safetensors_ops(seeds: Seeds, seed: str, name: str, others: list[str] = (), deep: bool = False
                    ) -> st.SearchStrategy:
    """Edits of one safetensors file. deep: only consistent ones (reshape, add, drop, rename, integer data, a tensor
    copied from another shard), which pass the container checks and reach the format's own."""
    doc = seeds.parsed(seed, name)
    tensors = doc.tensors()
    names = [k for k, _ in tensors]
    meta = dict(tensors)
    ints = [k for k, m in tensors if m["dtype"] in INT_DTYPES]

    def set_field(t):
        m = meta[t]
        start, end = m["data_offsets"]
        return st.one_of(
            st.builds(StSet, st.just(name), st.just(t), st.just("data_offsets"),
                      st.one_of(st.sampled_from(_offset_specials(start, end, len(doc.data))), json_values)),
            st.builds(StSet, st.just(name), st.just(t), st.just("shape"),
                      st.one_of(st.sampled_from(_shape_specials(list(m["shape"]))), json_values)),
            st.builds(StSet, st.just(name), st.just(t), st.just("dtype"),
                      st.one_of(st.sampled_from(DTYPE_NAMES), json_values)),
        )

    tensor = st.sampled_from(names)
    header_size = len(doc.serialize()) - len(doc.data)
    options = [
        (8, tensor.flatmap(set_field)),
        (1, st.builds(StDelField, st.just(name), tensor, st.sampled_from(["dtype", "shape", "data_offsets"]))),
        (1, st.builds(StEntry, st.just(name), tensor, json_values)),
        (1, st.builds(StDrop, st.just(name), tensor)),
        (2, tensor.flatmap(lambda t: st.builds(StDup, st.just(name), st.just(t), st.sampled_from(
            _offset_specials(*meta[t]["data_offsets"], len(doc.data))[:6] + [meta[names[0]]["data_offsets"]])))),
        (1, st.builds(StRename, st.just(name), tensor, st.one_of(st.sampled_from(names + ["", "__metadata__"]),
                                                                 st.text(max_size=8)))),
        (1, st.builds(StMeta, st.just(name), st.one_of(st.none(), json_values))),
        (1, st.builds(StRoot, st.just(name), json_values)),
        (1, st.builds(StHeaderLen, st.just(name), st.one_of(
            st.sampled_from(INTERESTING_INTS), st.integers(-16, 16).map(lambda d: header_size - 8 + d)))),
        (2, st.builds(Bytes, st.just(name), st.sampled_from(["truncate", "flip", "insert", "append"]),
                      st.one_of(st.integers(0, 16), st.integers(0, header_size), st.integers(0, 2**24)),
                      st.binary(min_size=1, max_size=8))),
    ]
    def reshape(t):
        m = meta[t]
        return st.builds(StReshape, st.just(name), st.just(t), st.sampled_from(_reshape_specials(list(m["shape"]))),
                         st.one_of(st.just(m["dtype"]), st.sampled_from(list(ITEM_BYTES))))

    def add(t):
        m = meta[t]
        stem = t.rsplit(".", 1)[0]
        names_ = [stem + s for s in (".bias", ".g_idx", ".weight_g_idx", ".weight_zero_point", ".qzeros", ".scales",
                                     ".weight", ".weight_packed", ".qweight", ".rotary_emb.inv_freq")]
        names_ += [t.replace("layers.0.", "layers.1."), "lm_head.weight", "model.norm.bias"]
        shape = list(m["shape"])
        return st.builds(StAdd, st.just(name), st.sampled_from(names_),
                         st.sampled_from([shape, shape[:1], shape[-1:], shape[::-1], [1]]),
                         st.sampled_from([m["dtype"], "I32", "F16", "F32", "I64"]), st.just(t))

    consistent = [(4, tensor.flatmap(reshape)), (2, tensor.flatmap(add)), (1, st.builds(StDrop, st.just(name), tensor)),
                  (1, st.builds(StRename, st.just(name), tensor, st.sampled_from(names)))]
    if deep:
        options = consistent
    else:
        options += consistent
    if ints:
        options.append((3, st.builds(StIntData, st.just(name), st.sampled_from(ints), st.integers(-1, 4096),
                                     st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-300, 300)))))
    if others:
        options.append((2, st.builds(StCopyTo, st.just(name), st.sampled_from(
            [k for o in others for k, _ in seeds.parsed(seed, o).tensors()]), st.sampled_from(list(others)))))
    return weighted(*options)


def file_ops(names: list[str]) -> st.SearchStrategy:
    return st.builds(FileOp, st.sampled_from(names), st.sampled_from(["remove", "empty", "directory"]))


GG_INT_TYPES = [GT.UINT8, GT.INT8, GT.UINT16, GT.INT16, GT.UINT32, GT.INT32, GT.UINT64, GT.INT64]
gg_scalar_values = st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-2**64, 2**64))
gg_strings = st.one_of(st.sampled_from(INTERESTING_STRINGS[:-1]), st.text(max_size=10),
                       st.builds(Raw, st.binary(min_size=1, max_size=6)))


def gg_typed(vtype: int, depth: int = 0) -> st.SearchStrategy:
    if vtype in (6, 12):
        return st.one_of(st.sampled_from(INTERESTING_FLOATS), st.floats())
    if vtype == 7:
        return st.integers(0, 255)
    if vtype in GG_SCALARS:
        return gg_scalar_values
    if vtype == GG_STRING:
        return gg_strings
    if vtype == GG_ARRAY:
        if depth >= 5:
            return st.just((GT.UINT32, []))
        return st.sampled_from([gt(t) for t in (0, 4, 5, 6, 7, 8, 9, 10, 12, 13)]).flatmap(
            lambda e: st.tuples(st.just(e), st.lists(gg_typed(e, depth + 1), max_size=4)))
    return st.builds(Raw, st.binary(max_size=8))


gg_any_value = st.sampled_from([gt(t) for t in range(14)] + [255, 2**31, 2**32 - 1]).flatmap(
    lambda t: st.tuples(st.just(t), gg_typed(t)))
deep_array = st.integers(3, 8).map(lambda d: (GT.ARRAY, _nested_array(d)))


def _nested_array(depth: int):
    v = (GT.UINT32, [1])
    for _ in range(depth):
        v = (GT.ARRAY, [v])
    return v


GGUF_EXTRA_KEYS = ["general.alignment", "quantkit.architecture", "llama.vocab_size", "llama.attention.key_length",
                   "llama.rope.dimension_count", "llama.attention.head_count_kv", "tokenizer.ggml.tokens",
                   "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.model",
                   "tokenizer.ggml.unknown_token_id", "tokenizer.chat_template"]


GGML_TYPE_IDS = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 28,
                 29, 30, 34, 35, 39]  # F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K..Q8_K IQ* I8.. BF16 TQ* MXFP4


def gguf_ops(seeds: Seeds, seed: str, focus: str | None = None, deep: bool = False) -> st.SearchStrategy:
    """Edits of a GGUF. focus: only KVs under that prefix. deep: only consistent edits (tensors reshaped or retyped
    with their data resized and every offset laid out again, KVs of the model given near-valid values)."""
    doc = seeds.parsed(seed, "model.gguf")
    keys = [k for k, _, _ in doc.kvs if focus is None or k.startswith(focus)]
    kinds = {k: (t, v) for k, t, v in doc.kvs}
    arrays = [k for k in keys if kinds[k][0] == GG_ARRAY]
    names = [t[0] for t in doc.tensors]
    by_name = {t[0]: t for t in doc.tensors}
    key = st.sampled_from(keys)

    # array lengths (the vocabulary size, ...) and around them: an id just past the end of a list
    lengths = sorted({n + d for _, t, v in doc.kvs if t == GG_ARRAY for n in [len(v[1])] for d in (-1, 0, 1)})

    def near_kv(k):
        t, v = kinds[k]
        if t in GG_SCALARS and t not in (6, 7, 12):
            return st.builds(GgKvSet, st.just(k), st.just(t), st.sampled_from(sorted(
                {0, v - 1, v + 1, 2 * v, -v, v * 10**6, 255, 256, 4096, 65535, 2**31, 2**32 - 1, 2**63, *lengths})))
        return st.sampled_from([t] + GG_INT_TYPES[:4]).flatmap(
            lambda nt: st.builds(GgKvSet, st.just(k), st.just(nt), gg_typed(nt)))

    def tensor_op(name):
        ne = by_name[name][1]
        return st.one_of(
            st.builds(GgTensor, st.just(name), st.just("ne"), st.one_of(
                st.sampled_from([[], [0], ne[::-1], [ne[0] * 2] + ne[1:], ne[:1], ne + [1], ne + [1, 1, 1, 1],
                                 [ne[0] + 1] + ne[1:], [ne[0]] + [d + 1 for d in ne[1:]], [2**32, 2**32],
                                 [ne[0], 2**63], [2**64 - 1] * len(ne), [ne[0] * 2**40] + ne[1:]]),
                st.lists(st.sampled_from(INTERESTING_INTS + [32, 64, 128, 256]).map(lambda d: d % 2**64),
                         max_size=5))),
            st.builds(GgTensor, st.just(name), st.just("type"), st.one_of(st.integers(0, 45),
                                                                          st.sampled_from([2**31, 2**32 - 1]))),
            st.builds(GgTensor, st.just(name), st.just("offset"), st.one_of(
                st.sampled_from([0, 1, 31, by_name[name][3] + 1, by_name[name][3] + 32, by_name[name][3] - 32,
                                 len(doc.data), len(doc.data) - 32, 2**63, 2**64 - 32, 2**64 - 1]),
                st.tuples(st.just("like"), st.sampled_from(names), st.sampled_from([0, 32, -32])))),
            st.builds(GgTensor, st.just(name), st.just("name"), st.one_of(
                st.sampled_from(names + ["", "rope_freqs.weight", "blk.1.attn_q.weight", "blk.99.ffn_up.weight"]),
                st.builds(Raw, st.binary(max_size=4)))),
            st.builds(GgTensor, st.just(name), st.sampled_from(["drop", "dup"]), st.none()),
        )

    def reshape(name):
        ne, type_id = by_name[name][1], by_name[name][2]
        return st.builds(GgTensor, st.just(name), st.just("reshape"), st.tuples(
            st.sampled_from(_reshape_specials(list(ne)) + [[ne[0] * 8] + ne[1:]]),
            st.one_of(st.just(type_id), st.sampled_from(GGML_TYPE_IDS))))

    if deep:
        model_keys = [k for k in keys if k.startswith(("llama.", "general.architecture", "general.alignment"))]
        return weighted(
            (4, st.sampled_from(model_keys).flatmap(near_kv)),
            (5, st.sampled_from(names).flatmap(reshape)),
            (1, st.builds(GgKvDel, st.sampled_from(model_keys))),
            (1, st.builds(GgTensor, st.sampled_from(names), st.just("drop"), st.none())),
            (1, st.builds(GgTensor, st.sampled_from(names), st.just("name"), st.sampled_from(
                names + ["rope_freqs.weight", "blk.1.attn_q.weight", "output.weight"]))),
        )
    fields = _gguf_fields(doc)
    if focus is not None:
        fields = [f for f in fields if f[0] != "kv" or f[1].startswith(focus)]
    options = [
        (4, key.flatmap(near_kv)),
        (3, st.tuples(st.one_of(key, st.sampled_from(GGUF_EXTRA_KEYS)), st.one_of(gg_any_value, deep_array)).map(
            lambda kv: GgKvSet(kv[0], kv[1][0], kv[1][1]))),
        (1, st.builds(GgKvDel, key)),
        (1, st.builds(GgKvDup, key)),
        (2, st.builds(GgPatch, st.sampled_from(fields), st.one_of(st.sampled_from(INTERESTING_INTS),
                                                                 st.integers(0, 2**16)))),
    ]
    if arrays:
        options.append((2 if focus else 1, st.sampled_from(arrays).flatmap(lambda k: st.builds(
            GgKvArray, st.just(k), st.sampled_from(["truncate", "set", "append", "etype"]),
            st.one_of(st.integers(0, 8), st.integers(0, 40000)),
            st.one_of(gg_typed(kinds[k][1][0]), st.sampled_from([gt(t) for t in (0, 4, 5, 6, 8, 13)]))))))
    if focus is None:
        options += [
            (1, st.builds(GgHeader, st.sampled_from(["tensor_count", "kv_count"]),
                          st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(0, 64)))),
            (1, st.one_of(st.builds(GgHeader, st.just("version"), st.sampled_from([0, 1, 2, 3, 4, 2**32 - 1])),
                          st.builds(GgHeader, st.just("magic"), st.sampled_from([b"GGUF", b"GGUG", b"GGML"])))),
            (5, st.sampled_from(names).flatmap(tensor_op)),
            (2, st.sampled_from(names).flatmap(reshape)),
            (1, st.builds(Bytes, st.just("model.gguf"), st.sampled_from(["truncate", "flip", "insert", "append"]),
                          st.one_of(st.integers(0, 64), st.integers(0, 4096), st.integers(0, 2**22)),
                          st.binary(min_size=1, max_size=8))),
        ]
    return weighted(*options)


# ---- readers: what is fuzzed, and how it is read ----

def read_full_precision(path: Path) -> None:
    import quantkit
    from quantkit.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    for name in ckpt.tensor_names():
        ckpt.get_tensor(name)
    ckpt.num_parameters, ckpt.total_bytes, ckpt.fingerprint()
    quantkit.inspect(path).render()
    load(path)


def load(path: Path) -> None:
    """quantkit.load; the seeds carry no tokenizer, so 'no tokenizer found' after the weights loaded is success."""
    import quantkit
    from quantkit.errors import TokenizerError

    try:
        quantkit.load(path)
    except TokenizerError as e:
        if "no tokenizer found" not in str(e):
            raise


def read_quantized(path: Path) -> None:
    import quantkit
    from quantkit.formats.base import read_checkpoint

    q = read_checkpoint(path)
    for name in q.names:
        q.get(name)
    quantkit.inspect(path).render()
    load(path)


def read_gguf(path: Path) -> None:
    from quantkit.gguf.reader import parse_gguf

    parse_gguf(path / "model.gguf")
    read_quantized(path / "model.gguf")


def read_header(path: Path) -> None:
    from quantkit.model.checkpoint import read_safetensors_header

    read_safetensors_header(path / "model.safetensors")


def read_config_dict(path: Path) -> None:
    """ModelConfig.from_hf_dict / from_params_dict on the (mutated) parsed JSON, and what validation asks of it."""
    from quantkit.model.config import ModelConfig

    for name, reader in (("config.json", ModelConfig.from_hf_dict), ("params.json", ModelConfig.from_params_dict)):
        if not (path / name).exists():
            continue
        ModelConfig.from_file(path / name)
        data = json.loads((path / name).read_text())  # from_file accepted it: a JSON object
        cfg = reader(data, name)
        cfg.expected_shapes(), cfg.num_parameters(), cfg.summary(), cfg.arch, cfg.dtype


@dataclass
class Reader:
    name: str
    seed: str
    ops: Callable[[Seeds], st.SearchStrategy]
    read: Callable[[Path], None]
    max_ops: int = 3
    share: float = 1.0  # fraction of the profile's max_examples (slow readers get fewer)


def _dir_ops(seed: str, jsons: list[str], safetensors: list[str], sharded: bool = False, deep: bool = False):
    def ops(seeds: Seeds) -> st.SearchStrategy:
        options = [(3, json_ops(seeds, seed, j, deep)) for j in jsons]
        options += [(3, safetensors_ops(seeds, seed, s, [o for o in safetensors if o != s] if sharded else (), deep))
                    for s in safetensors]
        if not deep:
            options.append((1, file_ops(jsons + safetensors)))
        return weighted(*options)
    return ops


SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]

READERS = [
    Reader("safetensors-header", "hf-single", lambda s: safetensors_ops(s, "hf-single", "model.safetensors"),
           read_header),
    Reader("hf-single", "hf-single", _dir_ops("hf-single", ["config.json"], ["model.safetensors"]),
           read_full_precision),
    Reader("hf-sharded", "hf-sharded",
           _dir_ops("hf-sharded", ["config.json", "model.safetensors.index.json"], SHARDS, sharded=True),
           read_full_precision),
    Reader("consolidated", "consolidated",
           _dir_ops("consolidated", ["params.json"], ["consolidated.safetensors"]), read_full_precision),
    Reader("config", "hf-single", lambda s: json_ops(s, "hf-single", "config.json"), read_config_dict),
    Reader("params", "consolidated", lambda s: json_ops(s, "consolidated", "params.json"), read_config_dict),
    Reader("gguf", "gguf", lambda s: gguf_ops(s, "gguf"), read_gguf),
    Reader("gguf-tokenizer", "gguf-tokenizer", lambda s: gguf_ops(s, "gguf-tokenizer", focus="tokenizer."),
           read_gguf, max_ops=2, share=0.5),
    Reader("gptq", "gptq", _dir_ops("gptq", ["config.json", "quantize_config.json"], ["model.safetensors"]),
           read_quantized),
    Reader("awq", "awq", _dir_ops("awq", ["config.json"], ["model.safetensors"]), read_quantized),
    Reader("compressed-tensors", "compressed-tensors",
           _dir_ops("compressed-tensors", ["config.json"], ["model.safetensors"]), read_quantized),
    # deep: consistent edits only, so the container checks pass and the format's own checks are what is fuzzed
    Reader("hf-sharded-deep", "hf-sharded",
           _dir_ops("hf-sharded", ["model.safetensors.index.json"], SHARDS, sharded=True, deep=True),
           read_full_precision),
    Reader("gguf-deep", "gguf", lambda s: gguf_ops(s, "gguf", deep=True), read_gguf),
    Reader("gptq-deep", "gptq", _dir_ops("gptq", ["config.json", "quantize_config.json"], ["model.safetensors"],
                                         deep=True), read_quantized),
    Reader("awq-deep", "awq", _dir_ops("awq", ["config.json"], ["model.safetensors"], deep=True), read_quantized),
    Reader("compressed-tensors-deep", "compressed-tensors",
           _dir_ops("compressed-tensors", ["config.json"], ["model.safetensors"], deep=True), read_quantized),
]
READERS_BY_NAME = {r.name: r for r in READERS}


def mutations(reader: Reader, seeds: Seeds) -> st.SearchStrategy:
    return st.lists(reader.ops(seeds), min_size=1, max_size=reader.max_ops)


# ---- running one example under guards ----

class ExampleTimeout(Exception):
    """An example ran past the hard per-example time limit (a hang or a quadratic blow-up: a finding)."""


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def guarded(seconds: float, memory_headroom: int | None):
    """Raise ExampleTimeout after `seconds` (SIGALRM; the previous timer, e.g. pytest-timeout's, is restored) and
    cap the address space at its current size + `memory_headroom` while the block runs."""
    state = {"fired": False}

    def on_alarm(signum, frame):
        state["fired"] = True
        raise ExampleTimeout(f"example ran past {seconds:g} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_timer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    if memory_headroom:
        soft = _vm_size() + memory_headroom
        if old_limit[1] != resource.RLIM_INFINITY:
            soft = min(soft, old_limit[1])
        resource.setrlimit(resource.RLIMIT_AS, (soft, old_limit[1]))
    t0 = time.monotonic()
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer:
            signal.setitimer(signal.ITIMER_REAL, max(old_timer - (time.monotonic() - t0), 0.001))


def read_guarded(reader: Reader, path: Path, seconds: float = HARD_TIMEOUT_S,
                 memory_headroom: int | None = MEMORY_HEADROOM) -> QuantkitError | None:
    """Read `path` with `reader` under the guards. Returns None when the reader succeeds and the QuantkitError when
    it raises one; anything else propagates (ExampleTimeout when the timer fired, even if a reader turned the
    timer's exception into a QuantkitError)."""
    state = {"fired": False}
    error = None
    try:
        with guarded(seconds, memory_headroom) as state:
            reader.read(path)
    except QuantkitError as e:
        error = e
    if state["fired"]:
        raise ExampleTimeout(f"example ran past {seconds:g} s" + (" (then reported as a QuantkitError)"
                                                                  if error is not None else ""))
    return error


def run_example(reader: Reader, seeds: Seeds, ops: list, seconds: float = HARD_TIMEOUT_S,
                memory_headroom: int | None = MEMORY_HEADROOM) -> None:
    """Write the mutated copy of the reader's seed and read it under the guards (see read_guarded)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        path = materialize(seeds, reader.seed, ops, Path(tmp) / "x")
        read_guarded(reader, path, seconds, memory_headroom)


def escape_site(exc: BaseException) -> tuple[str, str]:
    """(the deepest quantkit frame 'quantkit/x.py:123 in fn', the innermost frame) of an exception's traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    pkg = str(Path(__file__).resolve().parents[1] / "quantkit")
    ours = [f for f in frames if f.filename.startswith(pkg)]
    fmt = lambda f: f"{os.path.relpath(f.filename, Path(pkg).parent)}:{f.lineno} in {f.name}"  # noqa: E731
    inner = frames[-1] if frames else None
    return (fmt(ours[-1]) if ours else "(no quantkit frame)"), (fmt(inner) if inner else "?")


# ---- the short run ----

@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """The seeds, read once through every reader (they must be valid, and the first load's warm-up must not count
    against the per-example deadline). HOME points into the temp dir: GGUF tokenizers are cached under it."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(root / "home")
    try:
        built = build_seeds(root)
        for reader in READERS:
            if reader.seed in built.dirs:
                run_example(reader, built, [])
        yield built
    finally:
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home


@pytest.mark.parametrize("reader", [pytest.param(r, id=r.name) for r in READERS])
def test_reader_fails_cleanly_on_mutated_input(seeds, reader, single_thread):
    """The valid seed reads; every mutation of it reads too or raises a QuantkitError, in bounded time/memory."""
    @settings(FUZZ, max_examples=max(5, int(FUZZ.max_examples * reader.share)))
    @given(data=st.data())
    def prop(data):
        ops = data.draw(mutations(reader, seeds), label="mutations")
        run_example(reader, seeds, ops)

    prop()


def test_mutation_machinery_roundtrips(seeds):
    """No-op serialization gives back readable files (so a finding is the reader's, not the fuzzer's)."""
    import quantkit
    from quantkit.gguf.reader import parse_gguf
    from quantkit.model.checkpoint import read_safetensors_header

    for seed in ("hf-single", "gguf"):
        doc = copy.deepcopy(seeds.parsed(seed, "model.safetensors" if seed == "hf-single" else "model.gguf"))
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "f"
            p.write_bytes(doc.serialize())
            if seed == "gguf":
                assert parse_gguf(p).tensors.keys() == {t[0] for t in doc.tensors}
                assert p.read_bytes() == (seeds.path("gguf") / "model.gguf").read_bytes()
            else:
                assert set(read_safetensors_header(p)) == {k for k, _, _ in doc.entries}
    model = quantkit.load(seeds.path("gguf-tokenizer") / "model.gguf")  # the tokenizer seed is a usable vocabulary
    assert model.tokenizer.encode("hello")
