"""Assemble a runnable `Transformer` from any checkpoint quantkit reads, keeping quantized weights compressed.

`load_model(path)` accepts a full-precision source (`open_checkpoint`: HF or consolidated layout) or any quantized
checkpoint `read_checkpoint` knows (GPTQ, AWQ, compressed-tensors, GGUF). Each linear becomes a `QuantLinear`
(QuantTensor), a `GGMLLinear` (GGMLTensor) or a plain `nn.Linear` (float); norms and embeddings are used as stored
(a ggml-typed embedding dequantizes only the rows it looks up). The module tree is the reference model's, so
the reference forward, the layer-wise pieces and the KV-cache generator all work unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from quantkit.errors import CheckpointError, DeviceError, FormatError
from quantkit.model.reference import Transformer
from quantkit.tensors import GGMLTensor, QuantTensor, first_nonfinite
from quantkit.runtime.qlinear import (BACKENDS, GGMLEmbedding, GGMLLinear, QuantLinear, adjacent_rows, is_block_type,
                                      shares_storage)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Source:
    """What the loader needs from any checkpoint: config, names, a getter, and where the tokenizer is."""

    path: Path
    format: str
    config: Any
    names: list[str]
    get: Callable[[str], Any]
    tokenizer_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def open_source(path_or_checkpoint) -> Source:
    """A Source from a path (quantized formats first, then full-precision layouts) or an opened checkpoint."""
    from quantkit.formats.base import QuantizedCheckpoint, detect_format
    from quantkit.model.checkpoint import Checkpoint, open_checkpoint

    obj = path_or_checkpoint
    if isinstance(obj, QuantizedCheckpoint):
        return Source(Path(obj.path), obj.format, obj.config, list(obj.names), obj.get, obj.tokenizer_path,
                      obj.metadata)
    if isinstance(obj, Checkpoint):
        return Source(obj.path, "float", obj.config, obj.tensor_names(), obj.get_tensor, obj.tokenizer_path)
    path = Path(obj)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    try:
        fmt = detect_format(path)
    except FormatError as detect_error:
        if path.is_dir() and ((path / "config.json").exists() or (path / "params.json").exists()):
            return open_source(open_checkpoint(path))
        raise detect_error
    return open_source(fmt.read(path))


def resolve_device(device: str | torch.device, backend: str) -> tuple[torch.device, str]:
    """Check the device/backend pair is usable here; backend 'auto' = triton on CUDA, torch otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device} requested but no CUDA GPU is available (use --device cpu)")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise DeviceError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    if backend == "triton":
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        try:
            import triton  # noqa: F401
        except Exception as e:
            raise DeviceError(f"backend triton needs the triton package ({e})") from None
        if device.type != "cuda" and not interpret:
            raise DeviceError("backend triton needs a CUDA GPU (--device cuda); on CPU use --backend torch "
                              "(or set TRITON_INTERPRET=1 to run the kernels in the slow interpreter)")
    return device, backend


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _float(t, name: str, dtype, device) -> torch.Tensor:
    if isinstance(t, QuantTensor):
        return t.dequantize(dtype).to(device)
    if isinstance(t, GGMLTensor):
        if is_block_type(t.type_name):
            return t.dequantize(dtype).to(device)
        return torch.as_tensor(t.data).reshape(t.shape).to(device=device, dtype=dtype)
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"tensor {name!r}: unsupported stored type {type(t).__name__}")
    return t.to(device=device, dtype=dtype)


def load_model(path_or_checkpoint, device: str | torch.device = "cpu", backend: str = "auto",
               dtype: torch.dtype | str | None = None, cache_dequant: bool = False, fuse: bool = True,
               cpu_kernels: bool = False,
               progress: Callable[[Iterable], Iterable] | None = None) -> Transformer:
    """A Transformer whose linears run on the compressed weights. dtype: activations/norms/float weights
    (default float32 on CPU, bfloat16 on CUDA). `fuse`: q|k|v and gate|up become one matmul each (the model's
    `qkv` / `gate_up` slots; zero-copy, the separate modules are views). `model.runtime_info` describes what was
    loaded."""
    source = path_or_checkpoint if isinstance(path_or_checkpoint, Source) else open_source(path_or_checkpoint)
    device, backend = resolve_device(device, backend)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = source.config
    with torch.device("meta"):
        model = Transformer(cfg)
    names = set(source.names)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    counts: dict[str, int] = {}
    weight_bytes = 0
    state: dict[str, torch.Tensor] = {}
    items = [n for n in model.state_dict().keys()]
    for pname in (progress(items) if progress else items):
        stored_name = pname
        if pname not in names and pname == "lm_head.weight" and cfg.tie_word_embeddings:
            stored_name = "model.embed_tokens.weight"
        if stored_name not in names:
            raise FormatError(f"{source.path}: tensor {stored_name!r} is missing")
        t = source.get(stored_name)
        module_name = pname.rsplit(".", 1)[0]
        if module_name in linears and isinstance(t, QuantTensor):
            mod = QuantLinear.from_quant_tensor(t, backend, device, cache_dequant, cpu_kernels)
            _set_module(model, module_name, mod)
            kind = f"int{t.bits}"
        elif module_name in linears and isinstance(t, GGMLTensor) and is_block_type(t.type_name):
            mod = GGMLLinear.from_ggml_tensor(t, backend, device, cache_dequant, cpu_kernels)
            _set_module(model, module_name, mod)
            kind = t.type_name
        elif module_name == "model.embed_tokens" and isinstance(t, GGMLTensor) and is_block_type(t.type_name):
            mod = GGMLEmbedding.from_ggml_tensor(t, device, dtype)
            _set_module(model, module_name, mod)
            kind = t.type_name
        else:
            state[pname] = _float(t, stored_name, dtype, device)
            kind = str(dtype if not isinstance(t, torch.Tensor) else t.dtype).replace("torch.", "")
            weight_bytes += state[pname].numel() * state[pname].element_size()
            counts[kind] = counts.get(kind, 0) + 1
            continue
        weight_bytes += mod.weight_nbytes() if hasattr(mod, "weight_nbytes") else mod.data.numel()
        counts[kind] = counts.get(kind, 0) + 1
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise FormatError(f"{source.path}: no data for {left[0]!r}")
    model.eval()
    fused = fuse_projections(model) if fuse else 0
    model.runtime_info = {"fused_groups": fused, "path": str(source.path), "format": source.format,
                          "device": str(device),
                          "backend": backend, "dtype": str(dtype).replace("torch.", ""), "weight_types": counts,
                          "weight_bytes": weight_bytes, "cache_dequant": cache_dequant, "cpu_kernels": cpu_kernels,
                          "tokenizer_path": str(source.tokenizer_path) if source.tokenizer_path else None,
                          "chat_template": source.metadata.get("chat_template")}
    return model


def model_dtype(model: Transformer) -> torch.dtype:
    return model.model.norm.weight.dtype


def model_device(model: Transformer) -> torch.device:
    return model.model.norm.weight.device


# ---- fused projections (q|k|v and gate|up share one weight; the separate modules become views of it) ----

def _fuse_group(parts: list[nn.Module]) -> nn.Module | None:
    """One module computing all `parts` at once, with `parts` rebuilt as zero-copy views of its storage."""
    if all(isinstance(m, QuantLinear) for m in parts):
        first = parts[0]
        same = all(m.bits == first.bits and m.group_size == first.group_size and m.in_features == first.in_features
                   and (m.zeros is None) == (first.zeros is None) and m.perm is None and m.g_idx is None
                   and m.scales.dtype == first.scales.dtype and m.backend == first.backend for m in parts)
        if not same or first.cache_dequant:
            return None
        cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(m, name) for m in parts], 1)  # noqa: E731
        from quantkit.kernels.pack import PackedInt

        n_total = sum(m.out_features for m in parts)
        fused = QuantLinear(PackedInt(cat("qweight"), cat("scales"), cat("zeros"), first.bits, first.container_bits,
                                      first.group_size, first.in_features, n_total), first.backend,
                            cpu_kernels=first.cpu_kernels)
        start = 0
        for m in parts:
            end = start + m.out_features
            m.qweight = fused.qweight[:, start:end]
            m.scales = fused.scales[:, start:end]
            if fused.zeros is not None:
                m.zeros = fused.zeros[:, start:end]
            start = end
        return fused
    if all(isinstance(m, GGMLLinear) for m in parts):
        first = parts[0]
        if any(m.type_name != first.type_name or m.in_features != first.in_features or m.backend != first.backend
               or m.cache_dequant for m in parts):
            return None
        datas = [m.data for m in parts]
        data = adjacent_rows(datas)  # neighbours in the file's mapping: a view, no copy
        if data is None:
            if shares_storage(datas):  # views into a file mapping that are not neighbours: a copy would duplicate
                return None  # weights already in memory, so they stay three (two) matmuls
            data = torch.cat(datas, 0)
        fused = GGMLLinear(first.type_name, data, (data.shape[0], first.in_features), first.backend,
                           cpu_kernels=first.cpu_kernels)
        start = 0
        for m in parts:
            m.data = data[start:start + m.out_features]
            start += m.out_features
        return fused
    if all(type(m) is nn.Linear and m.bias is None for m in parts):
        weight = torch.cat([m.weight.data for m in parts], 0)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        start = 0
        for m in parts:
            m.weight = nn.Parameter(weight[start:start + m.out_features], requires_grad=False)
            start += m.out_features
        return fused
    return None


def fuse_projections(model: Transformer) -> int:
    """Fill each layer's `self_attn.qkv` and `mlp.gate_up` slots where the parts are compatible (the separate
    modules stay, as views of the fused storage). The model's forward then runs one matmul per group."""
    count = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fused = _fuse_group([attn.q_proj, attn.k_proj, attn.v_proj])
        if fused is not None:
            attn.qkv = fused
            count += 1
        fused = _fuse_group([mlp.gate_proj, mlp.up_proj])
        if fused is not None:
            mlp.gate_up = fused
            count += 1
    return count


# ---- non-finite weights (why a model computes NaN/Inf) ----

def nonfinite_weights(model: nn.Module) -> list[str]:
    """'name (first at index [i, j])' of every weight of a loaded model that holds NaN or Inf: float parameters as
    stored, the scales of integer-quantized linears, ggml block types dequantized a chunk of rows at a time. Fused
    q|k|v and gate|up slots are skipped (their parts are listed under their own names); KV caches are not weights.
    Meant for explaining a non-finite result, not for the hot path (it reads every weight once)."""
    from quantkit.kernels.ggml_ref import dequantize_rows

    found: list[str] = []
    for mname, mod in model.named_modules():
        if mname.rpartition(".")[2] in ("qkv", "gate_up"):
            continue
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, (GGMLLinear, GGMLEmbedding)):
            cols = mod.in_features if isinstance(mod, GGMLLinear) else mod.embedding_dim
            rows, step = mod.data.shape[0], max(1, (1 << 20) // max(cols, 1))
            for r0 in range(0, rows, step):
                bad = first_nonfinite(dequantize_rows(mod.data[r0:r0 + step], mod.type_name))
                if bad is not None:
                    found.append(f"{prefix}weight ({mod.type_name}; first at index {[bad[0] + r0, *bad[1:]]})")
                    break
            continue
        if isinstance(mod, QuantLinear):
            bad = first_nonfinite(mod.scales)
            if bad is not None:
                found.append(f"{prefix}weight (its scales; first at index {bad})")
            continue
        for pname, p in mod.named_parameters(recurse=False):
            bad = first_nonfinite(p.detach())
            if bad is not None:
                found.append(f"{prefix}{pname} (first at index {bad})")
    return found


def explain_nonfinite(model: nn.Module, limit: int = 3) -> str:
    """The end of a NaN/Inf error message: which weights hold NaN or Inf, or that every weight is finite (then the
    activations overflowed in the model's dtype)."""
    bad = nonfinite_weights(model)
    if bad:
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        return f"; weights holding NaN or Inf: {', '.join(bad[:limit])}{more}"
    dtype = str(model_dtype(model)).replace("torch.", "") if hasattr(model, "model") else "its dtype"
    return (f"; every weight is finite, so the activations overflowed in {dtype}"
            + (" (try --dtype float32)" if dtype in ("float16", "bfloat16") else ""))
