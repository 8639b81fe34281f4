"""Calibration sources: where documents come from (built-in set, local files, Hugging Face datasets).

A document is either plain text (`str`) or a conversation (`list` of `{"role", "content"}` dicts), which is
rendered with the model's chat template when tokenized. Every source also reports its identity (what it is and
a content hash) for the output's provenance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import CalibrationError

Document = str | list

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "calib"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

# name -> (dataset path, config, split, column, extra load_dataset kwargs)
HF_DATASETS: dict[str, tuple[str, str | None, str, str, dict]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text", {}),
    "c4": ("allenai/c4", None, "train", "text", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}),
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", "text", {}),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", None, "train_sft", "messages", {}),
}


@dataclass
class Source:
    name: str  # "builtin", a path, or "hf:<name>"
    documents: list[Document]
    sha256: str  # hash of the raw content the documents came from
    details: dict[str, Any] = field(default_factory=dict)


def open_source(spec: str | Path, max_documents: int | None = None) -> Source:
    """`builtin`, a local .txt/.jsonl/.parquet file, a directory of them, or a known HF dataset name."""
    text = str(spec)
    if text == "builtin":
        return builtin_source()
    path = Path(text).expanduser()
    if path.is_dir():
        return directory_source(path)
    if path.is_file():
        return file_source(path)
    name = text[3:] if text.startswith("hf:") else text
    if name in HF_DATASETS:
        return hf_source(name, max_documents)
    raise CalibrationError(
        f"calibration source {text!r}: not a file, a directory, or a known dataset "
        f"(builtin, {', '.join(HF_DATASETS)}; local files: {', '.join(LOCAL_SUFFIXES)})"
    )


# ---- built-in set ----

def builtin_source(directory: Path = BUILTIN_DIR) -> Source:
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise CalibrationError(f"{manifest_path}: the built-in calibration set is missing (run scripts/make_calib.py)")
    manifest = json.loads(manifest_path.read_text())
    docs: list[Document] = []
    for entry in manifest["files"]:
        path = directory / entry["file"]
        try:
            data = path.read_bytes()
        except OSError:
            raise CalibrationError(f"{path}: listed in {manifest_path.name} but missing") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CalibrationError(f"{path}: content does not match its sha256 in {manifest_path.name} (modified?)")
        docs += _documents_from_bytes(path, data)
    return Source("builtin", docs, manifest["sha256"],
                  {"version": manifest.get("version"), "files": len(manifest["files"])})


# ---- local files ----

def file_source(path: Path) -> Source:
    if path.suffix not in LOCAL_SUFFIXES:
        raise CalibrationError(f"{path}: unsupported calibration file type {path.suffix!r}; expected one of "
                               f"{', '.join(LOCAL_SUFFIXES)}")
    data = path.read_bytes()
    return Source(str(path), _documents_from_bytes(path, data), hashlib.sha256(data).hexdigest())


def directory_source(path: Path) -> Source:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise CalibrationError(f"{path}: directory has no calibration files ({', '.join(LOCAL_SUFFIXES)})")
    docs: list[Document] = []
    h = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        h.update(f.name.encode() + b"\0" + hashlib.sha256(data).digest())
        docs += _documents_from_bytes(f, data)
    return Source(str(path), docs, h.hexdigest(), {"files": len(files)})


def _documents_from_bytes(path: Path, data: bytes) -> list[Document]:
    if path.suffix == ".parquet":
        return _parquet_documents(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".txt":
        return [text] if text.strip() else []
    docs: list[Document] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise CalibrationError(f"{path}:{lineno}: JSON nested too deeply") from None
        docs.append(_document_from_record(obj, f"{path}:{lineno}"))
    return [d for d in docs if d]


def _document_from_record(obj: Any, where: str) -> Document:
    """A JSON record: a string, {"text": ...}, or {"messages"|"conversations": [{"role", "content"}, ...]}."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        if isinstance(obj.get("text"), str):
            return obj["text"]
        for key in ("messages", "conversations"):
            msgs = obj.get(key)
            if msgs is not None:
                if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
                    raise CalibrationError(f"{where}: {key!r} must be a list of {{'role', 'content'}} objects")
                return [{"role": m.get("role", "user"), "content": str(m["content"])} for m in msgs]
    raise CalibrationError(f"{where}: expected a string or an object with 'text' or 'messages'")


def _parquet_documents(path: Path) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CalibrationError(f"{path}: reading .parquet needs pyarrow (pip install 'quantkit[data]')") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several error classes for corrupt files
        raise CalibrationError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    for column in ("text", "messages", "conversations", "content"):
        if column in table.column_names:
            rows = table.column(column).to_pylist()
            key = "messages" if column in ("messages", "conversations") else "text"
            return [d for i, r in enumerate(rows) if r is not None
                    for d in [_document_from_record({key: r}, f"{path} row {i}")] if d]
    raise CalibrationError(f"{path}: parquet has no 'text' or 'messages' column "
                           f"(columns: {', '.join(table.column_names)})")


# ---- Hugging Face datasets ----

def hf_source(name: str, max_documents: int | None = None) -> Source:
    path, config, split, column, kwargs = HF_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"calibration dataset {name!r} needs the `datasets` library "
                               "(pip install 'quantkit[data]')") from None
    try:
        ds = datasets.load_dataset(path, config, split=split, **kwargs)
    except Exception as e:  # offline, missing, auth: many exception classes
        raise CalibrationError(
            f"calibration dataset {name!r} ({path}) could not be loaded ({type(e).__name__}); it needs the network "
            "or a local datasets cache. Offline, pass a local file or directory, or use --calib builtin"
        ) from None
    docs: list[Document] = []
    h = hashlib.sha256(f"{path}/{config}/{split}".encode())
    for i, row in enumerate(ds):
        value = row[column]
        doc = _document_from_record({"messages" if column == "messages" else "text": value}, f"{name} row {i}")
        if doc and (not isinstance(doc, str) or doc.strip()):
            docs.append(doc)
            h.update(json.dumps(doc, ensure_ascii=False).encode())
        if max_documents and len(docs) >= max_documents:
            break
    return Source(f"hf:{name}", docs, h.hexdigest(), {"dataset": path, "config": config, "split": split})
