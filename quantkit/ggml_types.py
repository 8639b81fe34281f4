"""The ggml tensor types: which ones quantkit supports, their block geometry, and the fp16 fields of their blocks.

Type names are `gguf.GGMLQuantizationType` member names ("Q4_K", "F16", ...). Sizes come from gguf-py's
`GGML_QUANT_SIZES`, for every type it knows (a GGUF written by llama.cpp may hold types quantkit does not encode);
quantkit encodes and decodes `SUPPORTED_TYPES`.

gguf-py (~0.9 s, ~700 modules) is imported at the first size lookup, not here: the encoder worker processes import
this module for the fp16 helpers with numpy only, and size their blocks with `quantkit.gguf.encode.BLOCK_SIZES`,
a copy of this table that tests/test_ggml_types.py checks entry by entry.
"""

from __future__ import annotations

import functools

import numpy as np

from quantkit.errors import SchemeError

FLOAT_TYPES = ("F32", "F16", "BF16")
LEGACY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # blocks of 32
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # super-blocks of 256
# i-quants: IQ4_NL (blocks of 32) and IQ4_XS index a non-linear value table; the others (super-blocks of 256)
# store groups of 8 or 4 weights as points of a lattice grid (gguf/iq_lattice.py)
I_TYPES = ("IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# the block types whose encoder needs an importance vector (ggml asserts one): llama.cpp writes them only with an
# imatrix, and never into token_embd
IMPORTANCE_TYPES = ("IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
BLOCK_TYPES = LEGACY_TYPES + K_TYPES + I_TYPES
# ggml's kvalues_iq4nl: the 16 values an IQ4_NL / IQ4_XS index selects (times the block's scale)
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
SUPPORTED_TYPES = FLOAT_TYPES + BLOCK_TYPES
# llama.cpp types quantkit decodes (kernels/ggml_ref.py) but does not encode
DECODE_ONLY_TYPES = ("TQ1_0", "TQ2_0")
DECODED_TYPES = SUPPORTED_TYPES + DECODE_ONLY_TYPES


@functools.cache
def sizes() -> dict[str, tuple[int, int]]:
    """{type name: (elements per block, bytes per block)} for every ggml type gguf-py knows."""
    from gguf import GGML_QUANT_SIZES

    return {t.name: (int(block), int(size)) for t, (block, size) in GGML_QUANT_SIZES.items()}


def _sizes(name: str) -> tuple[int, int]:
    try:
        return sizes()[name]
    except (KeyError, TypeError):
        raise SchemeError(f"unknown ggml type {name!r} (quantkit supports {', '.join(SUPPORTED_TYPES)})") from None


def is_float_type(name) -> bool:
    """F32 / F16 / BF16: plain little-endian values, no blocks. Anything else (other names, non-strings): False."""
    return name in FLOAT_TYPES


def is_block_type(name) -> bool:
    """A known ggml type with blocks of more than one element (Q4_K, Q8_0, IQ4_XS, ...)."""
    return isinstance(name, str) and sizes().get(name, (1, 0))[0] > 1


def check_type(name, what: str = "tensor") -> str:
    """`name` if quantkit encodes and decodes it, else SchemeError naming `what` and the supported types."""
    if name not in SUPPORTED_TYPES:
        raise SchemeError(f"{what}: unsupported ggml type {name!r} (supported: {', '.join(SUPPORTED_TYPES)})")
    return name


def torch_dtype(name: str):
    """The torch dtype holding a float type's values (torch is imported here, on call)."""
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]


def block_size(name: str) -> int:
    """Elements per block (1 for the float types)."""
    return _sizes(name)[0]


def type_size(name: str) -> int:
    """Bytes per block."""
    return _sizes(name)[1]


def row_nbytes(name: str, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements; SchemeError if `n_cols` is not a whole number of blocks."""
    block, size = _sizes(name)
    if n_cols % block:
        raise SchemeError(f"row length {n_cols} is not a multiple of the {name} block size {block}")
    return n_cols // block * size


def tensor_nbytes(shape: tuple[int, ...], name: str) -> int:
    """Bytes of a tensor of `shape` (numpy order: rows of shape[-1] elements) stored as `name`."""
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * row_nbytes(name, shape[-1] if len(shape) else 1)


# ---- fp16 fields (block scales/mins): little-endian IEEE half, as GGML_FP16_TO_FP32 / GGML_FP32_TO_FP16 ----

def f16_to_f32(fields):
    """fp16 fields [..., 2] uint8 -> float32 [...], exactly. numpy in, numpy out; torch in, torch out (any device)."""
    if isinstance(fields, np.ndarray):
        return np.ascontiguousarray(fields).view("<f2")[..., 0].astype(np.float32)
    import torch  # only reached with a torch tensor, so torch is already imported

    return fields.contiguous().view(torch.float16)[..., 0].float()


def f32_to_f16(values) -> np.ndarray:
    """float values [...] -> fp16 fields [..., 2] uint8, rounded to nearest even, inf beyond the fp16 range (numpy)."""
    v = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(v.astype("<f2")).view(np.uint8).reshape(*v.shape, 2)
