"""`quantkit verify OUT... --ref SOURCE`: does the written checkpoint compute what quantkit thinks it computes?

OUT is read back through quantkit's own reader and through a real client: transformers (default) or vLLM
(`--client vllm`, from the venv scripts/build_vllm.sh builds); the prompts (or windows of `--text`) run through
both and through the full-precision SOURCE (see `quantkit.eval.verify`). Exit code 3 when the client disagrees
with quantkit beyond the tolerances, or did not run (not installed, could not load OUT) unless `--no-client`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from quantkit.commands._types import FiniteFloatRange
from quantkit.errors import CheckFailed


@contextlib.contextmanager
def stdout_to_stderr():
    """Everything written to stdout meanwhile, by Python code (gptqmodel's banner) or at the file-descriptor level
    (C extensions, child processes), goes to stderr: `--json` prints only JSON on stdout."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (closed stdout): the Python-level redirect is all that can be done
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


@click.command("verify")
@click.argument("outs", nargs=-1, required=True, metavar="OUT...", type=click.Path(exists=True, path_type=Path))
@click.option("--ref", "ref", required=True, help="The full-precision source the outputs were made from.")
@click.option("--client", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True,
              help="The real client: transformers (+ gptqmodel / compressed-tensors) in this process, or vLLM from "
                   "the venv scripts/build_vllm.sh builds (QUANTKIT_VLLM_VENV overrides its path).")
@click.option("--tol", type=FiniteFloatRange(min=0), default=1e-3, show_default=True,
              help="transformers: largest allowed max|logit difference| / max|logit| between quantkit and the client.")
@click.option("--vllm-dtype", type=click.Choice(["float16", "bfloat16"]), default="float16", show_default=True,
              help="vLLM's activation dtype (bfloat16 is ~70x noisier in KLD: looser default tolerances).")
@click.option("--max-kld", type=FiniteFloatRange(min=0), default=None,
              help="vLLM: largest allowed mean KLD(quantkit ‖ vLLM) [float16: 1e-4, bfloat16: 1e-3].")
@click.option("--min-same-top", type=FiniteFloatRange(min=0, max=1), default=None,
              help="vLLM: smallest allowed fraction of positions with the same top token [0.97 / 0.95].")
@click.option("--max-dlogp", type=FiniteFloatRange(min=0), default=None,
              help="vLLM: largest allowed |Δ log p| of an actual next token [0.1 / 0.25].")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Score windows of this text instead of the built-in prompts.")
@click.option("--ctx", type=click.IntRange(2, 512), default=256, show_default=True, help="With --text: window size.")
@click.option("--max-windows", type=click.IntRange(min=1), default=4, show_default=True,
              help="With --text: number of windows.")
@click.option("--no-client", is_flag=True, help="Only quantkit's reader (no client runs; exit 0 without one).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object (a list of them for several outputs).")
def command(outs, ref, client, tol, vllm_dtype, max_kld, min_same_top, max_dlogp, text_path, ctx, max_windows,
            no_client, as_json):
    """Read OUT with quantkit and with its real client; compare their predictions with each other and with --ref.

    \b
    quantkit verify out/nano-gptq --ref models/mistral-nano
    quantkit verify out/gptq out/awq out/compressed-tensors --ref models/mistral-nano --client vllm
    Exit code 3 when the client disagrees with quantkit beyond the tolerances, or did not run (not installed,
    cannot load OUT): pass --no-client to check with quantkit's reader only. With --client vllm, several
    outputs share one vLLM process (each load still takes ~30 s on CPU).
    """
    from quantkit.api import verify

    overrides = {k: v for k, v in (("kld_mean", max_kld), ("same_top", min_same_top), ("max_abs_dlogp", max_dlogp))
                 if v is not None}
    if client == "vllm" and not no_client:
        click.echo(f"loading {len(outs)} output(s) with vLLM (about 30-60 s each on CPU) ...", err=True)
    with stdout_to_stderr():
        results = verify(list(outs), ref, tol=tol, use_client=not no_client, client=client, text=text_path,
                         ctx=ctx, max_windows=max_windows, vllm_dtype=vllm_dtype, tolerances=overrides)
    if as_json:
        data = [r.to_dict() for r in results]
        click.echo(json.dumps(data[0] if len(data) == 1 else data, indent=2))
    else:
        click.echo("\n".join(r.render() for r in results))
    failures = [f for f in (r.failure() for r in results) if f is not None]
    if failures:
        raise CheckFailed(failures[0] if len(failures) == 1 else
                          f"{len(failures)} of {len(results)} outputs failed verification: " + "; ".join(failures))
