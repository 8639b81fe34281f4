"""The real clients that load quantkit's outputs (transformers with optimum + gptqmodel for GPTQ/AWQ,
compressed-tensors for its format), wrapped as `logits_fn(tokens [1, T]) -> logits [1, T, V]` in fp32 on CPU.

GPTQModel's CPU linears pick a fused int4 kernel that computes in bf16 by default; `exact=True` switches them to
their own dequantize-then-matmul path (`linear_mode = "train"`), so the comparison measures the format, not
kernel rounding.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

REQUIRED = {
    "gptq": ("transformers", "optimum", "gptqmodel"),
    "awq": ("transformers", "gptqmodel"),
    "compressed-tensors": ("transformers", "compressed_tensors"),
    "hf": ("transformers",),
}


def missing_client(fmt: str) -> str | None:
    """None when the client for `fmt` is importable, else a reason naming the missing packages."""
    need = REQUIRED.get(fmt)
    if need is None:
        return f"no real client known for format {fmt!r}"
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"client packages not installed: {', '.join(missing)} (pip install 'quantkit[compat]')" if missing else None


def use_exact_kernels(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if hasattr(module, "linear_mode"):  # gptqmodel TorchAtenLinear / TorchAtenAwqLinear
            module.linear_mode = "train"
    return model


def transformers_logits_fn(path: str | Path, exact: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load `path` with `AutoModelForCausalLM.from_pretrained(dtype=float32, device_map='cpu')`."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu").eval()
    if exact:
        use_exact_kernels(model)

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(tokens).logits.float()

    logits_fn.model = model  # type: ignore[attr-defined]
    return logits_fn


