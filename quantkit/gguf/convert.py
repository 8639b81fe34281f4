"""Checkpoint -> GGUF without calibration: stream every tensor through the encoders into the writer.

This is `quantkit convert SRC --format gguf --type BF16|F16|F32|Q8_0` and `quantkit quantize --format gguf --type
Q4_K_M --method rtn [--imatrix FILE]`. One tensor is in memory at a time (plus the encoder's work buffers).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import SchemeError
from quantkit.ggml_types import is_block_type
from quantkit.gguf.encode import is_searched
from quantkit.gguf.encode_pool import ProcessEncoder
from quantkit.gguf.mixes import check_imatrix, get_file_type, tensor_types
from quantkit.gguf.tokenizer_export import GGUFVocab, vocab_from_sentencepiece
from quantkit.gguf.writer import GGUFFileWriter, display_name
from quantkit.model.checkpoint import Checkpoint


def source_vocab(ckpt: Checkpoint) -> GGUFVocab | None:
    tok = ckpt.tokenizer_path
    if tok is None or tok.suffix == ".json":
        return None  # tokenizer.json-only sources: no SPM vocabulary to export
    return vocab_from_sentencepiece(tok, ckpt.config.vocab_size)


def imatrix_kvs(importance_meta: dict[str, Any] | None) -> list[tuple[str, str, Any]]:
    """The `quantize.imatrix.*` KVs llama-quantize writes when it used an importance matrix."""
    if not importance_meta:
        return []
    out = [("quantize.imatrix.file", "STRING", str(importance_meta.get("file", "")))]
    if importance_meta.get("dataset"):
        out.append(("quantize.imatrix.dataset", "STRING", str(importance_meta["dataset"])))
    out.append(("quantize.imatrix.entries_count", "INT32", int(importance_meta.get("entries", 0))))
    out.append(("quantize.imatrix.chunks_count", "INT32", int(importance_meta.get("chunks", 0))))
    return out


def write_gguf(ckpt: Checkpoint, out: str | Path, ftype: str, *, importance: dict[str, torch.Tensor] | None = None,
               importance_meta: dict[str, Any] | None = None, pure: bool = False, force: bool = False,
               types: dict[str, str] | None = None, provenance: dict[str, Any] | None = None,
               name: str | None = None, progress: bool = True) -> Path:
    """Convert/quantize a full-precision checkpoint to one GGUF file with the llama-quantize mix of `ftype`."""
    ft = get_file_type(ftype)
    if types is None:
        types = tensor_types(ckpt.config, ft.name, pure=pure, has_imatrix=bool(importance))
    check_imatrix(types, ft.name, bool(importance))
    if importance and not any(is_block_type(t) for t in types.values()):
        raise SchemeError(f"an importance matrix only applies to quantized types, not {ft.name}")
    extra = imatrix_kvs(importance_meta)
    for key, value in (provenance or {}).items():
        extra.append((f"quantkit.{key}", "STRING", str(value)))
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ProcessEncoder()) if _wants_encoder_pool(types, importance) else None
        writer = stack.enter_context(GGUFFileWriter(
            out, ckpt.config, types, ftype=ft.name, vocab=source_vocab(ckpt), name=name or display_name(ckpt.path.name),
            extra_kvs=extra, importance=importance, force=force, progress=progress, model_dir=ckpt.path,
            encoder_pool=pool))
        return _stream_tensors(ckpt, writer, list(types))


def _wants_encoder_pool(types: dict[str, str], importance: dict[str, torch.Tensor] | None) -> bool:
    """Worker processes pay off for the searched block types (k-quants, imatrix-weighted legacy types) on more
    than one CPU; float casts and the legacy reference rounding stay in this process (`codec.encode`)."""
    return (os.cpu_count() or 1) > 1 and any(is_searched(t, bool(importance)) for t in types.values())


def _stream_tensors(ckpt: Checkpoint, writer: GGUFFileWriter, names: list[str]) -> Path:
    with ThreadPoolExecutor(1, thread_name_prefix="gguf-read") as reader:
        # read the next tensor while the current one is encoded and written (at most two in memory)
        pending = reader.submit(ckpt.get_tensor, names[0]) if names else None
        for i, tensor_name in enumerate(names):
            weight = pending.result()
            pending = reader.submit(ckpt.get_tensor, names[i + 1]) if i + 1 < len(names) else None
            writer.add(tensor_name, weight)
            del weight
        return writer.finish()


def load_importance(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An imatrix file (llama.cpp GGUF or legacy .dat) as {canonical name: mean x² [in]} + its provenance KVs."""
    from quantkit.gguf.imatrix import read_imatrix

    imatrix = read_imatrix(path)
    meta = {"file": str(path), "dataset": ",".join(imatrix.datasets), "entries": len(imatrix.entries),
            "chunks": imatrix.chunk_count}
    return imatrix.to_canonical(), meta


def convert_to_gguf(src: str | Path, out: str | Path, type_name: str, *, imatrix: str | Path | None = None,
                    pure: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """`quantkit convert SRC --format gguf --type T -o OUT` / the data-free `quantize --format gguf` path.

    Streams one tensor at a time from the source checkpoint through the encoders into the GGUF writer.
    Returns a JSON-able summary (sizes, bits per weight, seconds, peak RSS)."""
    import resource
    import sys
    import time

    from quantkit import __version__
    from quantkit.model.checkpoint import open_checkpoint

    t0 = time.perf_counter()
    ckpt = open_checkpoint(src)
    ft = get_file_type(type_name)
    importance, meta = (load_importance(imatrix) if imatrix else (None, None))
    provenance = {"method": "rtn" if importance is None else "rtn+imatrix", "source_fingerprint": ckpt.fingerprint()}
    path = write_gguf(ckpt, out, ft.name, importance=importance, importance_meta=meta, pure=pure, force=force,
                      provenance=provenance, progress=progress)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = Path(path).stat().st_size
    n = ckpt.num_parameters
    return {"quantkit_version": __version__, "command": "convert", "status": "ok", "format": "gguf",
            "type": ft.name, "source": str(ckpt.path), "output": str(path), "bytes": size,
            "bpw": round(8 * size / max(n, 1), 4), "params": n, "imatrix": str(imatrix) if imatrix else None,
            "seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
