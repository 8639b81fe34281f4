"""`quantkit chat MODEL`: an interactive multi-turn conversation using the model's chat template."""

from __future__ import annotations

import sys

import click

from quantkit.commands._runtime_options import runtime_options, sampling_params, speed_line


@click.command("chat", short_help="Chat with a model using its chat template.")
@click.argument("model")
@click.option("--system", default=None, help="A system prompt (the first message; a template without a system role, "
              "such as Mistral v0.2's, refuses it; the built-in [INST] format prepends it to the first user turn).")
@click.option("--verbose", "-v", is_flag=True, help="Print the speed line after every answer (stderr).")
@runtime_options
def command(model, system, verbose, max_tokens, temperature, top_k, top_p, seed, device, backend, dtype,
            cache_dequant, cpu_kernels, compile_step=False):
    """Chat with MODEL: each line on stdin is a user turn; answers stream to stdout.

    The conversation is encoded with the model's own chat template (tokenizer_config.json, chat_template.jinja or
    GGUF metadata; Mistral's [INST] format when it has none) every turn; the KV cache keeps the shared prefix, so
    only the new turn is prefilled. Type /reset to start over, /exit (or end of input) to quit. When stdin is not a
    terminal (piped turns), stdout marks each turn: a line `user: ...`, then `assistant: ...`. Sampling as in
    `generate` (the model's generation_config.json, else temperature 0.8, top-k 40, top-p 0.95; --temperature 0
    is greedy).

    \b
    quantkit chat out/nano-Q4_K_M.gguf
    printf 'Hello\\nTell me more\\n' | quantkit chat models/mistral-nano --max-tokens 40
    """
    from quantkit.runtime.generate import Generator, TextStreamer
    from quantkit.runtime.loading import load_with_tokenizer

    net, tok = load_with_tokenizer(model, device=device, backend=backend, dtype=dtype,
                                   cache_dequant=cache_dequant, cpu_kernels=cpu_kernels)
    params = sampling_params(net.runtime_info, temperature, top_k, top_p, seed)
    gen = Generator(net, max_len=min(4096, net.config.max_position_embeddings), compile=compile_step)
    interactive = sys.stdin.isatty()
    messages = [{"role": "system", "content": system}] if system else []
    total_tokens, total_s = 0, 0.0
    while True:
        if interactive:
            click.echo(">>> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = [{"role": "system", "content": system}] if system else []
            continue
        messages.append({"role": "user", "content": text})
        ids = tok.encode_chat(messages)
        budget = min(max_tokens, gen.max_len - len(ids) - 1)
        if budget <= 0:
            click.echo("error: the conversation no longer fits the context; /reset to start over", err=True)
            messages.pop()
            continue
        if not interactive:  # piped turns: the transcript shows where each turn starts
            sys.stdout.write(f"user: {text}\nassistant: ")
            sys.stdout.flush()
        streamer, answer, first = TextStreamer(tok), [], True
        try:
            for t in gen.stream(ids, budget, params, eos_id=tok.eos_id):
                if t == tok.eos_id:
                    continue
                answer.append(t)
                piece = streamer.push(t)
                if first:
                    piece, first = piece.lstrip(), not piece.strip()
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:  # end the answer's line even when generation fails
            sys.stdout.write("\n")
            sys.stdout.flush()
        messages.append({"role": "assistant", "content": tok.decode(answer).strip()})
        total_tokens += len(gen.last.tokens)
        total_s += gen.last.prefill_s + gen.last.decode_s
        if verbose:
            click.echo(speed_line(gen.last, net.runtime_info, params), err=True)
    if total_tokens:
        click.echo(f"{total_tokens} tokens in {total_s:.2f} s ({total_tokens / max(total_s, 1e-9):.2f} tok/s overall)",
                   err=True)
