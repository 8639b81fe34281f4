"""`quantkit generate MODEL PROMPT`: stream a continuation (or a chat answer) and report tokens/s."""

from __future__ import annotations

import sys

import click

from quantkit.commands._runtime_options import runtime_options, sampling_params, speed_line


@click.command("generate", short_help="Generate text from any checkpoint.")
@click.argument("model")
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Wrap PROMPT in the model's own chat template (tokenizer_config.json or "
              "GGUF metadata; Mistral's [INST] ... [/INST] when it has none).")
@runtime_options
def command(model, prompt, chat, max_tokens, temperature, top_k, top_p, seed, device, backend, dtype, cache_dequant,
            cpu_kernels, compile_step=False):
    """Generate text from MODEL (full-precision source, GPTQ/AWQ/compressed-tensors directory or GGUF file).

    The text streams to stdout; the speed line (prefill and decode tokens/s, the sampling and its seed) goes to
    stderr at the end. Sampling follows the model's generation_config.json, else temperature 0.8, top-k 40,
    top-p 0.95 (llama.cpp's defaults); --temperature 0 decodes greedily, --seed repeats a sampled run.

    \b
    quantkit generate models/mistral-nano "Once upon a time"
    quantkit generate out/nano-Q4_K_M.gguf "Once upon a time" --max-tokens 64 --temperature 0
    quantkit generate out/nano-gptq "Tell me a story" --chat --device cuda --seed 1
    """
    from quantkit.runtime.generate import Generator, TextStreamer
    from quantkit.runtime.loading import load_with_tokenizer

    net, tok = load_with_tokenizer(model, device=device, backend=backend, dtype=dtype,
                                   cache_dequant=cache_dequant, cpu_kernels=cpu_kernels)
    params = sampling_params(net.runtime_info, temperature, top_k, top_p, seed)
    if chat:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        streamer = TextStreamer(tok)
    else:
        ids = tok.encode(prompt, bos=True)
        streamer = TextStreamer(tok, ids[1:] if ids and ids[0] == tok.bos_id else ids)
        sys.stdout.write(streamer.text)
    gen = Generator(net, max_len=min(len(ids) + max_tokens + 1, net.config.max_position_embeddings),
                    compile=compile_step)
    first = True
    try:
        for t in gen.stream(ids, max_tokens, params, eos_id=tok.eos_id):
            piece = streamer.push(t)
            if chat and first:
                piece, first = piece.lstrip(), not piece.strip()
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:  # end the text's line even when generation fails (the error line then starts a line of its own)
        sys.stdout.write("\n")
        sys.stdout.flush()
    click.echo(speed_line(gen.last, net.runtime_info, params), err=True)
