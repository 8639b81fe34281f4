"""Prefill + decode with a static KV cache, sampling, EOS stop, streaming, tokens/s.

`Generator(model, max_len)` owns per-layer key/value caches [batch, kv_heads, max_len, head_dim] and RoPE tables
for every position, and runs the reference model's modules (norms, projections, MLP) with its own attention so
that one decode step has static shapes: the cache is written with `index_copy_` at a position tensor and
attention reads the whole cache under a mask. On CUDA that step is captured once as a CUDA graph (the Python
overhead of ~40 small ops per layer would otherwise dominate decode), on CPU it runs eagerly unless
`compile=True`: then the step is compiled once with torch.compile (inductor fuses the norms, RoPE, cache writes
and attention into a few C++ loops; the low-bit matmuls stay extern calls), which costs ~10-60 s at the second
decode step and makes each later step several times cheaper on small models. Only the decode step is compiled;
its shapes are static, so it compiles once, and its guards are not re-evaluated on every call
(`skip_guard_eval_unsafe`, scoped to this call: the generator always passes the same two input buffers).
The cache remembers which tokens it holds, so a chat turn only prefills the new suffix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from quantkit.errors import GenerationError
from quantkit.model.reference import Transformer, apply_rope, rope_cos_sin
from quantkit.runtime.model import model_device, model_dtype


# inductor options for the compiled CPU decode step: a C++ wrapper instead of the Python one that calls the
# kernels (~10% of a nano step), and no per-call size/stride asserts (~5%); shapes are static here
COMPILE_OPTIONS = {"cpp_wrapper": True, "size_asserts": False}


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (greedy, or temperature + top-k + top-p sampling)."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids (without the prompt; includes EOS if it stopped there)
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    stop_reason: str  # "eos" | "length"
    reused_tokens: int = 0  # prompt tokens served from the cache (chat)
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(len(self.tokens) - 1, 0)  # the first token comes out of the prefill
        return n / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_s if self.prefill_s > 0 else float("nan")


class Generator:
    def __init__(self, model: Transformer, max_len: int | None = None, batch: int = 1, cuda_graph: bool | None = None,
                 fused_kernels: bool | None = None, compile: bool = False):
        cfg = model.config
        self.model, self.cfg, self.batch = model, cfg, batch
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.device, self.dtype = model_device(model), model_dtype(model)
        shape = (batch, cfg.num_key_value_heads, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
        positions = torch.arange(self.max_len, device=self.device)
        self.cos, self.sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype)
        self.positions = positions
        self.cached: list[int] = []  # tokens whose keys/values are in the cache (batch 1 bookkeeping)
        self.use_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        # Triton RMSNorm (kernels/norm.py) and RoPE + cache write (kernels/rope.py): default on the GPU
        self.fused_kernels = (self.device.type == "cuda") if fused_kernels is None else fused_kernels
        self._graph = None
        self.compile = bool(compile) and not self.use_graph
        self._compiled, self.compile_error = None, None  # compile_error: why compile=True fell back to eager
        self.compile_s = 0.0  # seconds the first compiled call took (compile or cache load), inside decode time

    # ---- forward pieces ----

    def _mask(self, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
        k_pos = self.positions[:k_len]
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.cfg.sliding_window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - self.cfg.sliding_window
        return allowed

    def _layers(self, h: torch.Tensor, pos: torch.Tensor, cos, sin, mask, k_len: int | None) -> torch.Tensor:
        """pos: positions [T] (tensor). k_len None = static decode (attend over the whole cache). Returns the final
        hidden states after the model's last norm."""
        if self.fused_kernels:
            return self._layers_fused(h, pos, cos, sin, mask, k_len)
        b, t, _ = h.shape
        cfg = self.cfg
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = self._qkv_rope_cache(attn, x, i, pos, cos, sin)
            out = self._attention(q, i, pos, mask, k_len)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, cfg.num_attention_heads * cfg.head_dim))
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h))
        return self.model.model.norm(h)

    def _layers_fused(self, h, pos, cos, sin, mask, k_len):
        """The GPU path: Triton RMSNorm (the residual add folded into each norm after the first), RoPE + cache
        write, one-kernel decode attention and SwiGLU; same math as `_layers` up to rounding order."""
        from quantkit.kernels.activation import silu_mul
        from quantkit.kernels.norm import add_rmsnorm, rmsnorm

        b, t, _ = h.shape
        cfg = self.cfg
        layers = self.model.model.layers
        x = rmsnorm(h, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)
        # decode attention reads the position from memory: a fresh (aligned) copy, so that the kernel is not
        # specialised twice for the two pointer alignments of successive slices of `positions`
        attn_pos = pos[-1:].clone() if t == 1 else pos
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            q = self._qkv_rope_cache(attn, x, i, pos, cos, sin)
            out = self._attention(q, i, attn_pos, mask, k_len)
            o = attn.o_proj(out.transpose(1, 2).reshape(b, t, cfg.num_attention_heads * cfg.head_dim))
            norm = layer.post_attention_layernorm
            h, x = add_rmsnorm(h, o, norm.weight, norm.eps)
            if hasattr(mlp, "gate_up_fused"):
                d = mlp.down_proj(silu_mul(mlp.gate_up_fused(x)))
            else:
                d = mlp(x)
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.model.norm
            h, x = add_rmsnorm(h, d, norm.weight, norm.eps)
        return x

    def _qkv_rope_cache(self, attn, x, i: int, pos, cos, sin) -> torch.Tensor:
        """q [b, heads, t, d] (rotated); the rotated keys and the values are written into layer i's cache."""
        b, t, _ = x.shape
        cfg = self.cfg
        if self.fused_kernels and hasattr(attn, "qkv_fused"):
            from quantkit.kernels.rope import rope_qkv_into_cache

            return rope_qkv_into_cache(attn.qkv_fused(x), self.cos, self.sin, pos, cfg.num_attention_heads,
                                       cfg.num_key_value_heads, self.k[i], self.v[i])
        if hasattr(attn, "qkv_fused"):
            q, k, v = attn.qkv_fused(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.k[i].index_copy_(2, pos, k)
        self.v[i].index_copy_(2, pos, v)
        return q

    def _attention(self, q, i: int, pos, mask, k_len):
        keys = self.k[i] if k_len is None else self.k[i][:, :, :k_len]
        values = self.v[i] if k_len is None else self.v[i][:, :, :k_len]
        if q.shape[2] == 1:
            hd = q.shape[-1]
            if self.fused_kernels and q.is_contiguous() and hd & (hd - 1) == 0:
                from quantkit.kernels.attention import decode_attention

                return decode_attention(q, self.k[i], self.v[i], pos[-1:], self.cfg.sliding_window)
            return self._attend_one(q, keys, values, mask)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def _head(self, x):
        return self.model.lm_head(x)

    @staticmethod
    def _attend_one(q, keys, values, mask):
        """One query per sequence, grouped-query attention in plain matmuls (cheaper than SDPA's setup at decode
        sizes, and CUDA-graph safe on every backend). q [b, heads, 1, d], keys/values [b, kv_heads, L, d]."""
        b, heads, _, d = q.shape
        kv_heads = keys.shape[1]
        qg = q.reshape(b, kv_heads, heads // kv_heads, d)
        scores = (qg.float() @ keys.float().transpose(-1, -2)) * (d ** -0.5)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(values.dtype)
        return (probs @ values).reshape(b, heads, 1, d)

    @staticmethod
    def _mlp(mlp, x):
        if hasattr(mlp, "gate_up_fused"):
            gate, up = mlp.gate_up_fused(x).chunk(2, dim=-1)
            return mlp.down_proj(F.silu(gate) * up)
        return mlp(x)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions start_pos.. -> logits [B, V] of the last position (or [B, T, V])."""
        t = tokens.shape[1]
        end = start_pos + t
        if end > self.max_len:
            raise GenerationError(f"sequence of {end} tokens exceeds the cache/context length {self.max_len}")
        pos = self.positions[start_pos:end]
        h = self.model.embed(tokens.to(self.device))
        h = self._layers(h, pos, self.cos[start_pos:end], self.sin[start_pos:end], self._mask(pos, end), end)
        if not all_logits:
            h = h[:, -1:]
        logits = self._head(h)
        return logits if all_logits else logits[:, -1]

    def _static_step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.model.embed(token)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        h = self._layers(h, pos, cos, sin, self._mask(pos, self.max_len), None)
        return self._head(h)[:, -1]

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """One token per sequence [B] at position pos -> logits [B, V] (CUDA graph when enabled)."""
        if pos >= self.max_len:
            raise GenerationError(f"position {pos} exceeds the cache/context length {self.max_len}")
        if self.compile:
            return self._compiled_step(token, pos)
        if not self.use_graph:
            return self.forward(token.view(-1, 1), pos)
        if self._graph is None:
            self._capture()
        self._tok.copy_(token.view(-1, 1))
        self._pos.fill_(pos)
        self._graph.replay()
        return self._logits

    def _compiled_step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """The static step through torch.compile. The first call runs eagerly (it also builds the linears' lazily
        repacked weights, which must not happen while tracing) and sets the compiled function up."""
        if self._compiled is None:
            self._tok = torch.zeros((self.batch, 1), dtype=torch.long, device=self.device)
            self._pos = torch.zeros((1,), dtype=torch.long, device=self.device)
            self._tok.copy_(token.view(-1, 1))
            self._pos.fill_(pos)
            logits = self._static_step(self._tok, self._pos)
            self._compiled = torch.compile(self._static_step, dynamic=False, options=COMPILE_OPTIONS)
            self._compiled_calls = 0
            return logits
        self._tok.copy_(token.view(-1, 1))
        self._pos.fill_(pos)
        self._compiled_calls += 1
        if self._compiled_calls == 1:  # compiles, with guards installed
            t0 = time.perf_counter()
            try:
                return self._compiled(self._tok, self._pos)
            except Exception as e:  # e.g. no C++ compiler for inductor: keep decoding eagerly (same results)
                self.compile, self.compile_error = False, f"{type(e).__name__}: {e}"
                return self._static_step(self._tok, self._pos)
            finally:
                self.compile_s = time.perf_counter() - t0
        if not hasattr(torch.compiler, "set_stance"):  # torch < 2.6: guards are checked on every call
            return self._compiled(self._tok, self._pos)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self._compiled(self._tok, self._pos)

    def _capture(self) -> None:
        self._tok = torch.zeros((self.batch, 1), dtype=torch.long, device=self.device)
        self._pos = torch.zeros((1,), dtype=torch.long, device=self.device)
        saved = [(k.clone(), v.clone()) for k, v in zip(self.k, self.v)]  # warm-up/capture write position 0
        # warm-up on a side stream picks kernel configs and allocates outside the graph, then capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._static_step(self._tok, self._pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._static_step(self._tok, self._pos)
        self._graph = graph
        for (k, v), dst_k, dst_v in zip(saved, self.k, self.v):
            dst_k.copy_(k)
            dst_v.copy_(v)

    # ---- generation ----

    def prepare(self, prompt: list[int]) -> int:
        """Reuse the cached prefix of `prompt`; returns how many prompt tokens are already cached."""
        n = 0
        for a, b in zip(self.cached, prompt[:-1]):  # always recompute at least the last prompt token
            if a != b:
                break
            n += 1
        self.cached = self.cached[:n]
        return n

    def stream(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None,
               eos_id: int | None = None, stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
        """Yield generated token ids one at a time; `self.last` holds the GenerationResult when it ends."""
        params = params or SamplingParams()
        if not prompt:
            raise GenerationError("empty prompt")
        if len(prompt) >= self.max_len:
            raise GenerationError(f"prompt has {len(prompt)} tokens but the context is {self.max_len} "
                                  f"(model limit {self.cfg.max_position_embeddings}); shorten the prompt")
        max_new_tokens = max(0, min(max_new_tokens, self.max_len - len(prompt)))
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stops = set(stop_ids) | ({eos_id} if eos_id is not None else set())
        reused = self.prepare(prompt)
        compiled_before = self.compile_s
        out: list[int] = []
        self.last = GenerationResult(out, len(prompt), 0.0, 0.0, "length", reused)
        if max_new_tokens == 0:
            return
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        logits = self.forward(torch.tensor([prompt[reused:]], device=self.device), reused)
        token = sample(logits, params, gen)
        tok = int(token[0])
        sync()
        t1 = time.perf_counter()
        self.cached = list(prompt)
        self.last.prefill_s = t1 - t0
        pos = len(prompt)
        while True:
            out.append(tok)
            self.last.decode_s = time.perf_counter() - t1
            yield tok
            if tok in stops:
                self.last.stop_reason = "eos"
                break
            if len(out) >= max_new_tokens or pos >= self.max_len:
                break
            logits = self.decode_step(token.view(1), pos)
            self.cached.append(tok)
            pos += 1
            token = sample(logits, params, gen)
            tok = int(token[0])
        self.last.decode_s = time.perf_counter() - t1
        if self.compile_s and not compiled_before:  # the step was compiled during this call
            self.last.extra["compile_s"] = self.compile_s

    def generate(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                 eos_id: int | None = None, on_token: Callable[[int], None] | None = None) -> GenerationResult:
        for tok in self.stream(prompt, max_new_tokens, params, eos_id):
            if on_token is not None:
                on_token(tok)
        return self.last


def generate(model: Transformer, prompt: list[int], max_new_tokens: int = 64, params: SamplingParams | None = None,
             eos_id: int | None = None, on_token: Callable[[int], None] | None = None,
             cuda_graph: bool | None = None, compile: bool = False) -> GenerationResult:
    """One-shot generation (builds a Generator sized for prompt + max_new_tokens)."""
    if len(prompt) >= model.config.max_position_embeddings:
        raise GenerationError(f"prompt has {len(prompt)} tokens but the model's context is "
                              f"{model.config.max_position_embeddings}; shorten the prompt")
    g = Generator(model, max_len=len(prompt) + max_new_tokens + 1, cuda_graph=cuda_graph, compile=compile)
    return g.generate(prompt, max_new_tokens, params, eos_id if eos_id is not None else model.config.eos_token_id,
                      on_token)


class TextStreamer:
    """Turns a stream of token ids into text increments (decodes the growing sequence, emits the new suffix)."""

    def __init__(self, tokenizer, prefix: list[int] | None = None):
        """`prefix`: ids already shown (e.g. the prompt), so spacing at the seam decodes as in one sequence."""
        self.tokenizer, self.ids = tokenizer, list(prefix or [])
        self.text = tokenizer.decode(self.ids) if self.ids else ""

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 byte sequence: wait for the rest
            return ""
        new, self.text = text[len(self.text):], text
        return new
