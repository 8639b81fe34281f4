"""Load a model for generation together with its tokenizer (what `quantkit generate` and `quantkit chat` run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from quantkit.errors import GenerationError, TokenizerError
from quantkit.io import read_json_object
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
    info = model.runtime_info
    tok_path = info.get("tokenizer_path")
    if not tok_path:
        raise TokenizerError(f"{path}: no tokenizer found next to the model (tokenizer.model or tokenizer.json)")
    tok = load_tokenizer(tok_path)
    if info.get("chat_template"):  # the format's own metadata (GGUF tokenizer.chat_template) comes first
        from quantkit.model.chat_template import find_chat_template

        tok.chat_template = find_chat_template(Path(tok_path).parent, info["chat_template"],
                                               f"{info.get('format', 'model')} metadata")
    info["chat_template_source"] = tok.chat_template_source
    info["sampling"] = sampling_defaults(info.get("path") or path)
    return ModelWithTokenizer(model, tok)


def sampling_defaults(path: str | Path) -> dict[str, Any]:
    """The sampling the model at `path` asks for (`runtime.generate.model_sampling` of the generation_config.json
    in its directory; a GGUF file or a directory without one: quantkit's default)."""
    from quantkit.runtime.generate import model_sampling

    config_path = Path(path) / "generation_config.json"
    if not config_path.is_file():
        return model_sampling(None)
    return model_sampling(read_json_object(config_path, GenerationError), str(config_path))
