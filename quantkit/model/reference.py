"""The reference forward pass of Mistral/Llama in plain PyTorch.

Module names equal the canonical (HF) tensor names, so `state_dict()` keys are checkpoint names and a
Checkpoint loads into it with `load_state_dict(assign=True)` without a second copy. Every `nn.Linear` may be
swapped for a quantized linear (the runtime does this); the rest of the forward does not change.
It is the oracle that quantizers, readers and kernels are checked against, and its own test is equality with
transformers' `MistralForCausalLM` logits.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for rotate-half RoPE at the given positions, computed in fp32 as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [q, k] mask, True where query at q_pos may attend to key at k_pos (causal, optional window)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return allowed


class KVCache:
    """Pre-allocated key/value cache for one decoder layer: [batch, n_kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        groups = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """`Transformer(cfg)(tokens)` -> logits [batch, seq, vocab]. Layers can also be run one at a time."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.caches: list[KVCache] | None = None

    # ---- construction ----

    @classmethod
    def from_checkpoint(cls, checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        progress: Callable[[Iterable], Iterable] | None = None) -> "Transformer":
        """Build on the meta device and assign each tensor straight from the (lazy) checkpoint."""
        cfg = checkpoint.config
        with torch.device("meta"):
            model = cls(cfg)
        names = list(model.state_dict().keys())
        state = {}
        for name in (progress(names) if progress else names):
            source = "model.embed_tokens.weight" if (name == "lm_head.weight" and cfg.tie_word_embeddings) else name
            state[name] = checkpoint.get_tensor(source).to(device=device, dtype=dtype)
        model.load_state_dict(state, assign=True, strict=True)
        return model.eval()

    def setup_caches(self, batch: int, max_len: int) -> None:
        cfg = self.config
        head_weight = getattr(self.lm_head, "weight", None)  # a quantized head (runtime) has no float weight
        ref = head_weight if head_weight is not None else self.model.norm.weight
        dtype, device = ref.dtype, ref.device
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = self.model.norm.weight.dtype
        self.caches = [KVCache(batch, max_len, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
                       for _ in range(cfg.num_hidden_layers)]

    def reset_caches(self) -> None:
        self.caches = None

    # ---- pieces (used by the layer-wise pipeline) ----

    def rope_and_mask(self, seq_len: int, start_pos: int = 0, device=None, dtype=torch.float32):
        cfg = self.config
        device = device or self.model.norm.weight.device
        q_pos = torch.arange(start_pos, start_pos + seq_len, device=device)
        k_pos = torch.arange(0, start_pos + seq_len, device=device)
        cos, sin = rope_cos_sin(q_pos, cfg.head_dim, cfg.rope_theta, dtype)
        mask = attention_mask(q_pos, k_pos, cfg.sliding_window)
        return cos, sin, mask

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h))

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        h = self.embed(tokens)
        cos, sin, mask = self.rope_and_mask(tokens.shape[1], start_pos, tokens.device, h.dtype)
        if self.caches is None and start_pos:
            raise ValueError("start_pos > 0 needs KV caches (call setup_caches first)")
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, self.caches[i] if self.caches is not None else None)
        return self.head(h)
