"""quantkit's Python API: the same operations, names and arguments as the command line.

    import quantkit

    plan = quantkit.plan("models/mistral-nano", method="gptq", preset="w4a16-g128")
    result = quantkit.quantize("models/mistral-nano", "out/nano-gptq", method="gptq", preset="w4a16-g128")
    report = quantkit.evaluate("out/nano-gptq", "evaltext/prose.txt", ref="models/mistral-nano", max_windows=8)
    print(report.ppl, report.kld_mean)
    model = quantkit.load("out/nano-gptq")
    print(model.generate("Once upon a time", max_tokens=32).text)

Every function takes a path (or a hub id where the CLI does), returns a result object with `to_dict()` (the CLI's
`--json`) and `render()` (the CLI's text), raises `quantkit.QuantkitError` subclasses for bad input, and never
prints: progress bars (stderr) only with `progress=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from quantkit.eval.perplexity import DEFAULT_CONVENTION
from quantkit.pipeline.plan import Plan
from quantkit.pipeline.quantize import QuantizeOptions, QuantizeResult, make_plan, quantize_checkpoint
from quantkit.quant.head_hessian import CLUSTERS as HEAD_CLUSTERS
from quantkit.runtime.generate import GenerationResult, Generator, resolve_sampling

if TYPE_CHECKING:
    from quantkit.eval.card import ReportCard
    from quantkit.eval.run import EvalReport
    from quantkit.eval.verify import VerifyResult
    from quantkit.formats.inspect import Inspection


def plan(model: str | Path, *, method: str = "rtn", preset: str | None = None,
         formats: str | Sequence[str] | None = None, gguf_type: str | None = None, overrides: Sequence[str] = (),
         act_order: bool | None = None, calib: str | None = None, calib_samples: int = 128, calib_seqlen: int = 512,
         device: str = "cpu", imatrix: str | Path | None = None) -> Plan:
    """What `quantize` would do with the same arguments: every tensor's target, sizes per format, BPW, memory.

    method: "rtn" | "gptq" | "awq". preset: an integer scheme (w4a16-g128, w8a16, ...); gguf_type: a llama-quantize
    file type (Q4_K_M, Q8_0, ...), which implies formats="gguf". formats: "gptq", "awq", "compressed-tensors",
    "gguf", "dump", or several ("gptq,compressed-tensors"). overrides: per-tensor schemes ('re:.*down_proj=w8a16',
    '-:REGEX' keeps float)."""
    from quantkit.model.checkpoint import open_checkpoint

    return make_plan(open_checkpoint(str(model)), method=method, preset=preset, formats=formats, gguf_type=gguf_type,
                     overrides=overrides, act_order=act_order, calib=calib, calib_samples=calib_samples,
                     calib_seqlen=calib_seqlen, device=device, has_imatrix=imatrix is not None)


def quantize(model: str | Path, output: str | Path, *, method: str = "rtn", preset: str | None = None,
             formats: str | Sequence[str] | None = None, gguf_type: str | None = None, overrides: Sequence[str] = (),
             act_order: bool | None = None, calib: str | None = None, calib_samples: int = 128,
             calib_seqlen: int = 512, seed: int = 0, device: str = "cpu", damp: float = 0.1, block_size: int = 128,
             group_aware: bool = True, head_clusters: int = HEAD_CLUSTERS, refine_sweeps: int = 0,
             compute_dtype: str = "auto",
             imatrix: str | Path | None = None, imatrix_out: str | Path | None = None,
             shard_size: str | int = "5GB",
             work_dir: str | Path | None = None, resume: bool = True, force: bool = False, progress: bool = False,
             log: Callable[[str], None] | None = None, target_bpw: float | None = None,
             target_size: str | int | None = None, candidates: str | Sequence[str] | None = None,
             sensitivity: str | Path | None = None, sensitivity_samples: int = 16,
             sensitivity_seqlen: int = 256, activation_rounding: str = "llama.cpp-cpu") -> QuantizeResult:
    """Quantize `model` layer by layer and write every requested format under `output` (one format: `output` itself;
    several: `output/<format>`). Arguments as in `plan`, plus: calib (builtin, a .txt/.jsonl/.parquet file or
    directory; default builtin for gptq/awq), damp/block_size/group_aware (GPTQ; group_aware: groups and their
    columns in order of importance unless act_order), head_clusters (GPTQ of a quantized lm_head: its rows in this
    many clusters, each rounded against the KL divergence's Hessian of its contexts; 1: the shared input Hessian of
    every linear), refine_sweeps (GPTQ: sweeps of coordinate descent on the codes after the solve, each weight moved
    one code when that lowers GPTQ's loss; 0: none, GPTQModel's result), compute_dtype (auto, float32 or bfloat16:
    what GPTQ's calibration forwards and Hessian products, and AWQ's scale-search forwards, run in; auto = bfloat16
    for a bf16 checkpoint), imatrix (GGUF: a llama.cpp importance matrix to use), imatrix_out (save the collected
    one), shard_size (largest safetensors shard of the HF-layout outputs, "5GB" or bytes), work_dir/resume (an
    interrupted run with the same arguments continues from its last completed layer), force (replace an existing
    output), log (receives one-line notices such as "resuming from layer 3/6").

    Under a size budget: target_bpw (bits per weight) or target_size ("3.9GB", bytes), instead of gguf_type /
    preset, measures the KLD of each tensor (GGUF) or fused group of linears (gptq, compressed-tensors) in each of
    `candidates` (GGUF default `pipeline.allocate.DEFAULT_CANDIDATES`, IQ1_M to Q8_0; presets default w2a16-g64,
    w3a16-g128, w4a16-g128, w4a16-g32, w8a16-g128) on `sensitivity_samples` windows of `sensitivity_seqlen` tokens
    of `calib` (cached in `sensitivity`, default under ~/.cache/quantkit; with method gptq each candidate is
    measured GPTQ-rounded, with the run's GPTQ options, on Hessians of as many tokens as the run's calibration, from
    other windows), chooses the targets with the least predicted KLD that fit, writes them, and reports predicted
    against measured KLD (`result.allocation`). GGUF products are measured as `activation_rounding` says:
    "llama.cpp-cpu" (each input rounded to the weight type's vec_dot_type, as llama.cpp's CPU backend does) or
    "none" (exact float products)."""
    from quantkit.io import parse_size
    from quantkit.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(model))
    allocation = None
    if target_bpw is not None or target_size is not None:
        from quantkit.eval.run import progress_wrapper
        from quantkit.pipeline.allocate import allocate_types, check_target_arguments

        fmt = check_target_arguments(formats, gguf_type, preset, overrides)
        if isinstance(candidates, str):
            candidates = [c.strip() for c in candidates.split(",") if c.strip()]
        allocation = allocate_types(
            ckpt, fmt, target_bpw=target_bpw, target_bytes=None if target_size is None else parse_size(target_size),
            candidates=candidates, calib=calib or "builtin", calib_samples=sensitivity_samples,
            calib_seqlen=sensitivity_seqlen, seed=seed, imatrix=Path(imatrix) if imatrix is not None else None,
            sensitivity=Path(sensitivity) if sensitivity is not None else None,
            gptq={"damp": damp, "block_size": block_size, "group_aware": group_aware,
                  "refine_sweeps": refine_sweeps} if method == "gptq" else None,
            head_clusters=head_clusters, gptq_samples=calib_samples, gptq_seqlen=calib_seqlen,
            activation_rounding=activation_rounding, progress=progress_wrapper(progress, "sensitivity"))
        formats, overrides = fmt, allocation.overrides()
        if fmt == "gguf":
            gguf_type, imatrix = allocation.base, allocation.imatrix_path
        else:
            preset = allocation.base
    the_plan = make_plan(ckpt, method=method, preset=preset, formats=formats, gguf_type=gguf_type,
                         overrides=overrides, act_order=act_order, calib=calib, calib_samples=calib_samples,
                         calib_seqlen=calib_seqlen, device=device, has_imatrix=imatrix is not None,
                         compute_dtype=compute_dtype)
    options = QuantizeOptions(calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed,
                              device=device, damp=damp, block_size=block_size, group_aware=group_aware,
                              head_clusters=head_clusters, refine_sweeps=refine_sweeps,
                              imatrix=Path(imatrix) if imatrix is not None else None,
                              imatrix_out=Path(imatrix_out) if imatrix_out is not None else None,
                              max_shard_bytes=parse_size(shard_size),
                              work_dir=Path(work_dir) if work_dir is not None else None, resume=resume, force=force,
                              progress=progress,
                              embedding_hessian=allocation.embedding_hessian if allocation is not None else None)
    result = quantize_checkpoint(ckpt, the_plan, output, options, log=log)
    if allocation is not None:
        allocation.measure(ckpt, result.paths[allocation.format])
        result.allocation = allocation
    return result


def convert(src: str | Path, output: str | Path, *, format: str, dtype: str | None = None,
            shard_size: str = "5GB", gguf_type: str | None = None, imatrix: str | Path | None = None,
            force: bool = False, progress: bool = False) -> Path:
    """Unquantized conversion (format "hf" or "consolidated": layout, dtype bf16/f16/f32, shard size) or data-free
    GGUF conversion (format "gguf", gguf_type BF16/F16/F32/Q8_0/... with an optional importance matrix), byte-
    identical to llama.cpp's tools. Returns the output path."""
    from quantkit.pipeline.convert import convert as run_convert

    return run_convert(str(src), Path(output), format, dtype=dtype, shard_size=shard_size, gguf_type=gguf_type,
                       imatrix=Path(imatrix) if imatrix is not None else None, force=force, progress=progress)


def evaluate(model: str | Path, text: str | Path, *, ref: str | Path | None = None,
             convention: str = DEFAULT_CONVENTION,
             ctx: int | None = None, max_windows: int | None = None, spread: bool = False, device: str = "cpu",
             backend: str = "auto", dtype: str | None = None, cache_dequant: bool = False,
             tokenizer: str | Path | None = None, progress: bool = False,
             report_dir: str | Path | None = None) -> EvalReport:
    """Perplexity ± standard error of `model` on `text` in a named convention ("llamacpp", the default of every
    entry point: llama-perplexity's chunks, default ctx 512; "gptq": non-overlapping windows, default ctx 2048);
    with `ref`, also KL divergence, same-top-token % and Δp against the reference model, on the same windows as
    `quantkit compare`. Returns an EvalReport (`.ppl`, `.to_dict()`, ...)."""
    from quantkit.eval.run import evaluate as run_evaluate

    return run_evaluate(str(model), str(text), ref=str(ref) if ref is not None else None, convention=convention,
                        ctx=ctx, max_windows=max_windows, spread=spread, device=device, backend=backend, dtype=dtype,
                        cache_dequant=cache_dequant, tokenizer=str(tokenizer) if tokenizer is not None else None,
                        progress=progress, report_dir=str(report_dir) if report_dir is not None else None)


def report(outputs: Sequence[str | Path], text: str | Path, output: str | Path, *, ref: str | Path | None = None,
           ref_logits: str | Path | None = None, convention: str = DEFAULT_CONVENTION, ctx: int | None = None,
           max_windows: int | None = None, mass: float = 0.99, device: str = "cpu", backend: str = "auto",
           dtype: str | None = None, tokenizer: str | Path | None = None, force: bool = False,
           progress: bool = False, log: Callable[[str], None] | None = None) -> ReportCard:
    """A report card of several `outputs` against one reference on `text`, written to the directory `output`:
    report.json (format, size, BPW, PPL ± err, ΔPPL, KLD mean/median/p99, same-top %, per-layer error of each
    output), report.md with PNG plots (KLD vs BPW, per-layer error, KLD distribution), and the reference's compact
    logits (reference-logits.safetensors: per position the most likely tokens holding `mass` of the probability)
    that `ref_logits=` reuses instead of `ref`.
    Returns a ReportCard (`.rows`, `.to_dict()`, `.render()`)."""
    from quantkit.eval.card import report_card

    return report_card(outputs, text, output, ref=ref, ref_logits=ref_logits, convention=convention, ctx=ctx,
                       max_windows=max_windows, mass=mass, device=device, backend=backend, dtype=dtype,
                       tokenizer=tokenizer, force=force, progress=progress, log=log)


def verify(outputs: str | Path | Sequence[str | Path], ref: str | Path, *, client: str = "transformers",
           use_client: bool = True, text: str | Path | None = None, ctx: int = 256, max_windows: int = 4,
           tol: float = 1e-3, vllm_dtype: str = "float16", tolerances: dict[str, float] | None = None
           ) -> list[VerifyResult]:
    """Read each output with quantkit and with its real client ("transformers": transformers + gptqmodel /
    compressed-tensors; "vllm": vLLM's CPU build in its own venv, several outputs in one process) and compare their
    predictions on built-in prompts or windows of `text`, and against `ref`. One VerifyResult per output: `.failed`
    when the client disagrees beyond the tolerances or did not run (`use_client=False` checks quantkit's reader
    only); `.failure()` says why, `.to_dict()` is `quantkit verify --json`. Nothing is raised for a disagreement."""
    from quantkit.eval.verify import verify_many

    outs = [outputs] if isinstance(outputs, (str, Path)) else list(outputs)
    return verify_many(outs, ref, tol=tol, use_client=use_client, client=client, text=text, ctx=ctx,
                       max_windows=max_windows, vllm_dtype=vllm_dtype, tolerances=tolerances)


def inspect(path: str | Path) -> Inspection:
    """Architecture, parameters, dtypes, shards, sizes, config and tokenizer checks of any checkpoint (full precision,
    GGUF, GPTQ, AWQ, compressed-tensors), without loading weights. `.to_dict()` is `quantkit inspect --json`."""
    from quantkit.formats.inspect import inspect_path

    return inspect_path(str(path))


@dataclass
class Generation:
    """Generated text and the token-level result (ids, prefill/decode timings)."""

    text: str
    result: GenerationResult

    @property
    def tokens(self) -> list[int]:
        return self.result.tokens


@dataclass
class Model:
    """A checkpoint loaded for inference: the network (quantized weights stay compressed), its tokenizer, and what
    was loaded (`info`: format, device, backend, weight types)."""

    net: torch.nn.Module
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] of one token sequence (no cache)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).view(1, -1)
        return self.net(ids)[0]

    def generate(self, prompt: str, *, max_tokens: int = 128, chat: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 compile: bool = False) -> Generation:
        """Continue `prompt` (or answer it in the model's own chat template when `chat`). Sampling as `quantkit
        generate`: what is not given comes from the model's generation_config.json, else temperature 0.8, top-k
        40, top-p 0.95 (`info["sampling"]`); temperature=0 is greedy, `seed` repeats a sampled run."""
        tok = self.tokenizer
        ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt, bos=True)
        limit = self.net.config.max_position_embeddings
        gen = Generator(self.net, max_len=min(len(ids) + max_tokens + 1, limit), compile=compile)
        params = resolve_sampling(temperature, top_k, top_p, seed, self.info.get("sampling"))
        result = gen.generate(ids, max_tokens, params, eos_id=tok.eos_id)
        out = [t for t in result.tokens if t != tok.eos_id]
        return Generation(tok.decode(out), result)


def load(path: str | Path, *, device: str = "cpu", backend: str = "auto", dtype: str | None = None,
         cache_dequant: bool = False, cpu_kernels: bool = True) -> Model:
    """Load a full-precision checkpoint or any quantized output (GPTQ, AWQ, compressed-tensors directory, GGUF file)
    for inference, with its tokenizer. backend: "auto" (triton on CUDA, torch on CPU), "torch", "triton"."""
    from quantkit.runtime.loading import load_with_tokenizer

    net, tok = load_with_tokenizer(str(path), device=device, backend=backend, dtype=dtype,
                                   cache_dequant=cache_dequant, cpu_kernels=cpu_kernels)
    return Model(net, tok, dict(net.runtime_info))


def generate(model: str | Path, prompt: str, *, max_tokens: int = 128, chat: bool = False,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, device: str = "cpu",
             backend: str = "auto", dtype: str | None = None, compile: bool = False) -> Generation:
    """Load `model` and generate from `prompt` (see `Model.generate`)."""
    return load(model, device=device, backend=backend, dtype=dtype).generate(
        prompt, max_tokens=max_tokens, chat=chat, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        compile=compile)
