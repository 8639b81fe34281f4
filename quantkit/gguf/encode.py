"""The numpy side of ggml block encoding: block sizes, row chunking, and one chunk of rows -> block bytes.

No torch and no gguf-py here: the encoder worker processes (`encode_pool`) import only this module, the numpy
encoders and `quantkit.ggml_types` (whose size table imports gguf-py on first use, hence the copy below).
Source rows arrive in their stored 16/32-bit form (`SOURCE_DTYPES`) and are widened to float32 per chunk.
"""

from __future__ import annotations

import numpy as np

from quantkit.errors import SchemeError
from quantkit.ggml_types import I_TYPES, K_TYPES, LEGACY_TYPES
from quantkit.gguf import iq1, iq2, iq3, iquants, kquants, legacy, native
from quantkit.gguf.f32ops import F32, seqsum_rows

# type name -> (elements per block, bytes per block) of `ggml_types.SUPPORTED_TYPES`: the workers' copy of
# `ggml_types.sizes()`, checked against it by tests/test_ggml_types.py
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ4_NL": (32, 18), "IQ4_XS": (256, 136), "IQ3_S": (256, 110), "IQ3_XXS": (256, 98), "IQ2_S": (256, 82),
    "IQ2_XS": (256, 74), "IQ2_XXS": (256, 66), "IQ1_M": (256, 56), "IQ1_S": (256, 50),
}


def _native_or_numpy(type_name: str):
    """The C++ encoder of `type_name` where it can be built (gguf/native.py), else the numpy one (its reference)."""
    reference = kquants.ENCODERS[type_name]

    def encoder(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
        if native.library() is None:
            return reference(x, qw)
        return native.encode(type_name, x, qw, np.empty((x.shape[0], BLOCK_SIZES[type_name][1]), dtype=np.uint8))
    return encoder


# block encoders of the searched types: [n_blocks, block] float32 (+ importance) -> [n_blocks, bytes] uint8
SEARCHED_ENCODERS = {**kquants.ENCODERS, **iquants.ENCODERS, **iq3.ENCODERS, **iq2.ENCODERS, **iq1.ENCODERS,
                     **{t: _native_or_numpy(t) for t in native.TYPES}}

# elements per chunk: big enough to amortize numpy's per-call cost (~1 ms per Q4_K call), small enough to keep
# the search's work arrays (~1 MB each) near the core
CHUNK_ELEMENTS = 1 << 18

# how source rows are held before widening: bf16 as its raw 16 bits (numpy has no bfloat16)
SOURCE_DTYPES = {"bf16": np.uint16, "f16": np.float16, "f32": np.float32}


def is_searched(type_name: str, has_importance: bool) -> bool:
    """Whether encoding `type_name` runs a scale search (k-quants, i-quants; legacy types other than Q8_0 given an
    imatrix), rather than the legacy reference rounding (a few passes per block)."""
    searched_always = type_name in K_TYPES or type_name in I_TYPES
    return searched_always or (has_importance and type_name in LEGACY_TYPES and type_name != "Q8_0")


def row_bytes(type_name: str, cols: int) -> int:
    block, size = BLOCK_SIZES[type_name]
    return cols // block * size


def chunk_starts(rows: int, cols: int) -> tuple[int, range]:
    """(rows per chunk, chunk start rows) for a [rows, cols] weight."""
    step = max(1, CHUNK_ELEMENTS // cols)
    return step, range(0, rows, step)


def widen(rows: np.ndarray, kind: str) -> np.ndarray:
    """Stored rows (`SOURCE_DTYPES[kind]`) -> contiguous float32. bf16 -> f32 is exact as a 16-bit shift."""
    if kind == "bf16":
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(rows, dtype=np.float32)


def encode_rows(x: np.ndarray, type_name: str, qw: np.ndarray | None, name: str = "tensor",
                first_row: int = 0) -> np.ndarray:
    """float32 rows [r, cols] -> block bytes [r, row_bytes]. Refuses NaN/Inf, naming the tensor and the index
    (`first_row` is the chunk's offset in the tensor)."""
    if not np.isfinite(x).all():
        bad = (np.argwhere(~np.isfinite(x))[0] + [first_row, 0]).tolist()
        raise SchemeError(f"{name}: weight contains NaN or Inf (first at index {bad}); refusing to quantize it")
    rows, cols = x.shape
    block = BLOCK_SIZES[type_name][0]
    blocks = x.reshape(-1, block)
    if type_name in K_TYPES or type_name in I_TYPES:
        qwb = None if qw is None else np.broadcast_to(qw.reshape(1, -1), (rows, cols)).reshape(-1, block)
        data = SEARCHED_ENCODERS[type_name](blocks, qwb)
    elif qw is None or type_name == "Q8_0":
        data = legacy.REF[type_name](blocks)
    else:
        sigma2 = seqsum_rows(x * x) / F32(cols)  # per row
        xb = blocks.reshape(rows, cols // block, block)
        w = qw.reshape(1, -1, block) * np.sqrt(sigma2[:, None, None] + xb * xb)
        data = legacy.WEIGHTED[type_name](blocks, w.reshape(-1, block))
    return data.reshape(rows, -1)
