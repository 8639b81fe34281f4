"""Block sizes of the ggml types and the row-chunk encoder shared by in-process and worker-process encoding.

Imports numpy and quantkit's numpy encoders only (no torch), so `quantkit.gguf.encode_worker` starts quickly.
"""

from __future__ import annotations

import numpy as np

from quantkit.errors import SchemeError
from quantkit.gguf import kquants, legacy
from quantkit.gguf.f32ops import F32, seqsum_rows

# type name -> (elements per block, bytes per block)
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
LEGACY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES

# elements per chunk: big enough to amortize numpy's per-call cost, small enough to stay in L2
CHUNK_ELEMENTS = 1 << 18


def row_bytes(type_name: str, cols: int) -> int:
    block, size = BLOCK_SIZES[type_name]
    return cols // block * size


def encode_checked_rows(chunk: np.ndarray, type_name: str, qw: np.ndarray | None, name: str, r0: int) -> np.ndarray:
    """Block bytes [rows, row_bytes] of a float32 row chunk that starts at row r0 of tensor `name` (refuses NaN/Inf)."""
    if not np.isfinite(chunk).all():
        bad = (np.argwhere(~np.isfinite(chunk))[0] + [r0, 0]).tolist()
        raise SchemeError(f"{name}: weight contains NaN or Inf (first at index {bad}); refusing to quantize it")
    return _encode_rows(chunk, type_name, qw).reshape(chunk.shape[0], -1)


def _encode_rows(x: np.ndarray, type_name: str, qw: np.ndarray | None) -> np.ndarray:
    rows, cols = x.shape
    block = BLOCK_SIZES[type_name][0]
    blocks = x.reshape(-1, block)
    if type_name in K_TYPES:
        qwb = None if qw is None else np.broadcast_to(qw.reshape(1, -1), (rows, cols)).reshape(-1, block)
        return kquants.ENCODERS[type_name](blocks, qwb)
    if qw is None or type_name == "Q8_0":
        return legacy.REF[type_name](blocks)
    sigma2 = seqsum_rows(x * x) / F32(cols)  # per row
    xb = blocks.reshape(rows, cols // block, block)
    w = qw.reshape(1, -1, block) * np.sqrt(sigma2[:, None, None] + xb * xb)
    return legacy.WEIGHTED[type_name](blocks, w.reshape(-1, block))
