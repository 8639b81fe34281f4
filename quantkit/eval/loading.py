"""Load any model quantkit can run for evaluation, and find its tokenizer.

Uses `quantkit.runtime.load_model` (all quantized formats, full-precision sources) when the runtime exists, else
the reference model for full-precision sources. Hub ids are resolved through `open_checkpoint` (clear offline error).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from quantkit.errors import TokenizerError
from quantkit.errors import NonFiniteError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class EvalModel:
    spec: str
    model: torch.nn.Module
    device: torch.device
    info: dict
    tokenizer_path: Path | None

    def logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """tokens [1, T] -> float32 logits [1, T, V]. Raises NonFiniteError when they hold NaN or Inf, naming this
        model and the weights that explain it (or the overflow when every weight is finite)."""
        model, device, spec = self.model, self.device, self.spec

        def run(tokens: torch.Tensor) -> torch.Tensor:
            logits = model(tokens.to(device)).float()
            if not bool(torch.isfinite(logits).all()):
                raise NonFiniteError(f"{spec}: the logits are NaN or Inf" + explain_nonfinite(model))
            return logits

        return run


def explain_nonfinite(model: torch.nn.Module) -> str:
    """Which weights of `model` hold NaN or Inf (runtime.model.explain_nonfinite), as the end of an error message."""
    if _has_runtime():
        from quantkit.runtime.model import explain_nonfinite as explain

        return explain(model)
    return ""


def _has_runtime() -> bool:
    return importlib.util.find_spec("quantkit.runtime.model") is not None


def load_eval_model(spec: str, device: str = "cpu", dtype: str | None = None, backend: str = "auto",
                    progress=None, cache_dequant: bool = False) -> EvalModel:
    from quantkit.model.checkpoint import open_checkpoint

    torch_dtype = DTYPES[dtype] if dtype else None
    local = Path(spec).expanduser().exists()
    if _has_runtime():
        from quantkit.runtime.model import load_model

        target = spec if local else open_checkpoint(spec)
        extra = {"cache_dequant": True} if cache_dequant else {}
        model = load_model(target, device=device, backend=backend, dtype=torch_dtype, progress=progress, **extra)
        info = dict(getattr(model, "runtime_info", {}))
        tok = info.get("tokenizer_path")
        dev = model.model.norm.weight.device
        return EvalModel(spec, model, dev, info, Path(tok) if tok else None)
    from quantkit.model.reference import Transformer

    ckpt = open_checkpoint(spec)
    model = Transformer.from_checkpoint(ckpt, torch_dtype or torch.float32, device=device, progress=progress)
    info = {"path": str(ckpt.path), "format": "float", "device": str(device),
            "dtype": str(torch_dtype or torch.float32).replace("torch.", "")}
    return EvalModel(spec, model, torch.device(device), info, ckpt.tokenizer_path)


def pick_tokenizer(explicit: str | None, *models: EvalModel | None):
    """--tokenizer, else the first model's own tokenizer file."""
    from quantkit.model.tokenizer import load_tokenizer

    if explicit:
        return load_tokenizer(explicit)
    for m in models:
        if m is not None and m.tokenizer_path is not None:
            return load_tokenizer(m.tokenizer_path)
    names = ", ".join(m.spec for m in models if m is not None)
    raise TokenizerError(f"no tokenizer found with {names}; pass --tokenizer PATH (tokenizer.model or tokenizer.json)")
