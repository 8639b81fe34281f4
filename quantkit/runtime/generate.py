"""Prefill + decode with a static KV cache, sampling, EOS stop, streaming, tokens/s.

`Generator(model, max_len)` sets up the model's static KV caches (`Transformer.setup_caches`: per layer
[batch, kv_heads, max_len, head_dim], written with `index_copy_` at a position tensor, attention over the whole
cache under a mask) and runs the model's forward (`Transformer.hidden_states`), so that one decode step has static
shapes. On CUDA that step is captured once as a CUDA graph (the Python overhead of ~40 small ops per layer would
otherwise dominate decode), and the model's fused Triton kernels are on by default; on CPU it runs eagerly unless
`compile=True`: then the step is compiled once with torch.compile (inductor fuses the norms, RoPE, cache writes
and attention into a few C++ loops; the low-bit matmuls stay extern calls), which costs ~10-60 s at the second
decode step and makes each later step several times cheaper on small models. Only the decode step is compiled;
its shapes are static, so it compiles once, and its guards are not re-evaluated on every call
(`skip_guard_eval_unsafe`, scoped to this call: the generator always passes the same two input buffers).
The cache remembers which tokens it holds, so a chat turn only prefills the new suffix. Several generators may
share one model: each attaches its own caches when it runs; `forward` and `stream`/`generate` give the model
back the caches it had before (none, usually: `model(tokens)` stays the plain full forward), `decode_step` leaves
them attached (the hot path).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from quantkit.errors import GenerationError
from quantkit.model.reference import Transformer
from quantkit.runtime.model import explain_nonfinite, model_device, model_dtype
from quantkit.errors import NonFiniteError


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
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


# What `generate` and `chat` sample with when neither the command line nor the model says: llama.cpp's defaults
# (common/common.h). Greedy decoding of a small or base model tends to repeat itself; --temperature 0 is greedy.
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
# transformers' GenerationConfig defaults, for the fields a sampling generation_config.json leaves out
HF_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def model_sampling(generation_config: dict[str, Any] | None, source: str = "generation_config.json"
                   ) -> dict[str, Any]:
    """The sampling a model asks for: {"temperature", "top_k", "top_p", "source"}.

    From its generation_config.json as transformers reads it: `do_sample: false` is greedy; `do_sample: true` or
    any of temperature / top_k / top_p samples, the fields it leaves out taking transformers' defaults. A config
    that says nothing about sampling (most base and Mistral models: only bos/eos ids) gets `DEFAULT_SAMPLING`.
    A present value of the wrong type or range is a GenerationError naming the file and field."""
    cfg = generation_config or {}
    keys = [k for k in HF_SAMPLING if cfg.get(k) is not None]
    if cfg.get("do_sample") is False:
        return {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "source": f"{source} (do_sample false: greedy)"}
    if cfg.get("do_sample") is not True and not keys:
        return {**DEFAULT_SAMPLING, "source": "quantkit default"}
    out: dict[str, Any] = {}
    for key, default in HF_SAMPLING.items():
        value = cfg.get(key)
        value = default if value is None else value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if key == "top_k":
            ok = ok and float(value).is_integer() and value >= 0
        elif key == "top_p":
            ok = ok and 0 < value <= 1
        else:
            ok = ok and value >= 0
        if not ok:
            raise GenerationError(f"{source}: {key} = {value!r} is not a valid sampling setting")
        out[key] = int(value) if key == "top_k" else float(value)
    return {**out, "source": source}


def resolve_sampling(temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     seed: int | None = None, model_defaults: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from what the caller gave, the rest from `model_defaults` (`model_sampling`; without them
    `DEFAULT_SAMPLING`). Sampling without a seed draws one, kept in `.seed`, so a run can be repeated."""
    defaults = model_defaults or DEFAULT_SAMPLING
    params = SamplingParams(defaults["temperature"] if temperature is None else temperature,
                            defaults["top_k"] if top_k is None else top_k,
                            defaults["top_p"] if top_p is None else top_p, seed)
    if params.seed is None and params.temperature > 0:
        import secrets

        params.seed = secrets.randbits(63)
    return params


def describe_sampling(params: SamplingParams) -> str:
    """"greedy" or "temperature 0.8, top-k 40, top-p 0.95, seed 123" (the speed line's account of the run)."""
    if params.temperature == 0:
        return "greedy"
    return (f"temperature {params.temperature:g}, top-k {params.top_k or 'off'}, "
            f"top-p {params.top_p:g}, seed {params.seed}")


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
        before = model.kv_caches
        self.caches = model.setup_caches(batch, self.max_len)  # attached while this generator runs
        self._rope_tables = model.rope_tables  # kept alive for a captured graph (the model may grow its tables)
        model.use_caches(before)
        self.positions = torch.arange(self.max_len, device=self.device)
        self.cached: list[int] = []  # tokens whose keys/values are in the cache (batch 1 bookkeeping)
        self.use_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        # the model's Triton kernels (RMSNorm, RoPE + cache write, decode attention, SwiGLU): default on the GPU
        self.fused_kernels = (self.device.type == "cuda") if fused_kernels is None else fused_kernels
        self._graph = None
        self.compile = bool(compile) and not self.use_graph
        self._compiled, self.compile_error = None, None  # compile_error: why compile=True fell back to eager
        self.compile_s = 0.0  # seconds the first compiled call took (compile or cache load), inside decode time

    @property
    def k(self) -> list[torch.Tensor]:
        """Per layer, the key cache [batch, kv_heads, max_len, head_dim]."""
        return [c.k for c in self.caches]

    @property
    def v(self) -> list[torch.Tensor]:
        return [c.v for c in self.caches]

    def _attach(self) -> None:
        if self.model.kv_caches is not self.caches:  # set up, or another generator ran this model since
            self.model.use_caches(self.caches)

    @contextmanager
    def _borrowed(self):
        """The model runs on this generator's caches inside, and gets its previous ones back after."""
        before = self.model.kv_caches
        self._attach()
        try:
            yield
        finally:
            if before is not self.caches:
                self.model.use_caches(before)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions start_pos.. -> logits [B, V] of the last position (or [B, T, V])."""
        with self._borrowed():
            return self._forward(tokens, start_pos, all_logits)

    def _forward(self, tokens: torch.Tensor, start_pos: int, all_logits: bool) -> torch.Tensor:
        t = tokens.shape[1]
        end = start_pos + t
        if end > self.max_len:
            raise GenerationError(f"sequence of {end} tokens exceeds the cache/context length {self.max_len}")
        x = self.model.hidden_states(tokens.to(self.device), self.positions[start_pos:end], end, self.fused_kernels)
        if not all_logits:
            x = x[:, -1:]
        logits = self.model.lm_head(x)
        return logits if all_logits else logits[:, -1]

    def _static_step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per sequence at position tensor `pos` [1], attending over the whole cache (static shapes)."""
        x = self.model.hidden_states(token, pos, self.max_len, self.fused_kernels)
        return self.model.lm_head(x)[:, -1]

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """One token per sequence [B] at position pos -> logits [B, V] (CUDA graph when enabled)."""
        if pos >= self.max_len:
            raise GenerationError(f"position {pos} exceeds the cache/context length {self.max_len}")
        self._attach()
        if self.compile:
            return self._compiled_step(token, pos)
        if not self.use_graph:
            return self._forward(token.view(-1, 1), pos, False)
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
        saved = [(c.k.clone(), c.v.clone()) for c in self.caches]  # warm-up/capture write position 0
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
        for (k, v), cache in zip(saved, self.caches):
            cache.k.copy_(k)
            cache.v.copy_(v)

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
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        max_new_tokens = min(max_new_tokens, self.max_len - len(prompt))
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stops = set(stop_ids) | ({eos_id} if eos_id is not None else set())
        reused = self.prepare(prompt)
        compiled_before = self.compile_s
        out: list[int] = []
        self.last = GenerationResult(out, len(prompt), 0.0, 0.0, "length", reused)
        if max_new_tokens == 0:
            return
        with self._borrowed():
            sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = self._forward(torch.tensor([prompt[reused:]], device=self.device), reused, False)
            self._check_finite(logits, len(prompt) - 1)
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
                self._check_finite(logits, pos)
                pos += 1
                token = sample(logits, params, gen)
                tok = int(token[0])
            self.last.decode_s = time.perf_counter() - t1
        if self.compile_s and not compiled_before:  # the step was compiled during this call
            self.last.extra["compile_s"] = self.compile_s

    def _check_finite(self, logits: torch.Tensor, pos: int) -> None:
        """Raise NonFiniteError (naming the weights that explain it) when the logits at `pos` hold NaN or Inf:
        greedy decoding would emit garbage tokens and sampling would fail inside torch.multinomial."""
        if not bool(torch.isfinite(logits).all()):
            self.cached = []  # nothing in the cache can be trusted now
            where = getattr(self.model, "runtime_info", {}).get("path") or "the model"
            raise NonFiniteError(f"{where}: the logits are NaN or Inf at position {pos}"
                                 + explain_nonfinite(self.model))

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
