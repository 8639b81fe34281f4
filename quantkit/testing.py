"""Helpers for tests and benchmarks: where the small model, shared data and llama.cpp tools are.

(The fixture factory for random checkpoints lives here too.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NANO_PATH = REPO_ROOT / "models" / "mistral-nano"
SHARED_DATA = Path(os.environ.get("QUANTKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
LLAMACPP_DIR = Path(os.environ.get("QUANTKIT_LLAMACPP_DIR", Path.home() / ".cache" / "quantkit" / "llama.cpp"))


def llamacpp_bin(name: str) -> Path | None:
    """Path of a llama.cpp tool (e.g. 'llama-quantize') built by scripts/build_llamacpp.sh, or None."""
    path = LLAMACPP_DIR / "build" / "bin" / name
    if path.exists():
        return path
    found = shutil.which(name)
    return Path(found) if found else None


def llamacpp_convert_script() -> Path | None:
    path = LLAMACPP_DIR / "convert_hf_to_gguf.py"
    return path if path.exists() else None


def shared_data(*parts: str) -> Path | None:
    path = SHARED_DATA.joinpath(*parts)
    return path if path.exists() else None


# ---- fixture factory: deterministic random Mistral checkpoints ----

CHECKPOINT_LAYOUTS = ("hf-sharded", "hf-single", "consolidated")


def reference_tokenizer_model() -> Path | None:
    """The real Mistral v1 sentencepiece model: models/mistral-nano's copy, else the one mistral_common ships."""
    if (NANO_PATH / "tokenizer.model").exists():
        return NANO_PATH / "tokenizer.model"
    try:
        import mistral_common
    except ImportError:
        return None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    return path if path.exists() else None


def random_state_dict(config, seed: int = 0, dtype=None) -> dict:
    """Canonical name -> random tensor (HF row order) for `config`, identical for the same seed and config.

    Linears are N(0, 1/in_features), embeddings N(0, 1), norms 1 + N(0, 0.1): logits stay in a sane range.
    """
    import torch

    dtype = dtype or torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in config.expected_shapes().items():
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        out[name] = t.to(dtype)
    return out


def make_random_checkpoint(
    directory,
    layout: str = "hf-sharded",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 32000,
    dtype=None,
    seed: int = 0,
    sliding_window: int | None = None,
    shards: int = 2,
    rope_theta: float = 1e6,
    architecture: str = "MistralForCausalLM",
    tokenizer: bool = True,
) -> Path:
    """Write a deterministic random checkpoint into `directory` (created) and return its path.

    layout: "hf-sharded" (model-0000N-of-0000M.safetensors + index + config.json), "hf-single"
    (model.safetensors + config.json) or "consolidated" (consolidated.safetensors + params.json, mistral-inference
    names and interleaved Q/K rows). The same arguments give the same tensors in every layout. With `tokenizer`,
    the real Mistral v1 tokenizer.model is copied in (vocab must then be 32000 to use it meaningfully).
    """
    import json

    import torch
    from safetensors.torch import save_file

    from quantkit.model import arch
    from quantkit.model.config import ModelConfig

    if layout not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"layout must be one of {CHECKPOINT_LAYOUTS}, got {layout!r}")
    dtype = dtype or torch.bfloat16
    dtype_name = str(dtype).replace("torch.", "")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(
        architecture=architecture, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        rope_theta=rope_theta, sliding_window=sliding_window, torch_dtype=dtype_name,
    )
    state = random_state_dict(config, seed=seed, dtype=dtype)
    meta = {"format": "pt"}
    if layout == "consolidated":
        cons = {}
        for name, t in state.items():
            if config.rope_heads(name):
                t = arch.hf_to_interleaved(t, config.rope_heads(name))
            cons[arch.to_consolidated(name)] = t.contiguous()
        save_file(cons, str(directory / "consolidated.safetensors"), metadata=meta)
        (directory / "params.json").write_text(json.dumps(config.to_params_dict(), indent=2) + "\n")
    else:
        (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        (directory / "generation_config.json").write_text(
            json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
        names = list(state)
        if layout == "hf-single" or shards <= 1:
            save_file(state, str(directory / "model.safetensors"), metadata=meta)
        else:
            shards = min(shards, len(names))
            bounds = [round(i * len(names) / shards) for i in range(shards + 1)]
            weight_map = {}
            for i in range(shards):
                fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                part = {n: state[n] for n in names[bounds[i]:bounds[i + 1]]}
                save_file(part, str(directory / fname), metadata=meta)
                weight_map.update({n: fname for n in part})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer:
        source = reference_tokenizer_model()
        if source is not None:
            shutil.copyfile(source, directory / "tokenizer.model")
            if layout != "consolidated" and (NANO_PATH / "tokenizer_config.json").exists():
                shutil.copyfile(NANO_PATH / "tokenizer_config.json", directory / "tokenizer_config.json")
    return directory


def make_sparse_checkpoint(directory, hidden: int = 4096, intermediate: int = 14336, layers: int = 4,
                           heads: int = 32, kv_heads: int = 8, vocab: int = 32000) -> Path:
    """A valid-looking multi-GB BF16 `model.safetensors` + config.json whose data section is a sparse hole.

    Costs no disk blocks and no time to create; every tensor reads as zeros. For memory tests of lazy access
    (the defaults give a Mistral-7B-shaped model with 4 layers: about 2.3 GB).
    """
    import json
    import struct

    from quantkit.model.config import ModelConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in config.expected_shapes().items():
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = directory / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    source = reference_tokenizer_model()
    if source is not None:
        shutil.copyfile(source, directory / "tokenizer.model")
    return directory
