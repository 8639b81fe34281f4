"""`quantkit quantize MODEL -o OUT`: plan, calibrate, quantize layer by layer, write every requested format."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import click

from quantkit.errors import QuantkitError, SchemeError
from quantkit.quant.plan import METHODS, Plan, build_plan


def model_options(f):
    """The options `plan` and `quantize` share (what to produce)."""
    options = [
        click.argument("model"),
        click.option("--preset", default=None, help="Integer scheme preset (default w4a16-g128; w4a16-g128-asym with --method awq): w8a16, w4a16-g128, "
                     "w4a16-g128-asym, w4a16-g32, ... (see quantkit/quant/scheme.py)."),
        click.option("--method", type=click.Choice(METHODS), default="rtn", show_default=True,
                     help="rtn: round to nearest (no data); gptq / awq: calibration-driven."),
        click.option("--format", "formats", default=None,
                     help="Output format(s), comma-separated: gptq, awq, compressed-tensors, gguf, dump. "
                     "Default: gguf with --type, else gptq (awq with --method awq)."),
        click.option("--type", "gguf_type", default=None, help="GGUF file type (Q4_K_M, Q8_0, Q6_K, ...); implies --format gguf."),
        click.option("--override", "overrides", multiple=True, metavar="PATTERN=PRESET",
                     help="Per-tensor scheme: 're:REGEX=PRESET', 'NAME=PRESET', '-:REGEX' (keep float); for GGUF "
                     "'re:REGEX=TYPE'. Repeatable; the last match wins; fused groups share one scheme."),
        click.option("--act-order/--no-act-order", default=None, help="GPTQ: process columns by descending Hessian "
                     "diagonal (static groups: g_idx stays trivial)."),
        click.option("--calib", default=None, help="Calibration data: builtin, a .txt/.jsonl/.parquet file, a directory "
                     "of them, or wikitext2|c4|pileval|ultrachat (needs the network). Default builtin for gptq/awq; "
                     "with rtn + GGUF it enables an importance matrix."),
        click.option("--calib-samples", default=128, show_default=True, type=int, help="Calibration windows."),
        click.option("--calib-seqlen", default=512, show_default=True, type=int, help="Tokens per window."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the window sampling."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]."),
        click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def resolve_formats(formats: str | None, gguf_type: str | None, method: str) -> list[str]:
    if formats:
        out = [f.strip() for f in formats.split(",") if f.strip()]
    elif gguf_type:
        out = ["gguf"]
    else:
        out = ["awq"] if method == "awq" else ["gptq"]
    if len(set(out)) != len(out):
        raise SchemeError(f"--format {formats}: a format is named twice")
    return out


def make_plan(ckpt, preset, method, formats, gguf_type, overrides, act_order, calib, calib_samples, calib_seqlen,
              device, has_imatrix: bool = False) -> Plan:
    fmts = resolve_formats(formats, gguf_type, method)
    has_imatrix = has_imatrix or (calib is not None and "gguf" in fmts)
    return build_plan(ckpt.config, preset=preset, formats=fmts, gguf_type=gguf_type, overrides=list(overrides),
                      method=method, act_order=act_order, n_samples=calib_samples, seqlen=calib_seqlen, device=device,
                      checkpoint=ckpt, has_imatrix=has_imatrix)


def output_paths(out: Path, formats: list[str], gguf_type: str | None) -> dict[str, Path]:
    """One format: OUT itself. Several: OUT/<format> (gguf: OUT/model-<TYPE>.gguf)."""
    if len(formats) == 1:
        return {formats[0]: out}
    return {f: out / (f"model-{gguf_type}.gguf" if f == "gguf" else f) for f in formats}


def _device_check(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise QuantkitError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    elif device != "cpu":
        raise QuantkitError(f"--device {device}: expected cpu or cuda[:N]")


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".gguf"))


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _write_log(log: list[dict], path: Path) -> None:
    with open(path, "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")


@click.command("quantize")
@model_options
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="Output directory (GGUF: file). With several formats, a directory holding one output per format.")
@click.option("--damp", default=0.01, show_default=True, type=float, help="GPTQ damping, fraction of mean(diag H).")
@click.option("--block-size", default=128, show_default=True, type=int, help="GPTQ lazy-batch block size.")
@click.option("--imatrix", "imatrix_in", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="GGUF: use this importance matrix (llama.cpp imatrix file, e.g. from `quantkit imatrix`).")
@click.option("--imatrix-out", type=click.Path(path_type=Path), default=None,
              help="Also save the collected importance matrix (llama.cpp imatrix GGUF) to this file.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Per-layer checkpoints for resuming (default: OUT.partial beside the output).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue an interrupted run with the same arguments from its last completed layer.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--dry-run", is_flag=True, help="Print the plan (targets, sizes, BPW, memory) and stop.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(model, preset, method, formats, gguf_type, overrides, act_order, calib, calib_samples, calib_seqlen,
            seed, device, as_json, output, damp, block_size, imatrix_in, imatrix_out, work_dir, resume, force, dry_run,
            no_progress):
    """Quantize MODEL layer by layer (only one decoder layer in memory) and write the requested format(s).

    \b
    quantkit quantize models/mistral-nano --preset w4a16-g128 --method gptq -o out/nano-gptq
    quantkit quantize models/mistral-nano --method awq --preset w4a16-g128-asym --format awq -o out/nano-awq
    quantkit quantize models/mistral-nano --format gguf --type Q4_K_M --calib builtin -o out/nano-Q4_K_M.gguf
    quantkit quantize models/mistral-nano --format gptq,compressed-tensors -o out/nano-w4   # out/nano-w4/{gptq,...}
    """
    from quantkit.model.checkpoint import open_checkpoint

    t0 = time.perf_counter()
    ckpt = open_checkpoint(model)
    if method in ("gptq", "awq") and calib is None:
        calib = "builtin"
    plan = make_plan(ckpt, preset, method, formats, gguf_type, overrides, act_order, calib, calib_samples,
                     calib_seqlen, device, has_imatrix=imatrix_in is not None)
    if imatrix_in is not None and plan.gguf_type is None:
        raise click.UsageError("--imatrix applies to --format gguf only")
    if dry_run:
        _print_plan(plan, as_json)
        return
    if output is None:
        raise click.UsageError("missing -o/--output (or use --dry-run)")
    if not 0 < damp <= 1:
        raise click.UsageError(f"--damp {damp}: expected a fraction of the mean Hessian diagonal in (0, 1]")
    _device_check(device)
    result = run_quantize(ckpt, plan, output, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                          seed=seed, device=device, damp=damp, block_size=block_size, imatrix_out=imatrix_out,
                          imatrix_in=imatrix_in, work_dir=work_dir, resume=resume, force=force, progress=not (no_progress or as_json),
                          t_start=t0)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(render_summary(result))


def _print_plan(plan: Plan, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(plan.to_dict()))
    else:
        click.echo(plan.render())


def run_quantize(ckpt, plan: Plan, output: Path, *, calib, calib_samples, calib_seqlen, seed, device, damp,
                 block_size, imatrix_out, work_dir, resume, force, progress, t_start,
                 imatrix_in: Path | None = None) -> dict[str, Any]:
    from quantkit import __version__
    from quantkit.formats.base import WriteOptions, get_format
    from quantkit.io import check_output_path
    from quantkit.quant.dump import DumpWriter
    from quantkit.quant.pipeline import PipelineOptions, quantize_model

    paths = output_paths(Path(output), plan.formats, plan.gguf_type)
    for p in [Path(output), *paths.values()]:
        check_output_path(p, force)  # refuse before any work
    if imatrix_out is not None:
        check_output_path(imatrix_out, force)

    calib_set = None
    t_calib = time.perf_counter()
    if calib is not None:
        from quantkit.calib import load_calibration
        from quantkit.model.tokenizer import load_tokenizer

        if ckpt.tokenizer_path is None:
            raise QuantkitError(f"{ckpt.path}: no tokenizer file; calibration needs one")
        tok = load_tokenizer(ckpt.tokenizer_path)
        calib_set = load_calibration(calib, tok, calib_samples, calib_seqlen, seed)
    t_calib = time.perf_counter() - t_calib

    provenance = {
        "method": plan.method,
        "preset": plan.preset,
        "gguf_type": plan.gguf_type,
        "overrides": list(plan.overrides),
        "calibration": calib_set.identity if calib_set is not None else None,
        "source_fingerprint": ckpt.fingerprint(),
        "quantkit_version": __version__,
    }
    if plan.method == "gptq":
        provenance["gptq"] = {"damp": damp, "block_size": block_size, "static_groups": True}
    provenance = {k: v for k, v in provenance.items() if v is not None}

    importance = None
    if imatrix_in is not None:
        from quantkit.gguf.imatrix import read_imatrix

        importance = read_imatrix(imatrix_in).to_canonical()
        provenance["imatrix"] = str(imatrix_in)

    targets = plan.targets()
    multi = len(plan.formats) > 1
    if multi:
        Path(output).mkdir(parents=True, exist_ok=True)
    writers = []
    try:
        for fmt in plan.formats:
            out = paths[fmt]
            if fmt == "dump":
                writers.append(DumpWriter(out, force=force, provenance=provenance))
                continue
            extra: dict[str, Any] = {}
            if fmt == "gguf":
                extra["ftype"] = plan.gguf_type
                if imatrix_in is not None:
                    extra["importance_meta"] = {"file": str(imatrix_in), "entries": len(importance or {})}
                elif calib_set is not None:
                    extra["importance_meta"] = {"file": "(collected by quantkit quantize)",
                                                "dataset": calib_set.identity["source"],
                                                "entries": sum(1 for e in plan.entries if e.quantized),
                                                "chunks": calib_set.n_samples}
                prov = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in provenance.items()}
            else:
                prov = provenance
            options = WriteOptions(force=force, provenance=prov, extra=extra)
            writers.append(get_format(fmt).open_writer(out, ckpt.path, ckpt.config, targets, options))
    except BaseException:
        for w in writers:
            w.abort()
        raise

    primary = Path(output)
    work = Path(work_dir) if work_dir else primary.with_name(primary.name + ".partial")
    opts = PipelineOptions(method=plan.method, damp=damp, block_size=block_size, device=device,
                           collect_imatrix=imatrix_out is not None)
    t_quant = time.perf_counter()
    try:
        result = quantize_model(ckpt, targets, writers, calib_set.tokens if calib_set is not None else None, opts,
                                work_dir=work, resume=resume,
                                calibration=calib_set.identity if calib_set is not None else None,
                                progress=progress, log_fn=lambda m: click.echo(m, err=True), importance=importance)
    except KeyboardInterrupt:
        click.echo(f"interrupted: completed layers are kept in {work}; run the same command again to resume", err=True)
        raise
    t_quant = time.perf_counter() - t_quant

    log_paths = []
    for fmt, out in paths.items():
        log_path = out / "quant_log.jsonl" if out.is_dir() else out.with_name(out.name + ".quant_log.jsonl")
        _write_log(result.log, log_path)
        log_paths.append(str(log_path))
    if imatrix_out is not None:
        _save_imatrix(result.imatrix, imatrix_out, calib_set, force)

    bytes_in = plan.bytes_in
    outputs = []
    for fmt, out in paths.items():
        size = _size_of(out)
        outputs.append({"format": fmt, "path": str(out), "bytes": size, "bpw": round(8 * size / max(plan.numel, 1), 4)})
    return {
        "quantkit_version": __version__,
        "command": "quantize",
        "status": "ok",
        "model": {"source": str(ckpt.path), "arch": ckpt.config.architecture, "params": plan.numel},
        "scheme": {"method": plan.method, "preset": plan.preset, "gguf_type": plan.gguf_type,
                   "overrides": list(plan.overrides), "formats": plan.formats},
        "calibration": calib_set.identity if calib_set is not None else None,
        "outputs": outputs,
        "sizes": {"input_bytes": bytes_in, "planned_output_bytes": plan.bytes_out, "bpw_in": round(plan.bpw_in, 4),
                  "planned_bpw": round(plan.bpw, 4)},
        "resumed_from_layer": result.resumed_from_layer,
        "timing_s": {"calibration_data": round(t_calib, 3), "quantize_and_write": round(t_quant, 3),
                     "total": round(time.perf_counter() - t_start, 3)},
        "memory": {"peak_rss_bytes": _peak_rss_bytes(), "estimated_peak_ram_bytes": plan.memory["peak_ram_bytes"]},
        "layers_log": log_paths,
    }


def _save_imatrix(imatrix, path: Path, calib_set, force: bool) -> None:
    from quantkit.gguf.imatrix import Imatrix, write_imatrix

    im = Imatrix.from_canonical({n: s for n, (s, _) in imatrix.items()}, {n: c for n, (_, c) in imatrix.items()},
                                datasets=[str(calib_set.identity["source"])] if calib_set is not None else [],
                                chunk_count=calib_set.n_samples if calib_set is not None else 0,
                                chunk_size=calib_set.seqlen if calib_set is not None else 0)
    write_imatrix(path, im, force=force)


def render_summary(r: dict[str, Any]) -> str:
    mib = 1024**2
    lines = [f"model size  = {r['sizes']['input_bytes'] / mib:10.2f} MiB ({r['sizes']['bpw_in']:.2f} BPW)"]
    for o in r["outputs"]:
        pct = 100 * (o["bytes"] / max(r["sizes"]["input_bytes"], 1) - 1)
        lines.append(f"quant size  = {o['bytes'] / mib:10.2f} MiB ({o['bpw']:.2f} BPW)  {pct:+.1f}%  [{o['format']}]")
    t = r["timing_s"]
    resumed = f"   resumed at layer {r['resumed_from_layer']}" if r["resumed_from_layer"] else ""
    lines.append(f"time {t['total']:.1f}s (calibration data {t['calibration_data']:.1f}s, quantize+write "
                 f"{t['quantize_and_write']:.1f}s)   peak RSS {r['memory']['peak_rss_bytes'] / 1024**3:.2f} GiB{resumed}")
    lines += [o["path"] for o in r["outputs"]]
    return "\n".join(lines)
