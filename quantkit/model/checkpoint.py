"""Checkpoint: lazy, memory-mapped, validated access to a full-precision source checkpoint.

Layouts:
- `hf-sharded`: `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json` + `config.json`
- `hf-single`: `model.safetensors` + `config.json`
- `consolidated`: `consolidated.safetensors` + `params.json` (mistral-inference)
- a Hugging Face hub id, resolved through `huggingface_hub` (offline: a clear error)

Tensors are always served under canonical (HF) names and in HF row order: consolidated Q/K rows are permuted
on read (`arch.interleaved_to_hf`). Nothing is read until `get_tensor` asks for it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.errors import CheckpointError
from quantkit.io import read_json_object
from quantkit.model import arch
from quantkit.model.config import ModelConfig

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
FLOAT_DTYPE_NAMES = ", ".join(SAFETENSORS_DTYPES)


@dataclass(frozen=True)
class TensorInfo:
    name: str  # canonical name
    file: Path
    stored_name: str  # name inside the file
    dtype: str  # safetensors dtype string (BF16, F16, F32, ...)
    shape: tuple[int, ...]
    nbytes: int


# bytes per element of every safetensors dtype (the safetensors library's own list, sub-byte types aside)
SAFETENSORS_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                          "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's limit


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {duplicate!r} appears twice")
    return out


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header without reading tensor data, checked as strictly as the safetensors library
    does: known dtypes, shapes of non-negative integers, dtype x shape = byte range, ranges contiguous and
    non-overlapping from 0 to the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size})")
            header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    ranges = []
    for name, meta in header.items():
        if name != "__metadata__":
            ranges.append((*_tensor_range(path, name, meta), name))
    end_of_previous = 0
    for start, end, name in sorted(ranges):
        if start != end_of_previous:
            problem = "overlaps the tensor before it" if start < end_of_previous else "leaves a gap before it"
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} data_offsets [{start}, {end}]"
                                  f" {problem} (expected it to start at byte {end_of_previous})")
        end_of_previous = end
    data_len = size - 8 - n
    if end_of_previous != data_len:
        raise CheckpointError(f"{path}: truncated or padded safetensors file: the tensors end at byte "
                              f"{end_of_previous} of the data section, which has {data_len} bytes")
    return header


def _tensor_range(path: Path, name: str, meta) -> tuple[int, int]:
    """A header entry's [start, end) after checking its dtype, shape and offsets agree."""
    def bad(what: str):
        raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {what}")

    if not isinstance(meta, dict):
        bad("expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEM_BYTES:
        bad(f"dtype {dtype!r} is not a safetensors dtype")
    is_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(shape, list) or not all(map(is_count, shape)):
        bad(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_count, offsets)):
        bad(f"data_offsets {offsets!r} is not a pair of non-negative integers")
    start, end = offsets
    nbytes = SAFETENSORS_ITEM_BYTES[dtype] * math.prod(shape)
    if end - start != nbytes:
        bad(f"data_offsets [{start}, {end}] hold {end - start} bytes, but {dtype} x {shape} needs {nbytes}")
    return start, end


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not os.path.exists(text)


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_path(spec: str | Path) -> Path:
    """A local directory, or a hub id downloaded through huggingface_hub (clear error when offline)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model directory, found a file")
        return path
    if _is_hub_id(str(spec)):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{spec}: not a local path, and huggingface_hub is not installed to fetch it"
                                  ) from None
        patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.md"]
        try:
            return Path(snapshot_download(str(spec), allow_patterns=patterns))
        except Exception as e:  # network/offline/auth errors come in many classes
            kind = type(e).__name__
            if _hub_offline():
                raise CheckpointError(
                    f"{spec}: not a local path, and the Hugging Face hub is offline (HF_HUB_OFFLINE is set) with no "
                    "cached copy; download it where the network allows and pass the local directory"
                ) from None
            if kind in ("RepositoryNotFoundError", "GatedRepoError"):
                raise CheckpointError(f"{spec}: not a local path, and the hub has no accessible repository by that "
                                      f"name ({kind})") from None
            raise CheckpointError(
                f"{spec}: not a local path and the Hugging Face hub could not be reached ({kind}); "
                "download it where the network allows and pass the local directory"
            ) from None
    raise CheckpointError(f"{spec}: no such file or directory")


@dataclass
class Checkpoint:
    path: Path
    layout: str
    config: ModelConfig
    tensors: dict[str, TensorInfo]  # canonical name -> info
    extra: dict[str, TensorInfo] = field(default_factory=dict)  # tensors not in the architecture (reported, unused)

    # ---- access ----

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} not in checkpoint") from None

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, canonical name and HF row order (memory-mapped read)."""
        info = self.info(name)
        try:
            with safe_open(str(info.file), framework="pt") as f:
                t = f.get_tensor(info.stored_name)
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {info.stored_name!r} ({e})") from None
        heads = self.config.rope_heads(name)
        if self.layout == "consolidated" and heads:
            t = arch.interleaved_to_hf(t, heads)
        return t

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        prefix = arch.layer_prefix(i)
        return {n: self.get_tensor(n) for n in self.tensors if n.startswith(prefix)}

    @cached_property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()} | {info.file for info in self.extra.values()})

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        total = 0
        for info in self.tensors.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total

    def dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for info in self.tensors.values():
            out[info.dtype] = out.get(info.dtype, 0) + 1
        return out

    @property
    def tokenizer_path(self) -> Path | None:
        for name in ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3", "tokenizer.json"):
            if (self.path / name).exists():
                return self.path / name
        return None

    def fingerprint(self) -> str:
        """A cheap identity of the source: file names, sizes and mtimes (not a content hash)."""
        import hashlib

        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        h.update(json.dumps(self.config.summary(), sort_keys=True).encode())
        return h.hexdigest()[:16]


# ---- opening ----

def open_checkpoint(spec: str | Path, validate: bool = True) -> Checkpoint:
    path = resolve_model_path(spec)
    if ((path / "consolidated.safetensors").exists() and (path / "params.json").exists()
            and not (path / "config.json").exists()):
        ckpt = _open_consolidated(path)
    elif (path / "config.json").exists():
        ckpt = _open_hf(path)
    elif (path / "params.json").exists():
        raise CheckpointError(f"{path}: params.json found but no consolidated.safetensors")
    else:
        raise CheckpointError(
            f"{path}: not a model directory: expected config.json (Hugging Face layout) or params.json + "
            "consolidated.safetensors (mistral-inference layout)"
        )
    if validate:
        validate_checkpoint(ckpt)
    return ckpt


def _tensor_info(name: str, file: Path, stored: str, meta: dict) -> TensorInfo:
    start, end = meta["data_offsets"]
    return TensorInfo(name, file, stored, meta["dtype"], tuple(meta["shape"]), end - start)


def read_safetensors_files(path: Path, stem: str = "model") -> dict[str, tuple[Path, dict]]:
    """Every tensor of `<stem>.safetensors`, or of the shards `<stem>.safetensors.index.json` lists: name ->
    (file, header entry). The index must name plain files beside it, each tensor in exactly one shard, and
    agree with the shards' headers."""
    index_path = path / f"{stem}.safetensors.index.json"
    if not index_path.exists():
        single = path / f"{stem}.safetensors"
        if not single.exists():
            shards = sorted(path.glob(f"{stem}-*-of-*.safetensors"))
            if shards:
                raise CheckpointError(f"{index_path}: missing; {len(shards)} shards found but no index to map them")
            raise CheckpointError(f"{path}: no {single.name} or {index_path.name} (safetensors weights)")
        return {n: (single, m) for n, m in read_safetensors_header(single).items() if n != "__metadata__"}
    weight_map = read_json_object(index_path, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: not a valid index (expected a JSON object with a 'weight_map' "
                              "of tensor names to shard file names)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: weight_map[{name!r}] = {shard!r}: expected the file name of a "
                                  ".safetensors shard in the same directory")
    shard_names = sorted(set(weight_map.values()))
    for shard in shard_names:
        if not (path / shard).is_file():
            missing_tensors = [n for n, s in weight_map.items() if s == shard]
            raise CheckpointError(f"{path / shard}: shard listed in the index is missing "
                                  f"({len(missing_tensors)} tensors, e.g. {missing_tensors[0]!r})")
    found: dict[str, tuple[Path, dict]] = {}
    for shard in shard_names:
        for name, meta in read_safetensors_header(path / shard).items():
            if name == "__metadata__":
                continue
            if name in found:
                raise CheckpointError(f"{path / shard}: tensor {name!r} is also in {found[name][0].name}; "
                                      "expected each tensor in exactly one shard")
            found[name] = (path / shard, meta)
    for name, shard in weight_map.items():
        if name not in found:
            raise CheckpointError(f"{index_path}: names tensor {name!r} in {shard}, but no shard contains it")
        if found[name][0].name != shard:
            raise CheckpointError(f"{index_path}: says tensor {name!r} is in {shard}, but it is in "
                                  f"{found[name][0].name}")
    return found


def _open_hf(path: Path) -> Checkpoint:
    config = ModelConfig.from_file(path / "config.json")
    layout = "hf-sharded" if (path / "model.safetensors.index.json").exists() else "hf-single"
    infos = {name: _tensor_info(name, file, name, meta) for name, (file, meta) in read_safetensors_files(path).items()}
    return _split_known(path, layout, config, infos)


def _open_consolidated(path: Path) -> Checkpoint:
    config = ModelConfig.from_file(path / "params.json")
    file = path / "consolidated.safetensors"

    def rename(stored: str) -> str:
        try:
            return arch.from_consolidated(stored)
        except KeyError:
            return stored

    infos: dict[str, TensorInfo] = {}
    for stored, meta in read_safetensors_header(file).items():
        name = rename(stored)
        if name in infos:
            raise CheckpointError(f"{file}: tensors {infos[name].stored_name!r} and {stored!r} are both {name!r}")
        if stored != "__metadata__":
            infos[name] = _tensor_info(name, file, stored, meta)
    return _split_known(path, "consolidated", config, infos)


def _split_known(path: Path, layout: str, config: ModelConfig, infos: dict[str, TensorInfo]) -> Checkpoint:
    expected = config.expected_shapes()
    known = {n: infos[n] for n in arch.canonical_names(config.num_hidden_layers) if n in infos}
    extra = {n: i for n, i in infos.items() if n not in expected}
    del expected
    return Checkpoint(path=path, layout=layout, config=config, tensors=known, extra=extra)


def validate_checkpoint(ckpt: Checkpoint) -> None:
    """Names, shapes and dtypes against the architecture; raises CheckpointError naming the first problem."""
    expected = ckpt.config.expected_shapes()
    missing = [n for n in expected if n not in ckpt.tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.path}: tensor {missing[0]!r} is missing{more}")
    for name, shape in expected.items():
        info = ckpt.tensors[name]
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {info.stored_name!r} has shape {list(info.shape)}, expected {list(shape)} "
                "from the config"
            )
        if info.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor {info.stored_name!r} has dtype {info.dtype}, expected a float type "
                f"({FLOAT_DTYPE_NAMES})"
            )


