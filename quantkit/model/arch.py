"""Architecture registry: each supported family as data, keyed by the HF `architectures[0]` string.

quantkit's canonical tensor names are the Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`).
Other layouts (mistral-inference "consolidated", GGUF) are name tables over the same tensors; the Q/K row
permutation between HF (rotate-half RoPE) and the interleaved layouts lives here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import ConfigError

# Per-layer tensors: canonical suffix (after `model.layers.{i}.`) -> (consolidated suffix, GGUF suffix).
LAYER_TENSORS: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": ("attention_norm.weight", "attn_norm.weight"),
    "self_attn.q_proj.weight": ("attention.wq.weight", "attn_q.weight"),
    "self_attn.k_proj.weight": ("attention.wk.weight", "attn_k.weight"),
    "self_attn.v_proj.weight": ("attention.wv.weight", "attn_v.weight"),
    "self_attn.o_proj.weight": ("attention.wo.weight", "attn_output.weight"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", "ffn_norm.weight"),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", "ffn_gate.weight"),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", "ffn_up.weight"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", "ffn_down.weight"),
}

EMBEDDING = "model.embed_tokens.weight"

# Whole-model tensors: canonical -> (consolidated, GGUF).
GLOBAL_TENSORS: dict[str, tuple[str, str]] = {
    EMBEDDING: ("tok_embeddings.weight", "token_embd.weight"),
    "model.norm.weight": ("norm.weight", "output_norm.weight"),
    "lm_head.weight": ("output.weight", "output.weight"),
}

# The linears of a decoder layer in true-sequential order, grouped by the input they share.
# Members of one group are fused by serving engines (qkv, gate_up) and must share one scheme.
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LAYER_LINEARS: tuple[str, ...] = tuple(name for group in LINEAR_GROUPS for name in group)


@dataclass(frozen=True)
class Architecture:
    """What differs between supported families (little: Mistral and Llama share the layout)."""

    name: str  # HF architectures[0]
    model_type: str  # HF config model_type
    gguf_arch: str  # general.architecture in GGUF
    supports_sliding_window: bool


ARCHITECTURES: dict[str, Architecture] = {
    "MistralForCausalLM": Architecture("MistralForCausalLM", "mistral", "llama", True),
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", "llama", "llama", False),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"unsupported architecture {name!r}; supported: {supported}") from None


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def canonical_names(num_layers: int) -> list[str]:
    """Every tensor name of a model, in file order (embeddings, layers, norm, head)."""
    names = ["model.embed_tokens.weight"]
    for i in range(num_layers):
        names += [layer_prefix(i) + suffix for suffix in LAYER_TENSORS]
    return names + ["model.norm.weight", "lm_head.weight"]


def _translate(name: str, column: int) -> str:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name][column]
    if name.startswith("model.layers."):
        index, suffix = name[len("model.layers.") :].split(".", 1)
        if suffix in LAYER_TENSORS:
            prefix = "layers." if column == 0 else "blk."
            return f"{prefix}{index}.{LAYER_TENSORS[suffix][column]}"
    raise KeyError(name)


def to_consolidated(name: str) -> str:
    return _translate(name, 0)


def to_gguf(name: str) -> str:
    return _translate(name, 1)


_FROM_CONSOLIDATED_LAYER = {v[0]: k for k, v in LAYER_TENSORS.items()}
_FROM_GGUF_LAYER = {v[1]: k for k, v in LAYER_TENSORS.items()}
_FROM_CONSOLIDATED_GLOBAL = {v[0]: k for k, v in GLOBAL_TENSORS.items()}
_FROM_GGUF_GLOBAL = {v[1]: k for k, v in GLOBAL_TENSORS.items()}


def _untranslate(name: str, prefix: str, layer_table: dict, global_table: dict) -> str:
    if name in global_table:
        return global_table[name]
    if name.startswith(prefix):
        index, suffix = name[len(prefix) :].split(".", 1)
        if suffix in layer_table:
            return f"model.layers.{index}.{layer_table[suffix]}"
    raise KeyError(name)


def from_consolidated(name: str) -> str:
    return _untranslate(name, "layers.", _FROM_CONSOLIDATED_LAYER, _FROM_CONSOLIDATED_GLOBAL)


def from_gguf(name: str) -> str:
    return _untranslate(name, "blk.", _FROM_GGUF_LAYER, _FROM_GGUF_GLOBAL)


def is_quantizable_linear(name: str) -> bool:
    """The decoder-layer linears that weight-only schemes quantize (not embeddings, norms or lm_head)."""
    return name.startswith("model.layers.") and any(name.endswith(f".{lin}.weight") for lin in LAYER_LINEARS)


# ---- Q/K row permutation between HF (rotate-half) and interleaved (mistral-inference, GGUF) RoPE ----

def interleaved_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Consolidated/GGUF Q or K rows -> HF rows (transformers' `permute_for_rope`). Rows only; works on any 2-D."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF Q or K rows -> GGUF/consolidated rows (llama.cpp's `LlamaModel.permute`); inverse of the above."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
