"""Load a model for generation together with its tokenizer (what `quantkit generate` and `quantkit chat` run)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from quantkit.errors import TokenizerError
from quantkit.model.reference import Transformer
from quantkit.model.tokenizer import Tokenizer


class ModelWithTokenizer(NamedTuple):
    """A runnable model (`model.runtime_info` describes what was loaded) and the tokenizer found next to it."""

    model: Transformer
    tokenizer: Tokenizer


def load_with_tokenizer(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto",
                        dtype: str | torch.dtype | None = None, cache_dequant: bool = False,
                        cpu_kernels: bool = True) -> ModelWithTokenizer:
    """`runtime.model.load_model(path, ...)` (any format quantkit reads) and the tokenizer the loader found for it
    (`model.runtime_info["tokenizer_path"]`). Unpacks as `(model, tokenizer)`.

    dtype: activation dtype (default float32 on CPU, bfloat16 on CUDA); cache_dequant: keep dequantized weights
    after first use; cpu_kernels: on CPU, torch's int4/int8 matmul kernels instead of the exact fp32 path.
    Raises TokenizerError when no tokenizer is found."""
    from quantkit.model.tokenizer import load_tokenizer
    from quantkit.runtime.model import load_model

    model = load_model(path, device=device, backend=backend, dtype=dtype, cache_dequant=cache_dequant,
                       cpu_kernels=cpu_kernels)
    tok_path = model.runtime_info.get("tokenizer_path")
    if not tok_path:
        raise TokenizerError(f"{path}: no tokenizer found next to the model (tokenizer.model or tokenizer.json)")
    return ModelWithTokenizer(model, load_tokenizer(tok_path))
