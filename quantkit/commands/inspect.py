"""`quantkit inspect PATH [--json]`: what a checkpoint is, without loading its weights.

The facts come from `quantkit.formats.inspect.inspect_path`; this module only parses options and renders.
"""

from __future__ import annotations

import json

import click


@click.command("inspect", short_help="Describe a checkpoint (no weights loaded).")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
def command(path: str, as_json: bool) -> None:
    """Show what a checkpoint is: architecture, parameter count, dtypes, shards, sizes, config checks, tokenizer.

    PATH is a model directory (Hugging Face or mistral-inference layout, or a quantized GPTQ/AWQ/compressed-tensors
    directory), a .gguf file, or a Hugging Face hub id. No weights are loaded.
    """
    from quantkit.formats.inspect import inspect_path

    result = inspect_path(path)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(result.render())
