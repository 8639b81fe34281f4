"""One quantize run: plan -> calibration data -> layer-wise pipeline -> every requested format, and its report.

    plan = make_plan(ckpt, method="gptq", preset="w4a16-g128", formats=["gptq"])
    result = quantize_checkpoint(ckpt, plan, "out/nano-gptq", QuantizeOptions(calib="builtin"))
    print(result.render())
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from quantkit import __version__
from quantkit.errors import DeviceError, QuantkitError, SchemeError
from quantkit.formats.base import WriteOptions
from quantkit.io import (check_disjoint, check_free_space, check_output_path, describe_needs, human_bytes,
                         move_into_place, remove_stale_temporaries, remove_temp, temp_dir_beside,
                         write_error)
from quantkit.pipeline.fanout import open_writers
from quantkit.pipeline.layerwise import Companion, LayerwiseQuantizer, PipelineOptions
from quantkit.formats.sizes import bits_per_weight, file_bytes, stored_tensor_bytes
from quantkit.pipeline.outputs import log_path, output_paths, stored_size, write_log
from quantkit.pipeline.plan import DTYPE_BYTES, Plan, build_plan
from quantkit.pipeline.workdir import MARKER as WORK_MARKER
from quantkit.quant.head_hessian import CLUSTERS as HEAD_CLUSTERS


@dataclass
class QuantizeOptions:
    """How a run works (the plan says what it produces)."""

    calib: str | None = None  # builtin, a file/directory, a dataset name; default builtin for gptq/awq
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    damp: float = 0.1  # GPTQ damping, fraction of mean(diag H) (why 0.1: README, "GPTQ's defaults")
    block_size: int = 128  # GPTQ lazy-batch block size
    group_aware: bool = True  # GPTQ without act-order: groups, and each group's columns, by importance
    head_clusters: int = HEAD_CLUSTERS  # GPTQ of lm_head: KL-weighted Hessians of this many row clusters
    refine_sweeps: int = 0  # GPTQ: sweeps of coordinate descent on the codes after the solve
    imatrix: Path | None = None  # GGUF: use this llama.cpp importance matrix
    imatrix_out: Path | None = None  # also save the collected importance matrix here
    embedding_hessian: Path | None = None  # GPTQ: round the embedding against this Fisher matrix (an allocation's)
    max_shard_bytes: int = 5 * 1000**3  # largest safetensors shard of HF-layout outputs
    work_dir: Path | None = None  # resume checkpoints (default: OUT.partial beside the output)
    resume: bool = True
    force: bool = False
    progress: bool = False


@dataclass
class QuantizeResult:
    """What a run wrote: one entry per output, timings and memory. Each output: path, bytes (its weight files on
    disk, headers included), tensor_bytes (the tensor data in them) and bpw (`bits_per_weight` of tensor_bytes:
    the plan's definition, so bpw == planned_bpw when the writer stored what the plan said)."""

    model: dict[str, Any]
    scheme: dict[str, Any]
    calibration: dict[str, Any] | None
    outputs: list[dict[str, Any]]
    sizes: dict[str, Any]
    resumed_from_layer: int
    timing_s: dict[str, float]
    memory: dict[str, int]
    layers_log: list[str]
    log: list[dict[str, Any]] = field(default_factory=list, repr=False)
    allocation: Any = field(default=None, repr=False)  # pipeline.allocate.GGUFAllocation of a size-target run

    @property
    def paths(self) -> dict[str, Path]:
        return {o["format"]: Path(o["path"]) for o in self.outputs}

    def to_dict(self) -> dict[str, Any]:
        return {"quantkit_version": __version__, "command": "quantize", "status": "ok", "model": self.model,
                "scheme": self.scheme, "calibration": self.calibration, "outputs": self.outputs, "sizes": self.sizes,
                "resumed_from_layer": self.resumed_from_layer, "timing_s": self.timing_s, "memory": self.memory,
                "layers_log": self.layers_log,
                **({"allocation": self.allocation.to_dict()} if self.allocation is not None else {})}

    def render(self) -> str:
        mib = 1024**2
        lines = [f"kept in float: {line}" for line in self.scheme.get("kept_in_float", [])]
        lines.append(f"model size  = {self.sizes['input_bytes'] / mib:10.2f} MiB ({self.sizes['bpw_in']:.2f} BPW)")
        for o in self.outputs:  # tensor bytes and BPW as `plan` counts them (bits_per_weight); then the files
            pct = 100 * (o["tensor_bytes"] / max(self.sizes["input_bytes"], 1) - 1)
            lines.append(f"quant size  = {o['tensor_bytes'] / mib:10.2f} MiB ({o['bpw']:.2f} BPW)  {pct:+.1f}%  "
                         f"[{o['format']}; files {o['bytes'] / mib:.2f} MiB]")
        t = self.timing_s
        resumed = f"   resumed at layer {self.resumed_from_layer}" if self.resumed_from_layer else ""
        lines.append(f"time {t['total']:.1f}s (calibration data {t['calibration_data']:.1f}s, quantize+write "
                     f"{t['quantize_and_write']:.1f}s)   peak RSS "
                     f"{self.memory['peak_rss_bytes'] / 1024**3:.2f} GiB{resumed}")
        if self.allocation is not None:
            lines.append(self.allocation.render())
        lines += [o["path"] for o in self.outputs]
        return "\n".join(lines)


def resolve_formats(formats: str | Sequence[str] | None, gguf_type: str | None, method: str) -> list[str]:
    """The output formats: as given (comma-separated or a list), else gguf with a type, else gptq (awq for AWQ)."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    if formats:
        out = list(formats)
    elif gguf_type:
        out = ["gguf"]
    else:
        out = ["awq"] if method == "awq" else ["gptq"]
    if len(set(out)) != len(out):
        raise SchemeError(f"--format {','.join(out)}: a format is named twice")
    return out


def default_calibration(method: str, calib: str | None) -> str | None:
    """gptq and awq need data: the built-in set unless another is named."""
    return "builtin" if calib is None and method in ("gptq", "awq") else calib


def make_plan(ckpt, *, method: str = "rtn", preset: str | None = None, formats: str | Sequence[str] | None = None,
              gguf_type: str | None = None, overrides: Sequence[str] = (), act_order: bool | None = None,
              calib: str | None = None, calib_samples: int = 128, calib_seqlen: int = 512, device: str = "cpu",
              has_imatrix: bool = False, compute_dtype: str = "auto") -> Plan:
    """The plan of `quantize` for an opened checkpoint, from the same arguments as the CLI."""
    fmts = resolve_formats(formats, gguf_type, method)
    calib = default_calibration(method, calib)
    has_imatrix = has_imatrix or (calib is not None and "gguf" in fmts)
    return build_plan(ckpt.config, preset=preset, formats=fmts, gguf_type=gguf_type, overrides=list(overrides),
                      method=method, act_order=act_order, n_samples=calib_samples, seqlen=calib_seqlen, device=device,
                      checkpoint=ckpt, has_imatrix=has_imatrix, compute_dtype=compute_dtype)


def check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    elif device != "cpu":
        raise DeviceError(f"--device {device}: expected cpu or cuda[:N]")


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def quantize_checkpoint(ckpt, plan: Plan, output: str | Path, options: QuantizeOptions | None = None,
                        log: Callable[[str], None] | None = None) -> QuantizeResult:
    """Run `plan` on the opened checkpoint and write every format of it under `output` (see `output_paths`).

    `log` receives one-line notices (resuming, where an interrupted run keeps its layers); nothing is printed."""
    o = options or QuantizeOptions()
    t_start = time.perf_counter()
    output = Path(output)
    calib = default_calibration(plan.method, o.calib)
    if o.imatrix is not None and plan.gguf_type is None:
        raise SchemeError("--imatrix applies to --format gguf only")
    if not 0 < o.damp <= 1:
        raise SchemeError(f"--damp {o.damp}: expected a fraction of the mean Hessian diagonal in (0, 1]")
    if not isinstance(o.block_size, int) or o.block_size < 1:
        raise SchemeError(f"--block-size {o.block_size!r}: expected a positive number of columns")
    check_device(o.device)
    paths = output_paths(output, plan.formats, plan.gguf_type)
    work = o.work_dir if o.work_dir else output.with_name(output.name + ".partial")
    check_disjoint({"output": output, "--work-dir": work, "--imatrix-out": o.imatrix_out},
                   {"model": ckpt.path, "--calib": calib, "--imatrix": o.imatrix})
    for p in [output, *paths.values()]:
        check_output_path(p, o.force)  # refuse before any work
    if o.imatrix_out is not None:
        check_output_path(o.imatrix_out, o.force)
    for p in [output, work, o.imatrix_out]:  # what killed runs left: it must not count against the free space
        if p is not None:
            remove_stale_temporaries(p)
    needs = space_needs(plan, output, work, calib_samples=o.calib_samples if calib is not None else 0,
                        calib_seqlen=o.calib_seqlen, collect_imatrix=o.imatrix_out is not None)
    free_at_start = check_free_space(needs)

    calib_set = None
    t_calib = time.perf_counter()
    if calib is not None:
        from quantkit.calib import load_calibration
        from quantkit.model.tokenizer import load_tokenizer

        if ckpt.tokenizer_path is None:
            raise QuantkitError(f"{ckpt.path}: no tokenizer file; calibration needs one")
        calib_set = load_calibration(calib, load_tokenizer(ckpt.tokenizer_path), o.calib_samples, o.calib_seqlen,
                                     o.seed)
    t_calib = time.perf_counter() - t_calib

    provenance = {"method": plan.method, "preset": plan.preset, "gguf_type": plan.gguf_type,
                  "overrides": list(plan.overrides),
                  "calibration": calib_set.identity if calib_set is not None else None,
                  "source_fingerprint": ckpt.fingerprint(), "quantkit_version": __version__}
    if plan.method == "gptq":
        provenance["gptq"] = {"damp": o.damp, "block_size": o.block_size, "static_groups": True,
                              "group_aware": o.group_aware, "head_clusters": o.head_clusters,
                              "refine_sweeps": o.refine_sweeps,
                              "compute_dtype": plan.compute_dtype}
    provenance = {k: v for k, v in provenance.items() if v is not None}

    importance = None
    importance_meta = None
    if o.imatrix is not None:
        from quantkit.gguf.imatrix import read_imatrix

        importance = read_imatrix(o.imatrix).to_canonical()
        provenance["imatrix"] = str(o.imatrix)
        importance_meta = {"file": str(o.imatrix), "entries": len(importance or {})}
    elif calib_set is not None and plan.gguf_type is not None:
        importance_meta = {"file": "(collected by quantkit quantize)", "dataset": calib_set.identity["source"],
                           "entries": sum(1 for e in plan.entries if e.quantized), "chunks": calib_set.n_samples}

    embedding_hessian = None
    if o.embedding_hessian is not None and plan.method == "gptq":
        from quantkit.eval.sensitivity import load_embedding_hessian

        embedding_hessian = load_embedding_hessian(o.embedding_hessian)
        provenance["embedding_hessian"] = str(o.embedding_hessian)

    targets = plan.targets()
    pipeline_options = PipelineOptions(method=plan.method, damp=o.damp, block_size=o.block_size,
                                       group_aware=o.group_aware, head_clusters=o.head_clusters,
                                       refine_sweeps=o.refine_sweeps, device=o.device,
                                       compute_dtype=plan.compute_dtype,
                                       collect_imatrix=o.imatrix_out is not None)
    # Every output is built inside one staging directory beside OUT (`.OUT.tmp-PID-XXXX`) and moved into place only
    # when all of them, with their logs, are complete: a multi-format run creates all of its outputs or none.
    multi = len(plan.formats) > 1
    staging = writer = quantizer = companion = None
    t_quant = time.perf_counter()
    try:
        staging = temp_dir_beside(output)
        staged = output_paths(staging if multi else staging / output.name, plan.formats, plan.gguf_type)
        if multi:  # a directory of outputs, marked as quantkit's so that --force may replace it
            (staging / ".quantkit-outputs").write_text("one quantkit output per format: "
                                                       + ", ".join(plan.formats) + "\n")
        write_options = WriteOptions(force=o.force, max_shard_bytes=o.max_shard_bytes, provenance=provenance,
                                     file_type=plan.gguf_type, importance_meta=importance_meta)
        if plan.mixed:  # the GGUF file from the same calibration, through its own writer
            gguf_targets = plan.targets("gguf")
            companion = Companion("gguf", gguf_targets, open_writers(["gguf"], staged, ckpt.path, ckpt.config,
                                                                     gguf_targets, write_options))
        writer = open_writers([f for f in plan.formats if not (plan.mixed and f == "gguf")], staged, ckpt.path,
                              ckpt.config, targets, write_options)
        quantizer = LayerwiseQuantizer(ckpt, targets, [writer], calib_set.tokens if calib_set is not None else None,
                                       pipeline_options, work_dir=work, resume=o.resume,
                                       calibration=calib_set.identity if calib_set is not None else None,
                                       progress=o.progress, log_fn=log, importance=importance, keep_work=True,
                                       companion=companion, embedding_hessian=embedding_hessian)
        result = quantizer.run()
        t_quant = time.perf_counter() - t_quant
        for out in staged.values():
            write_log(result.log, log_path(out))
        if o.imatrix_out is not None:
            _save_imatrix(result.imatrix, o.imatrix_out, calib_set, o.force)
        _place_outputs(staging, output, staged, multi)
    except BaseException as e:
        for w in (writer, companion.writer if companion is not None else None):
            if w is not None:
                w.abort()
        if staging is not None:
            remove_temp(staging)
        kept = quantizer.release_work(e) if quantizer is not None else None
        if isinstance(e, KeyboardInterrupt):
            if log is not None and kept is not None:
                how = "run the same command again" if o.resume else "run the same command without --no-resume"
                log(f"interrupted: completed layers are kept in {kept}; {how} to resume (or delete {kept})")
            raise
        fault = write_error(e, output=output, note=quantizer.kept_note() if quantizer is not None else "",
                            needs=_needs_text(e, needs, free_at_start, work))
        if fault is None:
            raise
        raise fault from None
    quantizer.release_work(None)
    logs = [str(log_path(out)) for out in paths.values()]

    outputs = []
    for fmt, out in paths.items():
        tensor_bytes = stored_tensor_bytes(out)
        outputs.append({"format": fmt, "path": str(out), "bytes": stored_size(out), "tensor_bytes": tensor_bytes,
                        "bpw": round(bits_per_weight(tensor_bytes, plan.numel), 4),
                        "planned_bytes": plan.bytes_out(fmt), "planned_bpw": round(plan.bpw(fmt), 4)})
    return QuantizeResult(
        model={"source": str(ckpt.path), "arch": ckpt.config.architecture, "params": plan.numel},
        scheme={"method": plan.method, "preset": plan.preset, "gguf_type": plan.gguf_type,
                "overrides": list(plan.overrides), "formats": plan.formats, "kept_in_float": plan.kept_in_float()},
        calibration=calib_set.identity if calib_set is not None else None,
        outputs=outputs,
        sizes={"input_bytes": plan.bytes_in, "bpw_in": round(plan.bpw_in, 4)},
        resumed_from_layer=result.resumed_from_layer,
        timing_s={"calibration_data": round(t_calib, 3), "quantize_and_write": round(t_quant, 3),
                  "total": round(time.perf_counter() - t_start, 3)},
        memory={"peak_rss_bytes": _peak_rss_bytes(), "estimated_peak_ram_bytes": plan.memory["peak_ram_bytes"]},
        layers_log=logs, log=result.log)


NOT_CHECKPOINTED = ("model.norm.weight", "lm_head.weight")  # written after the last layer, never into the work dir


def space_needs(plan: Plan, output: Path, work: Path | None, calib_samples: int = 0, calib_seqlen: int = 0,
                collect_imatrix: bool = False) -> list[tuple[str, Path, int]]:
    """What a run writes, for `check_free_space`: every output (its planned weight bytes) and the work dir (the
    finished embedding and layers as the resume checkpoints store them, plus the calibration activations), less
    what an earlier run's work dir already holds. The work dir is removed only once the outputs are in place."""
    what = "the output" if len(plan.formats) == 1 else f"the {len(plan.formats)} outputs"  # (planned weights)
    needs = [(what, output, sum(plan.bytes_out(f) for f in plan.formats))]
    if work is not None:
        from quantkit.formats.base import get_format

        dump = get_format("dump")
        tensors = sum(dump.stored_nbytes(t, e.shape, max(e.bytes_in // max(e.numel, 1), 1))
                      for e in plan.entries if e.name not in NOT_CHECKPOINTED
                      for t in (e.target, *([e.gguf_target] if e.gguf_target is not None else [])))
        forward = plan.method in ("gptq", "awq") or collect_imatrix or plan.gguf_type is not None
        acts = (calib_samples * calib_seqlen * plan.config.hidden_size * DTYPE_BYTES[plan.compute_dtype]
                if forward else 0)
        have = 0
        if work.is_dir() and (work / WORK_MARKER).is_file():
            have = file_bytes(work)
        needs.append((f"the work dir {work}", work, max(tensors + acts - have, 0)))
    return needs


def _needs_text(error: BaseException, needs: list[tuple[str, Path, int]], free: dict[Path, int],
                work: Path | None) -> str:
    """What an out-of-space message adds: where the failed write went, what the run needs, what was free."""
    target = getattr(error, "filename", None)
    where = ""
    if target and work is not None and Path(work).resolve() in Path(target).resolve().parents:
        where = "in the work dir; "
    text = where + describe_needs([(what, n) for what, _, n in needs])
    if free:
        text += "; " + ", ".join(f"{human_bytes(n)} was free on {base}" for base, n in free.items()) + " at the start"
    return text


def _place_outputs(staging: Path, output: Path, staged: dict[str, Path], multi: bool) -> None:
    """Move the finished outputs from the staging directory to their places (the log beside a single file first,
    so that an output in place is a complete one), then drop the staging directory."""
    if multi:
        move_into_place(staging, output)
        return
    out = next(iter(staged.values()))
    if out.is_file():
        log = log_path(out)
        os.replace(log, log_path(output))
    move_into_place(out, output)
    remove_temp(staging)


def _save_imatrix(imatrix, path: Path, calib_set, force: bool) -> None:
    from quantkit.gguf.imatrix import Imatrix, write_imatrix

    im = Imatrix.from_canonical({n: s for n, (s, _) in imatrix.items()}, {n: c for n, (_, c) in imatrix.items()},
                                datasets=[str(calib_set.identity["source"])] if calib_set is not None else [],
                                chunk_count=calib_set.n_samples if calib_set is not None else 0,
                                chunk_size=calib_set.seqlen if calib_set is not None else 0)
    write_imatrix(path, im, force=force)
