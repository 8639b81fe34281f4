"""What every Hugging Face-layout output directory shares: the atomic temp dir, streamed safetensors shards with
an index, copied tokenizer files, config.json, the `quantkit.json` provenance record and the model card.
And the matching reader side: a safetensors directory (single file or shards + index) opened lazily.

Format writers (gptq, awq, compressed-tensors, float hf) encode tensors and hand them to `OutputDir`; readers use
`SafetensorsDir` to reach stored tensors by name.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from quantkit import __version__
from quantkit.io import read_json_object
from quantkit.errors import CheckpointError, FormatError
from quantkit.io import (check_output_path, move_into_place, sha256_file, shard_file_name, temp_dir_beside,
                         tensor_nbytes, write_json)
from quantkit.model.config import ModelConfig

# Files copied verbatim from the source directory when present.
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class OutputDir:
    """A directory being written: everything goes into `.<name>.tmp-*` beside `out`; `finish` renames it."""

    def __init__(self, out: str | Path, force: bool = False, max_shard_bytes: int = 5 * 1000**3, stem: str = "model"):
        self.out = check_output_path(Path(out), force)
        if self.out.exists() and not self.out.is_dir():
            raise FormatError(f"{self.out}: exists and is not a directory")
        self.tmp = temp_dir_beside(self.out)
        self.max_shard_bytes = max_shard_bytes
        self.stem = stem
        self._parts: list[Path] = []
        self._weight_map: dict[str, int] = {}
        self._shard = SpilledShard(self.tmp / f".{stem}.spill")
        self.total_bytes = 0
        self.closed = False

    # ---- tensors ----

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._weight_map:
            raise FormatError(f"tensor {name!r} written twice")
        size = tensor_nbytes(tensor)
        if self._shard and self._shard.nbytes + size > self.max_shard_bytes:
            self._flush()
        self._shard.add(name, tensor)
        self._weight_map[name] = len(self._parts)
        self.total_bytes += size

    def _flush(self) -> None:
        if self._shard:
            part = self.tmp / f"{self.stem}-{len(self._parts):05d}.part.safetensors"
            self._shard.write(part)
            self._parts.append(part)

    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    # ---- other files ----

    def write_json(self, name: str, obj: Any, sort_keys: bool = False) -> None:
        write_json(self.tmp / name, obj, sort_keys=sort_keys)

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def copy_tokenizer_files(self, source_dir: Path | None) -> list[str]:
        copied = []
        if source_dir is None:
            return copied
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copyfile(Path(source_dir) / name, self.tmp / name)
                copied.append(name)
        return copied

    # ---- completion ----

    def finish(self) -> Path:
        """Write the last shard and the index, then rename the temporary directory to `out`."""
        self._flush()
        self._shard.close()
        files = [shard_file_name(i, len(self._parts), self.stem) for i in range(len(self._parts))]
        for part, fname in zip(self._parts, files):
            part.rename(self.tmp / fname)
        if len(files) > 1:
            write_json(self.tmp / f"{self.stem}.safetensors.index.json",
                       {"metadata": {"total_size": self.total_bytes},
                        "weight_map": {n: files[i] for n, i in self._weight_map.items()}})
        move_into_place(self.tmp, self.out)
        self.closed = True
        return self.out

    def abort(self) -> None:
        self._shard.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.closed = True


# safetensors' dtype names, in the order of its Rust `Dtype` enum (save_file lays tensors out by descending dtype,
# then by name); a test checks the bytes against save_file's
SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                      torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
                      torch.float64: "F64", torch.int64: "I64"}
_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
                "BF16", "I32", "U32", "F32", "F64", "I64", "U64")


class SpilledShard:
    """One safetensors shard built without holding its tensors in memory: each tensor's bytes go to a spill file
    as it arrives (safetensors puts a header with every offset first, so the shard itself can only be written
    once all of its tensors are known); `write` lays them out as `save_file` does — the same bytes — copying from
    the spill in chunks. A 4 GB shard of a 7B model otherwise sat in RAM until the end of the run."""

    def __init__(self, spill: Path):
        self.spill_path = spill
        self._spill = None
        self._entries: list[tuple[str, str, list[int], int, int]] = []  # name, dtype, shape, spill offset, bytes

    def __bool__(self) -> bool:
        return bool(self._entries)

    @property
    def nbytes(self) -> int:
        """Tensor bytes in the shard so far."""
        return sum(e[4] for e in self._entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in SAFETENSORS_DTYPES:
            raise FormatError(f"{name}: dtype {t.dtype} cannot be stored in safetensors by quantkit")
        if self._spill is None:
            self._spill = open(self.spill_path, "w+b")
        offset = self._spill.tell()
        self._spill.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._entries.append((name, SAFETENSORS_DTYPES[t.dtype], list(t.shape), offset, t.numel() * t.element_size()))

    def write(self, path: Path) -> None:
        """The shard as `save_file(tensors, path, metadata={"format": "pt"})` would write it; the spill restarts."""
        order = sorted(self._entries, key=lambda e: (-_DTYPE_ORDER.index(e[1]), e[0]))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        start = 0
        for name, dtype, shape, _, nbytes in order:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + nbytes]}
            start += nbytes
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        blob += b" " * (-len(blob) % 8)
        self._spill.flush()
        with open(path, "wb") as out:
            out.write(len(blob).to_bytes(8, "little") + blob)
            for _, _, _, offset, nbytes in order:
                self._spill.seek(offset)
                while nbytes:
                    chunk = self._spill.read(min(nbytes, 64 << 20))
                    out.write(chunk)
                    nbytes -= len(chunk)
        self._spill.seek(0)
        self._spill.truncate()
        self._entries = []

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self.spill_path.unlink(missing_ok=True)


# ---- config / provenance / card ----

def source_config_dict(source_dir: Path | None, config: ModelConfig, dtype_name: str | None = None) -> dict[str, Any]:
    """The source's config.json as it is (all keys kept), else one made from ModelConfig (consolidated sources).
    With `dtype_name`, the stored dtype is rewritten in whichever spellings the config has (torch_dtype, dtype)."""
    cfg = None
    if source_dir is not None and (Path(source_dir) / "config.json").is_file():
        try:
            cfg = json.loads((Path(source_dir) / "config.json").read_text())
            cfg.pop("quantization_config", None)
        except json.JSONDecodeError:
            cfg = None
    if cfg is None:
        cfg = config.to_hf_dict()
    if dtype_name is not None:
        cfg["torch_dtype"] = dtype_name
        if "dtype" in cfg:
            cfg["dtype"] = dtype_name
    return cfg


def base_model_name(provenance: dict[str, Any], source_dir: Path | None) -> str:
    """What a model card names as `base_model`: the provenance's, else the source directory's name."""
    return str(provenance.get("base_model") or (source_dir.name if source_dir else "unknown"))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: several writers, one hash


def source_checksums(source_dir: Path | None) -> dict[str, str]:
    """sha256 of every weight and config file of the source (what `quantkit.json` records as the source checksum)."""
    if source_dir is None or not Path(source_dir).is_dir():
        return {}
    out = {}
    for f in sorted(Path(source_dir).iterdir()):
        if f.is_file() and (f.suffix == ".safetensors" or f.name in ("config.json", "params.json",
                                                                        "model.safetensors.index.json")):
            st = f.stat()
            key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
            if key not in _SHA_CACHE:
                _SHA_CACHE[key] = sha256_file(f)
            out[f.name] = _SHA_CACHE[key]
    return out


def provenance_record(fmt: str, source_dir: Path | None, provenance: dict[str, Any], schemes: dict[str, Any],
                      tensor_errors: dict[str, dict], quantization_config: dict | None) -> dict[str, Any]:
    """The `quantkit.json` object: tool, source identity, scheme(s), method, calibration, per-layer errors."""
    record: dict[str, Any] = {
        "quantkit_version": __version__,
        "format": fmt,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(source_dir) if source_dir else None, "sha256": source_checksums(source_dir)},
    }
    scheme_summary = {}
    for module, scheme in schemes.items():
        scheme_summary[module] = (None if scheme is None
                                  else scheme.describe() if hasattr(scheme, "describe") else str(scheme))
    if scheme_summary:
        record["schemes"] = scheme_summary
    for key, value in provenance.items():
        if key == "source" and isinstance(value, dict):
            record["source"].update(value)
        else:
            record[key] = value
    layers = dict(record.get("layers") or {})
    for name, err in tensor_errors.items():
        if err:
            layers.setdefault(name, {}).update(err)
    record["layers"] = layers
    if quantization_config is not None:
        record["quantization_config"] = quantization_config
    return record


def model_card(fmt: str, base_model: str, description: str, loaders: list[str], provenance: dict[str, Any],
               relation: str | None = "quantized") -> str:
    """README.md with the Hub's YAML header (base_model, base_model_relation: quantized) and the known numbers."""
    tags = ["quantkit", fmt] + [t for t in provenance.get("tags", []) if t != fmt]
    header = ["---", f"base_model: {base_model}"] + ([f"base_model_relation: {relation}"] if relation else [])
    lines = header + ["quantized_by: quantkit" if relation == "quantized" else "converted_by: quantkit",
                      "library_name: transformers", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    lines += [f"# {Path(base_model).name} ({fmt})", "", f"Quantized with quantkit {__version__}: {description}.", ""]
    if provenance.get("method"):
        lines.append(f"- method: `{provenance['method']}`")
    if provenance.get("scheme") or provenance.get("preset"):
        lines.append(f"- scheme: `{provenance.get('scheme') or provenance.get('preset')}`")
    calib = provenance.get("calibration")
    if isinstance(calib, dict) and calib:
        lines.append("- calibration: " + ", ".join(f"{k}={v}" for k, v in calib.items()))
    if loaders:
        lines += ["", "Loads with: " + "; ".join(loaders) + "."]
    quality = provenance.get("quality")
    if isinstance(quality, dict) and quality:
        lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in quality.items()]
    if provenance.get("command"):
        lines += ["", "```", str(provenance["command"]), "```"]
    return "\n".join(lines) + "\n"


# ---- reading ----

class SafetensorsDir:
    """The safetensors files of a directory (index + shards, or one model.safetensors), names -> file, lazily."""

    def __init__(self, path: Path, stem: str = "model"):
        from quantkit.model.checkpoint import read_safetensors_files

        self.path = Path(path)
        try:
            found = read_safetensors_files(self.path, stem)
        except CheckpointError as e:
            raise FormatError(str(e)) from None
        self.files: dict[str, Path] = {name: file for name, (file, _) in found.items()}
        self.meta: dict[str, dict] = {name: meta for name, (_, meta) in found.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name]["shape"])

    def matrix_shape(self, name: str) -> tuple[int, int]:
        """The (rows, columns) of a stored 2-D tensor that must be present and non-empty."""
        if name not in self.files:
            raise FormatError(f"{self.path}: tensor {name!r} is missing")
        shape = self.shape(name)
        if len(shape) != 2 or 0 in shape:
            raise FormatError(f"{self.files[name]}: tensor {name!r} has shape {list(shape)}, expected a non-empty "
                              "matrix")
        return shape

    def dtype(self, name: str) -> str:
        return self.meta[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise FormatError(f"{self.path}: tensor {name!r} is missing")
        try:
            with safe_open(str(self.files[name]), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise FormatError(f"{self.files[name]}: cannot read tensor {name!r} ({e})") from None


def read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, FormatError)


def quantization_config_of(path: Path) -> dict[str, Any] | None:
    """config.json's `quantization_config`, or None when the directory has no config.json or no such key."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None  # the format readers report the broken config.json itself
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) else None


def tokenizer_in(path: Path) -> Path | None:
    for name in ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3", "tokenizer.json"):
        if (Path(path) / name).exists():
            return Path(path) / name
    return None


def checked_setting(source: str | Path, key: str, value: Any, allowed: tuple, expected: str | None = None) -> Any:
    """A quantization-config value that must be one of `allowed` (ints, bools, strings: compared with their type,
    so true is not 1); FormatError naming the file, key and value otherwise."""
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise FormatError(f"{source}: quantization_config {key} = {value!r}: expected "
                          f"{expected or ' or '.join(map(repr, allowed))}")
    return value


def checked_group_size(source: str | Path, key: str, value: Any, channel: tuple = (-1,)) -> int:
    """A group size: a positive integer, or one of `channel` meaning one group per row."""
    if isinstance(value, bool) or not isinstance(value, int) or not (value > 0 or value in channel):
        raise FormatError(f"{source}: quantization_config {key} = {value!r}: expected a positive integer or "
                          f"{' or '.join(map(str, channel))} (per channel)")
    return value

