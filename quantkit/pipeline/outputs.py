"""Where the outputs of one run go, and what they weigh once written."""

from __future__ import annotations

import json
from pathlib import Path


def output_paths(out: Path, formats: list[str], gguf_type: str | None) -> dict[str, Path]:
    """One format: OUT itself. Several: OUT/<format> (gguf: OUT/model-<TYPE>.gguf)."""
    if len(formats) == 1:
        return {formats[0]: out}
    return {f: out / (f"model-{gguf_type}.gguf" if f == "gguf" else f) for f in formats}


def log_path(out: Path) -> Path:
    """The per-layer log beside an output: OUT/quant_log.jsonl, or FILE.quant_log.jsonl for a single file."""
    return out / "quant_log.jsonl" if out.is_dir() else out.with_name(out.name + ".quant_log.jsonl")


def write_log(rows: list[dict], path: Path) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def stored_size(path: Path) -> int:
    """Bytes of the weight files of an output (a GGUF file, or the .safetensors/.gguf files of a directory)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".gguf"))
