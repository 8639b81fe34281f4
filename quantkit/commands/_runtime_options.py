"""Options shared by `generate` and `chat`, and the speed line they print (loading: `quantkit.runtime.loading`)."""

from __future__ import annotations

import functools

import click

from quantkit.commands._types import COUNT, DEVICE, SEED, FiniteFloatRange


def runtime_options(fn):
    @click.option("--max-tokens", "max_tokens", type=COUNT, default=128, show_default=True, help="Tokens to generate.")
    @click.option("--temperature", type=FiniteFloatRange(min=0), default=None,
                  help="0 = greedy. Default: the model's generation_config.json (as transformers reads it), else "
                  "0.8 with top-k 40 and top-p 0.95 (llama.cpp's defaults).")
    @click.option("--top-k", "top_k", type=click.IntRange(min=0), default=None,
                  help="Keep the k most likely (0 = off). Default: the model's, else 40.")
    @click.option("--top-p", "top_p", type=FiniteFloatRange(0, 1, min_open=True), default=None,
                  help="Nucleus mass (1 = off). Default: the model's, else 0.95.")
    @click.option("--seed", type=SEED, default=None,
                  help="Seed for sampling (default: a fresh one, shown in the speed line; reproducible output).")
    @click.option("--device", default="cpu", show_default=True, type=DEVICE, help="cpu or cuda[:N].")
    @click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True,
                  help="Kernels: triton (GPU), torch (CPU); auto picks by device.")
    @click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                  help="Activation dtype (default float32 on CPU, bfloat16 on CUDA).")
    @click.option("--cache-dequant", is_flag=True,
                  help="Keep dequantized weights after first use (faster on CPU, uses full-precision memory).")
    @click.option("--cpu-kernels/--no-cpu-kernels", "cpu_kernels", default=True, show_default=True,
                  help="On CPU, run the fast kernels instead of the exact fp32 dequantize-per-chunk path: for "
                       "GGUF blocks, integer kernels on the file's bytes (AVX512-VNNI; 15-bit activations) and bf16 "
                       "tiles for prompts; for GPTQ/AWQ codes, torch's int4/int8 kernels (bf16 math).")
    @click.option("--compile", "compile_step", is_flag=True,
                  help="On CPU, compile the decode step with torch.compile (first use takes ~10-60 s; then several "
                       "times faster per token on small models).")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def sampling_params(info, temperature, top_k, top_p, seed):
    """The run's SamplingParams: the options given, the rest from the model (`info["sampling"]`)."""
    from quantkit.runtime.generate import resolve_sampling

    return resolve_sampling(temperature, top_k, top_p, seed, info.get("sampling"))


def speed_line(result, info, params=None) -> str:
    """One line: tokens, prefill and decode tokens/s, how the model runs (format, backend, device, dtype) and how it
    sampled (greedy, or temperature/top-k/top-p/seed: the seed repeats a sampled run)."""
    from quantkit.runtime.generate import describe_sampling

    return (f"{len(result.tokens)} tokens | prefill {result.prompt_tokens - result.reused_tokens} tok "
            f"{result.prefill_tokens_per_s:.1f} tok/s | decode {result.decode_tokens_per_s:.2f} tok/s | "
            f"{info['format']} {info['backend']} {info['device']} {info['dtype']}"
            + (" cache-dequant" if info.get("cache_dequant") else "")
            + (" cpu-kernels" if info.get("cpu_kernels") and info["device"] == "cpu" else "")
            + (f" (decode includes {result.extra['compile_s']:.1f} s of compile)" if result.extra.get("compile_s")
               else "")
            + (f" | {describe_sampling(params)}" if params is not None else ""))
