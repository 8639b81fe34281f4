"""The plan: every tensor's target, output size, bits per weight and the peak-memory estimate, before any work.

A target is what the pipeline turns one source tensor into:
  - a `Scheme`: integer group-affine QuantTensor (gptq, awq, compressed-tensors formats);
  - a ggml type name (`"Q4_K"`, `"Q6_K"`, `"F32"`, ...): GGUF blocks, from llama-quantize's mix for `--type`;
  - `None`: kept in floating point (embeddings, norms, lm_head; `-:` overrides).
Sizes come from each output format (`Format.stored_nbytes`: one size per format of a multi-format run); memory from
the largest layer, the calibration activations, the GPTQ Hessians and the writer's shard buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from quantkit.errors import SchemeError
from quantkit.formats.base import Target, get_format
from quantkit.formats.sizes import bits_per_weight
from quantkit.ggml_types import SUPPORTED_TYPES, check_type, is_block_type
from quantkit.gguf.mixes import FILE_TYPES, check_imatrix, tensor_types
from quantkit.model import arch
from quantkit.model.config import ModelConfig
from quantkit.quant.scheme import (
    PRESET_NOTES,
    PRESETS,
    Scheme,
    get_preset,
    module_name,
    parse_override,
    resolve_schemes,
    with_act_order,
)

COMPUTE_DTYPES = ("float32", "bfloat16")
METHODS = ("rtn", "gptq", "awq")
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "bfloat16": 2, "float16": 2, "float32": 4}
PROCESS_BASE_BYTES = 600 * 1024**2  # python + torch + libraries
FORWARD_BATCH = 8  # calibration samples per forward pass in the pipeline


def target_label(target: Target) -> str:
    if target is None:
        return "float"
    if isinstance(target, Scheme):
        return target.describe()
    return target


@dataclass
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    source_dtype: str
    target: Target
    bytes_in: int
    bytes_out: dict[str, int]  # output format -> bytes this tensor occupies there (each format reports its own)
    gguf_target: Target = None  # with integer formats and gguf in one run: the GGUF target (`target`: the integer)

    def label(self) -> str:
        """The target as `plan` prints it ("w4a16-g128 | Q4_K" when a GGUF companion differs)."""
        label = target_label(self.target)
        return label if self.gguf_target is None else f"{label} | {target_label(self.gguf_target)}"

    def target_for(self, fmt: str) -> Target:
        """What this tensor becomes in output format `fmt`."""
        return self.gguf_target if fmt == "gguf" and self.gguf_target is not None else self.target

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def bpw(self, fmt: str) -> float:
        """Bits per weight of this tensor alone in `fmt` (`bits_per_weight` of its stored bytes)."""
        return bits_per_weight(self.bytes_out[fmt], self.numel)

    @property
    def quantized(self) -> bool:
        return isinstance(self.target, Scheme) or (isinstance(self.target, str) and is_block_type(self.target))

    def to_dict(self) -> dict[str, Any]:
        t = self.target
        return {"name": self.name, "shape": list(self.shape), "source_dtype": self.source_dtype,
                "target": target_label(t), "scheme": t.to_dict() if isinstance(t, Scheme) else None,
                "ggml_type": t if isinstance(t, str) else self.gguf_target, "bytes_in": self.bytes_in,
                "bytes_out": dict(self.bytes_out), "bpw": {f: round(self.bpw(f), 4) for f in self.bytes_out}}


@dataclass
class Plan:
    config: ModelConfig
    entries: list[PlanEntry]
    method: str
    formats: list[str]
    preset: str | None
    gguf_type: str | None
    overrides: list[str]
    memory: dict[str, int] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    compute_dtype: str = "float32"  # the calibration forwards and Hessian products (GPTQ: resolve_compute_dtype)

    # ---- views ----

    def targets(self, fmt: str | None = None) -> dict[str, Target]:
        """Every tensor's target (in output format `fmt`: GGUF types in a run that also writes integer formats)."""
        return {e.name: e.target_for(fmt) if fmt else e.target for e in self.entries}

    @property
    def mixed(self) -> bool:
        """Integer formats and gguf from one calibration: the GGUF types are a companion target set."""
        return "gguf" in self.formats and len(self.formats) > 1

    @property
    def bytes_in(self) -> int:
        return sum(e.bytes_in for e in self.entries)

    def bytes_out(self, fmt: str) -> int:
        """Planned bytes of the output in format `fmt`."""
        return sum(e.bytes_out[fmt] for e in self.entries)

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    def bpw(self, fmt: str) -> float:
        """Planned bits per weight of the output in `fmt` (`bits_per_weight`: tensor bytes, all parameters)."""
        return bits_per_weight(self.bytes_out(fmt), self.numel)

    @property
    def bpw_in(self) -> float:
        return bits_per_weight(self.bytes_in, self.numel)

    def to_dict(self) -> dict[str, Any]:
        quantized = [e for e in self.entries if e.quantized]
        return {
            "method": self.method, "formats": self.formats, "preset": self.preset, "gguf_type": self.gguf_type,
            "overrides": self.overrides, "device": self.device, "calibration": self.calibration,
            **({"compute_dtype": self.compute_dtype} if self.method in ("gptq", "awq") else {}),
            "tensors": len(self.entries), "quantized_tensors": len(quantized),
            "bytes_in": self.bytes_in, "bpw_in": round(self.bpw_in, 4),
            "outputs": [{"format": f, "bytes": self.bytes_out(f), "bpw": round(self.bpw(f), 4),
                         "quantized_bpw": round(bits_per_weight(sum(e.bytes_out[f] for e in quantized),
                                                                sum(e.numel for e in quantized)), 4)}
                        for f in self.formats],
            "memory": self.memory,
            "entries": [e.to_dict() for e in self.entries],
        }

    def kept_in_float(self) -> list[str]:
        """Which tensors stay in floating point, and why: one line per reason (what `quantize` prints too)."""
        norms = [e for e in self.entries if not e.quantized and len(e.shape) == 1]
        overridden = [e for e in self.entries if not e.quantized and arch.is_quantizable_linear(e.name)]
        others = [e for e in self.entries if not e.quantized and e not in norms and e not in overridden]
        lines = []
        if norms:
            lines.append(f"{len(norms)} norm weights (1-D, {sum(e.numel for e in norms):,} values): no format "
                         "quantizes them")
        if others:
            names = ", ".join(e.name.removeprefix("model.") for e in others)
            why = ("the mix of this GGUF type keeps them" if self.gguf_type and not self.mixed else
                   f"in {'/'.join(self.formats)} only the decoder's linear layers are quantized (as GPTQModel, "
                   "llm-compressor and vLLM expect)")
            lines.append(f"{names} ({sum(e.numel for e in others) / max(self.numel, 1):.0%} of the parameters): "
                         f"{why}")
        if overridden:
            lines.append(f"{len(overridden)} linear weights: kept by --override")
        return lines

    def render(self, per_tensor: bool = True) -> str:
        """llama-quantize-style text: one line per tensor, then the size/BPW/memory summary."""
        mib = 1024**2
        lines = []
        n = len(self.entries)
        width = max((len(e.name) for e in self.entries), default=10)
        if per_tensor:
            first = self.formats[0]
            for i, e in enumerate(self.entries, 1):
                shape = "x".join(str(d) for d in e.shape)
                lines.append(f"[{i:4d}/{n:4d}] {e.name:<{width}}  [{shape:>11}] {e.source_dtype:>4} -> "
                             f"{e.label():<22} {e.bytes_in / mib:9.2f} MiB -> "
                             f"{e.bytes_out[first] / mib:9.2f} MiB ({e.bpw(first):5.2f} BPW)")
            if len(self.formats) > 1:
                lines.append(f"(per-tensor sizes: {first}; totals for every format below)")
        quantized = sum(1 for e in self.entries if e.quantized)
        what = " + ".join(w for w in (self.preset, self.gguf_type) if w)
        lines.append(f"plan: method {self.method}, {what}, format {','.join(self.formats)}: {quantized} tensors "
                     f"quantized, {n - quantized} kept")
        lines += [f"kept in float: {line}" for line in self.kept_in_float()]
        lines.append(f"model size  = {self.bytes_in / mib:10.2f} MiB ({self.bpw_in:.2f} BPW)")
        for f in self.formats:
            lines.append(f"quant size  = {self.bytes_out(f) / mib:10.2f} MiB ({self.bpw(f):.2f} BPW)  "
                         f"{100 * (self.bytes_out(f) / max(self.bytes_in, 1) - 1):+.1f}%  [{f}]")
        mem = f"estimated peak RAM {self.memory['peak_ram_bytes'] / 1024**3:.2f} GiB"
        if self.method == "gptq":
            mem += f" (calibration forward in {self.compute_dtype})"
        elif self.method == "awq":
            mem += f" (scale search in {self.compute_dtype})"
        if "peak_vram_bytes" in self.memory:
            mem += f", peak VRAM {self.memory['peak_vram_bytes'] / 1024**3:.2f} GiB"
        lines.append(mem)
        return "\n".join(lines)


# ---- building ----

def _source_dtype(ckpt, name: str, config: ModelConfig) -> str:
    if ckpt is not None and name in ckpt.tensors:
        return ckpt.tensors[name].dtype
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(config.torch_dtype, "BF16")


def _split_overrides(overrides, mixed) -> tuple[list[str], list[str]]:
    """(integer-format overrides, GGUF overrides). In a run writing both, an override whose value is a ggml type
    name (`re:.*down_proj=Q6_K`) applies to the GGUF file, any other (a preset, `-:` keep float) to the integer
    formats; otherwise all apply to the run's one kind."""
    overrides = list(overrides)
    if not mixed:
        return overrides, overrides
    ggml = [o for o in overrides if "=" in o and o.rsplit("=", 1)[1].upper() in SUPPORTED_TYPES]
    return [o for o in overrides if o not in ggml], ggml


def _gguf_targets(config: ModelConfig, gguf_type: str, overrides: list[str], has_imatrix: bool) -> dict[str, str]:
    types = tensor_types(config, gguf_type, has_imatrix=has_imatrix)
    for text in overrides:
        if "=" not in text:
            raise SchemeError(f"override {text!r}: for GGUF use PATTERN=TYPE (e.g. 're:.*ffn_down.*=Q6_K')")
        pattern, type_name = text.rsplit("=", 1)
        type_name = type_name.upper()
        check_type(type_name)
        regex = pattern[3:] if pattern.startswith("re:") else re.escape(pattern)
        for name in types:
            if (re.fullmatch(regex, name) or re.fullmatch(regex, module_name(name))
                    or re.fullmatch(regex, arch.to_gguf(name))):
                types[name] = type_name
    check_imatrix(types, gguf_type, has_imatrix)
    return types


def _int_targets(config: ModelConfig, preset: str, overrides: list[str], act_order: bool | None) -> dict[str, Target]:
    default = with_act_order(get_preset(preset), act_order)
    parsed = [parse_override(o) for o in overrides]
    if act_order is not None:
        parsed = [type(o)(o.pattern, with_act_order(o.scheme, act_order) if o.scheme else None) for o in parsed]
    names = arch.canonical_names(config.num_hidden_layers)
    shapes = config.expected_shapes()
    linears = [module_name(n) for n in names if arch.is_quantizable_linear(n)]
    chosen = resolve_schemes(linears, default, parsed)
    targets: dict[str, Target] = {}
    for n in names:
        if n not in shapes:
            continue
        target = chosen.get(module_name(n)) if arch.is_quantizable_linear(n) else None
        if isinstance(target, Scheme):
            target.check_shape(n, shapes[n])
        targets[n] = target
    return targets


def resolve_compute_dtype(choice: str, linear_dtypes: set[str]) -> str:
    """What GPTQ's calibration forwards and Hessian products run in: `choice` (float32, bfloat16), or for "auto"
    the dtype the model's linear weights are stored in (`linear_dtypes`, e.g. {"BF16"}) when that is bfloat16 —
    as GPTQModel runs a bf16 model; bf16 matmuls are 4-5x faster than fp32 on CPUs with AMX/AVX512-BF16 and on
    GPUs — else float32."""
    if choice == "auto":
        return "bfloat16" if linear_dtypes == {"BF16"} else "float32"
    if choice not in COMPUTE_DTYPES:
        raise SchemeError(f"--compute-dtype {choice}: expected auto, {' or '.join(COMPUTE_DTYPES)}")
    return choice


def estimate_memory(config: ModelConfig, targets: dict[str, Target], method: str, n_samples: int, seqlen: int,
                    device: str = "cpu", source_bytes: int = 2, compute_bytes: int = 4) -> dict[str, int]:
    """Peak RAM (and VRAM with a CUDA device) of the layer-wise pipeline, in bytes (an estimate). Output files are
    streamed to disk (HF shards through a spill file), so no writer buffer counts. `compute_bytes`: 2 when GPTQ's
    calibration runs in bf16 (the layer, the activations and the forward's temporaries halve)."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = config.expected_shapes()
    layer_params = sum(int(s[0]) * (int(s[1]) if len(s) > 1 else 1)
                       for n, s in shapes.items() if n.startswith("model.layers.0."))
    cb = compute_bytes if method == "gptq" else 4
    layer_compute = layer_params * cb
    calibrated = method in ("gptq", "awq") or any(isinstance(t, str) and is_block_type(t)
                                                 for t in targets.values()) and n_samples > 0
    # layer inputs + outputs; GPTQ also caches the attention core and the mid-layer residual
    acts = (2 * h + (config.q_size + h if method == "gptq" else 0)) * n_samples * seqlen * cb if calibrated else 0
    batch = min(n_samples, FORWARD_BATCH)
    workspace = (batch * seqlen * max(3 * f, 4 * h) * cb + batch * config.num_attention_heads * seqlen * seqlen * 4
                 if calibrated else 0)
    largest_in = max(h, f, config.q_size)
    hessian = (largest_in**2 * 4) * 3 if method == "gptq" else 0  # H, the flipped copy, its Cholesky factor
    # AWQ (quant/awq.py): the larger of two moments. After the capture, the inputs of q_proj, o_proj, gate_proj
    # (3 x hidden wide) and down_proj in fp32; each is freed after its last search. The down_proj search holds its
    # input in fp32 while converting it to the search dtype, beside its reference output (in the search dtype and
    # in fp32; a search in fp32 also keeps an fp32 and an fp64 buffer that wide) and the layer's copy in bf16
    tokens = n_samples * seqlen
    if compute_bytes != 4:
        awq_down = tokens * f * (4 + compute_bytes) + tokens * h * (compute_bytes + 4) + layer_params * compute_bytes
    else:
        awq_down = tokens * f * 4 + tokens * h * (4 + 4 + 8)
    awq_extra = max(tokens * (f + 3 * h) * 4, awq_down) if method == "awq" else 0
    quant_work = max(int(s[0]) * int(s[1])
                     for n, s in shapes.items() if n.startswith("model.layers.0.") and len(s) == 2) * 4 * 3
    # the source layer stays beside the compute copy unless they are the same tensors (bf16 source, bf16 compute)
    source_layer = 0 if cb == source_bytes else layer_params * source_bytes
    layer_phase = layer_compute + source_layer + acts + workspace + hessian + awq_extra + quant_work
    head_phase = v * h * (4 * 3 + source_bytes)  # embedding / lm_head in fp32 + quantizer work
    out = {"peak_ram_bytes": PROCESS_BASE_BYTES + max(layer_phase, head_phase),
           "layer_bytes": layer_params * source_bytes, "activation_bytes": acts, "hessian_bytes": hessian}
    if device.startswith("cuda"):
        out["peak_vram_bytes"] = (layer_compute + acts // 2 + workspace + hessian + awq_extra + quant_work
                                  + 512 * 1024**2)
        out["peak_ram_bytes"] -= workspace + hessian
    return out


def build_plan(config: ModelConfig, *, preset: str | None = "w4a16-g128", formats: list[str] = ("gptq",),
               gguf_type: str | None = None, overrides: list[str] = (), method: str = "rtn",
               act_order: bool | None = None, n_samples: int = 128, seqlen: int = 512, device: str = "cpu",
               checkpoint=None, has_imatrix: bool = False, compute_dtype: str = "auto") -> Plan:
    """The plan for quantizing a model of `config` (optionally the opened checkpoint, for the source dtypes)."""
    formats = list(formats)
    if method not in METHODS:
        raise SchemeError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if not formats:
        raise SchemeError("no output format given")
    gguf = "gguf" in formats
    int_formats = [f for f in formats if f != "gguf"]
    int_overrides, gguf_overrides = _split_overrides(overrides, gguf and bool(int_formats))
    gguf_targets: dict[str, Target] = {}
    if gguf:
        if not gguf_type:
            raise SchemeError("--format gguf needs --type (e.g. --type Q4_K_M)")
        if method == "awq":
            raise SchemeError("--method awq writes integer group schemes; for GGUF use --method rtn or gptq")
        gguf_targets = dict(_gguf_targets(config, gguf_type, gguf_overrides, has_imatrix or method != "rtn"))
        targets: dict[str, Target] = gguf_targets
    elif gguf_type:
        raise SchemeError(f"--type {gguf_type} applies to --format gguf only")
    if int_formats:
        fmts = [get_format(f) for f in int_formats]  # FormatError names the known formats
        preset = preset or ("w4a16-g128-asym" if method == "awq" else "w4a16-g128")  # AWQ's usual zero-point scheme
        targets = _int_targets(config, preset, int_overrides, act_order)
        for scheme in {t for t in targets.values() if isinstance(t, Scheme)}:
            for f in fmts:
                f.check_scheme(scheme)
            if method == "awq" and scheme.act_order:
                raise SchemeError("--act-order is a GPTQ option; AWQ does not reorder columns")
    shapes = config.expected_shapes()
    entries = []
    fmts = {f: get_format(f) for f in formats}
    for name, target in targets.items():
        shape = tuple(shapes[name])
        dtype = _source_dtype(checkpoint, name, config)
        numel = 1
        for d in shape:
            numel *= d
        float_bytes = DTYPE_BYTES.get(dtype, 2)
        entry = PlanEntry(name, shape, dtype, target, numel * float_bytes, {},
                          gguf_targets[name] if gguf and int_formats else None)
        entry.bytes_out = {f: fmt.stored_nbytes(entry.target_for(f), shape, float_bytes) for f, fmt in fmts.items()}
        entries.append(entry)
    plan = Plan(config, entries, method, formats, preset if int_formats else None, gguf_type,
                list(overrides), device=device,
                calibration={"n_samples": n_samples, "seqlen": seqlen} if method != "rtn" or has_imatrix else {})
    src_bytes = DTYPE_BYTES.get(entries[0].source_dtype, 2) if entries else 2
    calib_samples = n_samples if (method != "rtn" or has_imatrix) else 0
    linear_dtypes = {e.source_dtype for e in entries if arch.is_quantizable_linear(e.name)}
    # GPTQ's calibration and AWQ's scale search follow it; the imatrix pass runs in float32
    plan.compute_dtype = (resolve_compute_dtype(compute_dtype, linear_dtypes) if method in ("gptq", "awq")
                          else "float32")
    plan.memory = estimate_memory(config, targets, method, calib_samples, seqlen, device, src_bytes,
                                  DTYPE_BYTES[plan.compute_dtype])
    return plan


# ---- what --list-types / --list-presets show ----

REFERENCE_MODEL = "Mistral-7B"  # the shapes the listings are sized on: ModelConfig()'s defaults


def _listing_row(name: str, plan: Plan, fmt: str, description: str) -> dict[str, Any]:
    quantized = [e for e in plan.entries if e.quantized]
    return {"name": name, "bpw": round(plan.bpw(fmt), 2),
            "linear_bpw": round(bits_per_weight(sum(e.bytes_out[fmt] for e in quantized),
                                                sum(e.numel for e in quantized)), 2),
            "description": description}


def list_gguf_types(config: ModelConfig | None = None) -> list[dict[str, Any]]:
    """Every GGUF file type `--type` takes: name, bits per weight of a whole model of `config` (default Mistral-7B's
    shapes; `bits_per_weight`, llama-quantize's per-tensor mix with an imatrix, which the types below IQ3_S need),
    of its quantizable linears, and a description."""
    config = config or ModelConfig()
    return [_listing_row(name, build_plan(config, formats=["gguf"], gguf_type=name, has_imatrix=True), "gguf",
                         ft.description) for name, ft in FILE_TYPES.items()]


def list_presets(config: ModelConfig | None = None, fmt: str = "gptq") -> list[dict[str, Any]]:
    """Every integer preset `--preset` takes: name, scheme, bits per weight of a whole model of `config` (default
    Mistral-7B's shapes; embeddings and lm_head stay 16-bit) and of its quantized linears in format `fmt`, and a
    description."""
    config = config or ModelConfig()
    rows = []
    for name, scheme in PRESETS.items():
        row = _listing_row(name, build_plan(config, preset=name, formats=[fmt]), fmt, PRESET_NOTES.get(name, ""))
        rows.append({**row, "scheme": scheme.describe()})
    return rows


def render_listing(rows: list[dict[str, Any]], what: str, fmt: str | None = None) -> str:
    """The text of `--list-types` / `--list-presets`: one line per entry, then what the numbers mean."""
    width = max(len(r["name"]) for r in rows)
    lines = [f"{what:<{width}}  {'BPW':>5}  {'quantized':>9}  description"]
    for r in rows:
        quantized = f"{r['linear_bpw']:9.2f}" if r["linear_bpw"] else f"{'-':>9}"
        lines.append(f"{r['name']:<{width}}  {r['bpw']:5.2f}  {quantized}  {r['description']}")
    lines += [f"BPW: bits per weight of a whole {REFERENCE_MODEL}-shaped model" + (f", {fmt} format" if fmt else "")
              + ": stored tensor bytes x 8 / all parameters",
              "(embeddings, norms and lm_head included), as `plan` and `quantize` print it; quantized: of the "
              "quantized tensors only."]
    return "\n".join(lines)
