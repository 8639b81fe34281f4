"""The `quantkit` command line: a click group whose commands live in `quantkit/commands/<name>.py`.

Commands are thin: parse options, call the library, render. Results go to stdout (human text or `--json`),
progress bars and logs to stderr. A known failure (QuantkitError) prints one line `error: ...` and exits with
its code; set QUANTKIT_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys

import click

from quantkit import __version__
from quantkit.allocator import tune_allocator
from quantkit.errors import QuantkitError

# name -> module under quantkit.commands that defines a click command called `command`
COMMANDS = {
    "inspect": "inspect",
    "plan": "plan",
    "quantize": "quantize",
    "convert": "convert",
    "eval": "eval",
    "compare": "compare",
    "report": "report",
    "generate": "generate",
    "chat": "chat",
    "verify": "verify",
    "imatrix": "imatrix",
}


# `quantkit --help` lists each command with its short_help (set where the command is defined, at most 45
# characters so it is never cut off); this supplies one for a command defined without it
SHORT_HELP = {
    "verify": "Check OUT's logits against its real client.",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs (keeps `quantkit --help` fast)."""

    def list_commands(self, ctx):
        return [name for name, mod in COMMANDS.items() if importlib.util.find_spec(f"quantkit.commands.{mod}")]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        try:
            module = importlib.import_module(f"quantkit.commands.{COMMANDS[name]}")
        except ModuleNotFoundError as e:
            if e.name == f"quantkit.commands.{COMMANDS[name]}":
                return None
            raise
        command = module.command
        if command.short_help is None and name in SHORT_HELP:
            command.short_help = SHORT_HELP[name]
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="quantkit")
def cli() -> None:
    """Quantize and convert Mistral/Llama checkpoints, and prove the result still behaves like the original.

    \b
    quantkit inspect models/mistral-nano
    quantkit quantize models/mistral-nano --preset w4a16-g128 --method gptq --format gptq -o out/nano-gptq
    quantkit quantize models/mistral-nano --format gguf --type Q4_K_M -o out/nano-Q4_K_M.gguf
    quantkit eval out/nano-gptq --text wiki.test.raw --ref models/mistral-nano
    quantkit generate out/nano-Q4_K_M.gguf "Once upon a time"
    """


def _terminate(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so every atomic output removes its temporary file before the process ends."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    tune_allocator()
    try:
        cli.main(args=argv, prog_name="quantkit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except QuantkitError as e:
        if os.environ.get("QUANTKIT_DEBUG"):
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:  # a write fault (disk full, file-size limit, read-only path, ...) is one error line too
        from quantkit.io import write_error

        fault = write_error(e)
        if fault is None or os.environ.get("QUANTKIT_DEBUG"):
            raise
        click.echo(f"error: {fault}", err=True)
        sys.exit(fault.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
