"""Turn a calibration source into the exact token windows the quantizers see.

Documents are tokenized without BOS (conversations through the model's chat template) and concatenated into
one stream; `n_samples` windows of `seqlen - 1` tokens are drawn at seeded random offsets (the GPTQ recipe) and
each gets BOS in front, as the model sees text in use. The identity of the result (source, its content hash,
sampling arguments and the sha256 of the token tensor itself) goes into the output's provenance.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from quantkit.calib.sources import Document, Source, open_source
from quantkit.errors import CalibrationError, TokenizerError


@dataclass
class CalibrationSet:
    tokens: torch.Tensor  # int64 [n_samples, seqlen]
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def seqlen(self) -> int:
        return self.tokens.shape[1]

    @property
    def sha256(self) -> str:
        return self.identity["tokens_sha256"]


def tokens_sha256(tokens: torch.Tensor) -> str:
    arr = np.ascontiguousarray(tokens.to(torch.int64).numpy()).astype("<i8")
    h = hashlib.sha256(f"{list(arr.shape)}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def tokenize_documents(documents: list[Document], tokenizer, max_tokens: int | None = None) -> list[int]:
    stream: list[int] = []
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            ids = tokenizer.encode(doc, bos=False)
        else:
            try:
                ids = tokenizer.apply_chat_template(doc, bos=False)
            except TokenizerError as e:
                raise CalibrationError(f"calibration conversation {i}: {e}") from None
        stream += ids
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    return stream


def sample_windows(stream: list[int], n_samples: int, seqlen: int, seed: int, bos_id: int | None,
                   source_name: str = "calibration data") -> torch.Tensor:
    if n_samples < 1:
        raise CalibrationError(f"--calib-samples must be at least 1 (got {n_samples})")
    if seqlen < 2:
        raise CalibrationError(f"--calib-seqlen must be at least 2 (got {seqlen})")
    if not stream:
        raise CalibrationError(f"{source_name}: contains no text")
    body = seqlen - 1 if bos_id is not None else seqlen
    if len(stream) < body:
        raise CalibrationError(
            f"{source_name}: too short: {len(stream)} tokens, but one sample of --calib-seqlen {seqlen} needs "
            f"{body}; give more text or a smaller --calib-seqlen"
        )
    rng = random.Random(seed)
    data = torch.tensor(stream, dtype=torch.int64)
    rows = []
    for _ in range(n_samples):
        start = rng.randrange(0, len(stream) - body + 1)
        window = data[start:start + body]
        if bos_id is not None:
            window = torch.cat([torch.tensor([bos_id], dtype=torch.int64), window])
        rows.append(window)
    return torch.stack(rows)


def load_calibration(spec: str, tokenizer, n_samples: int = 128, seqlen: int = 512, seed: int = 0,
                     add_bos: bool = True) -> CalibrationSet:
    """The calibration token windows for `spec` (`builtin`, a file/directory, or an HF dataset name)."""
    if n_samples < 1:
        raise CalibrationError(f"--calib-samples must be at least 1 (got {n_samples})")
    source: Source = open_source(spec, max_documents=max(1000, 8 * n_samples))
    if not source.documents:
        raise CalibrationError(f"{source.name}: contains no text")
    # enough text for many non-overlapping windows, without tokenizing an unbounded corpus
    stream = tokenize_documents(source.documents, tokenizer, max_tokens=max(64 * n_samples * seqlen, 1 << 20))
    tokens = sample_windows(stream, n_samples, seqlen, seed, tokenizer.bos_id if add_bos else None, source.name)
    identity = {
        "source": source.name,
        "source_sha256": source.sha256,
        **({"source_details": source.details} if source.details else {}),
        "n_samples": n_samples,
        "seqlen": seqlen,
        "seed": seed,
        "available_tokens": len(stream),
        "tokens_sha256": tokens_sha256(tokens),
    }
    return CalibrationSet(tokens, identity)
