"""The Mistral/Llama decoder in plain PyTorch — the one implementation of the layer.

Everything that runs the model runs this: the reference forward (`Transformer(cfg)(tokens)`, the oracle that
quantizers, readers and kernels are checked against; its own test is equality with transformers'
`MistralForCausalLM` logits), the runtime generator (runtime/generate.py: prefill, decode step, CUDA graph,
torch.compile), the layer-wise GPTQ/AWQ pipeline (pipeline/layerwise.py, quant/awq.py: one `DecoderLayer` at a
time, through its sub-steps).

Module names equal the canonical (HF) tensor names, so `state_dict()` keys are checkpoint names and a
Checkpoint loads into it with `load_state_dict(assign=True)` without a second copy. Every `nn.Linear` may be
swapped for a quantized linear (the runtime does this). Two optional declared slots are filled by the runtime
loader (runtime/model.py `fuse_projections`): `Attention.qkv` (q|k|v in one matmul) and `MLP.gate_up`, whose
storage the separate q/k/v (gate/up) modules are zero-copy views of; when set, the forward uses them.

A forward takes token positions (a tensor) and a boolean mask [T, K] (query t may attend key k; K = how many key
positions are read). With KV caches set up (`Transformer.setup_caches`) each layer writes its keys/values at the
positions (`index_copy_`, static shapes: one decode step serves every position, as a CUDA graph or a compiled
step needs) and attends over the first K cache positions; without caches it attends over the sequence itself.
`Transformer.hidden_states(..., fused_kernels=True)` swaps in the Triton kernels of the GPU path (kernels/:
RMSNorm with the residual add folded in, RoPE + cache write, one-kernel decode attention, SwiGLU); same math up
to rounding order. The plain-torch RoPE lives beside its kernel (kernels/rope.py); kernels never import the model.
"""

from __future__ import annotations

import weakref

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels.rope import apply_rope, rope_cos_sin
from quantkit.model.config import ModelConfig

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin rows [T, head_dim] of the positions of a forward


def causal_mask(positions: torch.Tensor, k_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """Bool [T, k_len], True where the query at positions[t] may attend the key at position k (causal, within the
    sliding window when there is one)."""
    k_pos = torch.arange(k_len, device=positions.device)
    allowed = k_pos[None, :] <= positions[:, None]
    if sliding_window is not None:
        allowed &= k_pos[None, :] > positions[:, None] - sliding_window
    return allowed


def sequence_inputs(cfg: ModelConfig, seq_len: int, device=None, dtype: torch.dtype = torch.float32):
    """(positions, rope, mask) for running decoder layers over whole sequences of `seq_len` tokens from position 0
    without a cache — what `DecoderLayer.forward` takes besides the hidden states."""
    positions = torch.arange(seq_len, device=device)
    rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)
    return positions, rope, causal_mask(positions, seq_len, cfg.sliding_window)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            from quantkit.kernels.norm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add(self, h: torch.Tensor, delta: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual update and this norm of it: (h + delta, norm(h + delta)) — one kernel when fused."""
        if fused:
            from quantkit.kernels.norm import add_rmsnorm

            return add_rmsnorm(h, delta, self.weight, self.eps)
        h = h + delta
        return h, self(h)


class KVCache(nn.Module):
    """Static key/value cache of one attention layer: buffers k, v [batch, n_kv_heads, max_len, head_dim] (not
    in the state dict), written at a positions tensor with `index_copy_`."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [batch, n_kv_heads, T, head_dim] at `positions` [T]; returns the whole key/value buffers."""
        k_cache, v_cache = self.k, self.v
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        return k_cache, v_cache


def _attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence, grouped-query attention in plain matmuls (cheaper than SDPA's setup at decode sizes,
    and CUDA-graph safe on every backend). q [b, heads, 1, d], keys/values [b, kv_heads, L, d], mask [1, L]."""
    b, heads, _, d = q.shape
    kv_heads = keys.shape[1]
    qg = q.reshape(b, kv_heads, heads // kv_heads, d)
    scores = (qg.float() @ keys.float().transpose(-1, -2)) * (d ** -0.5)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(values.dtype)
    return (probs @ values).reshape(b, heads, 1, d)


_CAUSAL_SEEN: dict[int, tuple[weakref.ref, int, bool]] = {}  # id(mask) -> (the mask, its version, causal?)


def _is_causal(mask: torch.Tensor, t: int) -> bool:
    """Whether `mask` is the plain causal mask of t queries over the same t keys (no window, no cache prefix).
    The answer is remembered per mask tensor (until it is modified in place): calibration runs the same mask
    through thousands of forwards, and each comparison builds a t×t reference."""
    if not (mask.dtype == torch.bool and mask.dim() == 2 and tuple(mask.shape) == (t, t)):
        return False
    # an inference tensor has no version counter to notice in-place changes: it is compared every time
    remember = not mask.is_inference()
    seen = _CAUSAL_SEEN.get(id(mask)) if remember else None
    if seen is not None and seen[0]() is mask and seen[1] == mask._version:
        return seen[2]
    causal = torch.equal(mask, torch.ones(t, t, dtype=torch.bool, device=mask.device).tril())
    if remember:
        if len(_CAUSAL_SEEN) > 64:
            _CAUSAL_SEEN.clear()
        _CAUSAL_SEEN[id(mask)] = (weakref.ref(mask), mask._version, causal)
    return causal


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.sliding_window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.qkv: nn.Module | None = None  # q|k|v in one module (fuse_projections); q/k/v_proj are views of it
        self.kv_cache: KVCache | None = None  # set by Transformer.setup_caches / use_caches

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, t, q_size], k, v [b, t, kv_size]."""
        qkv = self.qkv
        if qkv is not None:
            return qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def core(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope, mask: torch.Tensor,
             fused: bool = False) -> torch.Tensor:
        """Attention up to the output projection: x [b, t, hidden] (normed) -> [b, t, q_size], the input of o_proj.
        Keys/values go through the cache when one is set (written at `positions`, the first mask.shape[-1] read)."""
        b, t, _ = x.shape
        cos, sin = rope
        cache = self.kv_cache
        if fused and cache is not None and self.qkv is not None:
            from quantkit.kernels.rope import rope_qkv_into_cache

            q = rope_qkv_into_cache(self.qkv(x), cos, sin, positions, self.n_heads, self.n_kv_heads, cache.k, cache.v)
            keys, values = cache.k, cache.v
        else:
            q, k, v = self.project_qkv(x)
            q = q.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.reshape(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = v.reshape(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys, values = (k, v) if cache is None else cache.update(positions, k, v)
        if cache is not None:
            keys, values = keys[:, :, :mask.shape[-1]], values[:, :, :mask.shape[-1]]
        if t == 1:
            d = self.head_dim
            if fused and cache is not None and q.is_contiguous() and d & (d - 1) == 0:
                from quantkit.kernels.attention import decode_attention

                out = decode_attention(q, cache.k, cache.v, positions, self.sliding_window)
            else:
                out = _attend_one(q, keys, values, mask)
        else:
            # the shared key/value heads are read in place (enable_gqa), and a plain causal mask lets SDPA skip the
            # masked blocks (is_causal): the same result as repeated heads under the explicit mask, bitwise on CPU
            gqa = self.n_heads != self.n_kv_heads
            if _is_causal(mask, t):
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope, mask: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.core(x, positions, rope, mask))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: nn.Module | None = None  # gate|up in one module (fuse_projections); gate/up_proj are views

    def hidden(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """silu(gate(x)) * up(x): the input of down_proj."""
        gate_up = self.gate_up
        if gate_up is None:
            return F.silu(self.gate_proj(x)) * self.up_proj(x)
        gate_up = gate_up(x)
        if fused:
            from quantkit.kernels.activation import silu_mul

            return silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))


class DecoderLayer(nn.Module):
    """`layer(x, positions, rope, mask)` = the sub-steps below in order (the pipeline runs them one at a time):

        n = attention_input(x);  h = attention_output(x, attention_core(n, positions, rope, mask))
        m = mlp_input(h);        out = mlp_output(h, mlp_hidden(m))
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input of q/k/v_proj."""
        return self.input_layernorm(x)

    def attention_core(self, n: torch.Tensor, positions: torch.Tensor, rope: Rope, mask: torch.Tensor,
                       fused: bool = False) -> torch.Tensor:
        """The input of o_proj."""
        return self.self_attn.core(n, positions, rope, mask, fused)

    def attention_output(self, x: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention."""
        return x + self.self_attn.o_proj(core)

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        """The input of gate/up_proj."""
        return self.post_attention_layernorm(h)

    def mlp_hidden(self, m: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """The input of down_proj."""
        return self.mlp.hidden(m, fused)

    def mlp_output(self, h: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output."""
        return h + self.mlp.down_proj(hidden)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope, mask: torch.Tensor) -> torch.Tensor:
        h = self.attention_output(x, self.attention_core(self.attention_input(x), positions, rope, mask))
        return self.mlp_output(h, self.mlp_hidden(self.mlp_input(h)))


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
        self.kv_caches: list[KVCache] | None = None  # attached to the layers' attention (use_caches)
        self.rope_tables: Rope | None = None  # cos/sin of positions 0..n-1 (n >= every set-up cache's max_len)

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

    # ---- KV caches ----

    def setup_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """Allocate a KVCache per layer (zeros, the dtype/device of the model's norms) for `batch` sequences of up
        to `max_len` positions, and attach them. Returns them, for `use_caches` (a Generator attaches its own caches
        while it runs, so several may share one model)."""
        cfg, ref = self.config, self.model.norm.weight
        caches = [KVCache(batch, max_len, cfg.num_key_value_heads, cfg.head_dim, ref.dtype, ref.device)
                  for _ in range(cfg.num_hidden_layers)]
        self.use_caches(caches)
        return caches

    def use_caches(self, caches: list[KVCache] | None) -> None:
        """Attach `caches` (one per layer; None: run without caches), with RoPE tables covering them."""
        self.kv_caches = caches
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.kv_cache = None if caches is None else caches[i]
        if caches is None:
            return
        k, cos = caches[0].k, None if self.rope_tables is None else self.rope_tables[0]
        if cos is None or cos.shape[0] < k.shape[2] or cos.dtype != k.dtype or cos.device != k.device:
            cfg = self.config
            self.rope_tables = rope_cos_sin(torch.arange(k.shape[2], device=k.device), cfg.head_dim, cfg.rope_theta,
                                            k.dtype)

    def reset_caches(self) -> None:
        self.use_caches(None)
        self.rope_tables = None

    # ---- forward pieces ----

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """cos/sin rows [T, head_dim] of `positions`: gathered from the tables made with the caches, else computed."""
        tables = self.rope_tables
        if (self.kv_caches is not None and tables is not None and tables[0].dtype == dtype
                and tables[0].device == positions.device):
            return tables[0].index_select(0, positions), tables[1].index_select(0, positions)
        cfg = self.config
        return rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)

    def mask(self, positions: torch.Tensor, k_len: int) -> torch.Tensor:
        return causal_mask(positions, k_len, self.config.sliding_window)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the residual stream h (after the last layer): final norm, lm_head."""
        return self.lm_head(self.model.norm(h))

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, k_len: int,
                      fused_kernels: bool = False) -> torch.Tensor:
        """tokens [B, T] at `positions` [T] -> the final norm's output [B, T, hidden] (the input of lm_head).
        Attention reads k_len key positions (with caches: the first k_len cache entries; the whole cache keeps
        the shapes static). `fused_kernels`: the Triton kernels of the GPU path (residual adds folded into the
        norms, RoPE + cache write, decode attention, SwiGLU)."""
        h = self.embed(tokens)
        rope = self.rope(positions, h.dtype)
        mask = self.mask(positions, k_len)
        if fused_kernels and tokens.shape[1] == 1:
            # the kernels read the position from memory: a fresh (aligned) copy, so that they are not specialised
            # twice for the two pointer alignments of successive slices of a positions range
            positions = positions.clone()
        layers = self.model.layers
        # the residual stream h and the normed input x of the next step: same arithmetic as layer by layer
        x = layers[0].input_layernorm(h, fused_kernels)
        for i, layer in enumerate(layers):
            core = layer.attention_core(x, positions, rope, mask, fused_kernels)
            h, x = layer.post_attention_layernorm.add(h, layer.self_attn.o_proj(core), fused_kernels)
            down = layer.mlp.down_proj(layer.mlp_hidden(x, fused_kernels))
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h, x = norm.add(h, down, fused_kernels)
        return x

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tokens [B, T] at positions start_pos.. -> logits [B, T, vocab]. With caches attached (setup_caches /
        use_caches) their entries start_pos.. are written and attention reads entries 0..; start_pos > 0 needs them."""
        end = start_pos + tokens.shape[1]
        if self.kv_caches is None and start_pos:
            raise ValueError("start_pos > 0 needs KV caches (call setup_caches first)")
        if self.kv_caches is not None and end > self.kv_caches[0].max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.kv_caches[0].max_len}")
        positions = torch.arange(start_pos, end, device=tokens.device)
        return self.lm_head(self.hidden_states(tokens, positions, end))
