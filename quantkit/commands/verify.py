"""`quantkit verify OUT --ref SOURCE`: does the written checkpoint compute what quantkit thinks it computes?

OUT is read back through quantkit's own reader and, when installed, through its real client (transformers); a
fixed prompt set runs through both and through the full-precision SOURCE (see `quantkit.eval.verify`). Exit
code 3 when the client disagrees with quantkit beyond `--tol` (relative).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.commands._types import FiniteFloatRange
from quantkit.errors import CheckFailed


@click.command("verify")
@click.argument("out", type=click.Path(exists=True, path_type=Path))
@click.option("--ref", "ref", required=True, help="The full-precision source the output was made from.")
@click.option("--tol", type=FiniteFloatRange(min=0), default=1e-3, show_default=True,
              help="Largest allowed max|logit difference| / max|logit| between quantkit's reader and the client.")
@click.option("--no-client", is_flag=True, help="Only quantkit's reader (skip transformers).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def command(out, ref, tol, no_client, as_json):
    """Read OUT with quantkit and with its real client; compare logits with each other and with --ref.

    \b
    quantkit verify out/nano-gptq --ref models/mistral-nano
    Exit code 3 when the client's logits differ from quantkit's beyond --tol.
    """
    from quantkit.eval.verify import verify

    result = verify(out, ref, tol=tol, use_client=not no_client)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.render())
    if result.failed:
        raise CheckFailed(f"{out}: the client's logits differ from quantkit's by "
                          f"{result.max_rel_logit_diff:.3e} (relative) > {tol:.0e}")
