"""Targets chosen by measurement under a size budget (`quantize --target-bpw B`): ggml types per tensor for GGUF,
integer presets per fused group of linears for gptq / compressed-tensors.

1. calibration windows, and an importance matrix of the full-precision model over them (or the one given);
2. the sensitivity table (`eval/sensitivity.py`): the KL divergence of the model with one tensor in one candidate
   type, for every 2-D tensor (embedding and lm_head included) and every candidate — cached under
   `~/.cache/quantkit/sensitivity/` (or `--sensitivity FILE`), keyed by the model, the tokens and the imatrix, so
   a second budget costs no measurement;
3. the assignment with the least predicted KLD (the sum of the per-tensor KLDs) whose tensor bytes fit the budget
   (`quant/allocate.py`); 1-D tensors stay F32 and count against the budget.

GGUF is measured as llama.cpp's CPU backend computes it (`activation_rounding="llama.cpp-cpu"`, the default): that
backend rounds the input of every product to the weight type's vec_dot_type first — blocks of 256 (Q8_K) for the
k- and i-quants, of 32 (Q8_0 / Q8_1) for Q4_0 .. Q8_0 and IQ4_NL — so a candidate costs its weight's KLD plus the
measured KLD of its input's rounding. On mistral-nano that rounding is a sixth of a 5.5 BPW file's divergence
in llama-perplexity, most of it in down_proj, whose input Q8_K rounds coarsely. "none" measures exact float
products (what a backend that dequantizes weights and multiplies in float computes).

The result is an ordinary `quantize` run with one override per tensor and the same imatrix, so every tensor is
encoded as it was when it was measured.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.cache import cache_dir
from quantkit.errors import SchemeError
from quantkit.ggml_types import check_type, is_float_type
from quantkit.gguf.mixes import FILE_TYPES
from quantkit.quant.allocate import Option, allocate

# GGUF: from 1.75 to 8.5 bits per weight (IQ1_M, IQ2_XXS and IQ2_S only where the tensor has an imatrix entry)
# (IQ4_NL, Q4_1, Q5_0 and Q5_1: finer activation blocks on llama.cpp's CPU backend)
DEFAULT_CANDIDATES = ("IQ1_M", "IQ2_XXS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "IQ4_NL", "Q4_K",
                      "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0")
DEFAULT_PRESETS = ("w2a16-g64", "w3a16-g128", "w4a16-g128", "w4a16-g32", "w8a16-g128")  # gptq, compressed-tensors
ALLOCATABLE_FORMATS = ("gguf", "gptq", "compressed-tensors")
ACTIVATION_ROUNDINGS = ("llama.cpp-cpu", "none")  # how GGUF products are measured (module docstring)


@dataclass
class Allocation:
    """The measured choice: a target per tensor (a ggml type, or an integer preset for the HF formats), its bytes
    against the budget, the predicted KLD."""

    format: str
    targets: dict[str, str]  # canonical name -> ggml type (every tensor) / preset (every decoder linear)
    budget_bytes: int
    tensor_bytes: int
    parameters: int
    predicted_kld: float
    base: str  # GGUF: the general.file_type label (the mix whose default type holds most parameters); else the
    # preset holding most parameters
    sensitivity_path: Path
    imatrix_path: Path | None
    measured: int  # (tensor, type) pairs measured by this call (0: all from the cache)
    tokens: Any = field(default=None, repr=False)  # the calibration windows measured on (int64 [n, seqlen])
    embedding_hessian: Path | None = None  # GPTQ: the embedding's Fisher matrix it was measured with (and is written)
    measured_kld: float | None = None  # of the written file, on the same tokens (set after the run)
    activation_rounding: str = "none"  # GGUF: "llama.cpp-cpu" measures each product as that backend rounds it

    @property
    def bpw(self) -> float:
        return 8 * self.tensor_bytes / self.parameters

    @property
    def target_bpw(self) -> float:
        return 8 * self.budget_bytes / self.parameters

    def overrides(self) -> list[str]:
        """One `--override` per tensor: exact names for GGUF, `re:` of the module name for the integer formats."""
        if self.format == "gguf":
            return [f"{name}={t}" for name, t in self.targets.items()]
        return [f"re:{re.escape(name.removesuffix('.weight'))}={t}" for name, t in self.targets.items()]

    def histogram(self) -> dict[str, int]:
        return dict(sorted(Counter(self.targets.values()).items()))

    def to_dict(self) -> dict[str, Any]:
        return {"target_bpw": round(self.target_bpw, 4), "budget_bytes": self.budget_bytes,
                "tensor_bytes": self.tensor_bytes, "bpw": round(self.bpw, 4),
                "predicted_kld": self.predicted_kld, "format": self.format, "base": self.base,
                "targets": self.targets, "histogram": self.histogram(), "sensitivity": str(self.sensitivity_path),
                "imatrix": None if self.imatrix_path is None else str(self.imatrix_path),
                "embedding_hessian": None if self.embedding_hessian is None else str(self.embedding_hessian),
                "measured_pairs": self.measured,
                "measured_kld": self.measured_kld, "activation_rounding": self.activation_rounding}

    def render(self) -> str:
        hist = ", ".join(f"{t} {n}" for t, n in self.histogram().items())
        lines = [f"allocation: {self.bpw:.3f} BPW for a budget of {self.target_bpw:.3f} ({self.tensor_bytes:,} of "
                 f"{self.budget_bytes:,} bytes); tensors: {hist}",
                 f"KLD on the {self.n_tokens} calibration tokens{self._numerics()}: predicted "
                 f"{self.predicted_kld:.6f}"]
        if self.measured_kld is not None:
            ratio = self.predicted_kld / self.measured_kld if self.measured_kld > 0 else float("inf")
            lines[-1] += f", measured {self.measured_kld:.6f} (predicted/measured {ratio:.2f})"
        return "\n".join(lines)

    def _numerics(self) -> str:
        return " (products as llama.cpp's CPU backend rounds them)" if self.activation_rounding != "none" else ""

    @property
    def n_tokens(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.numel())

    def measure(self, ckpt, output: Path) -> float:
        """Load the written output and set `measured_kld`: its KLD from `ckpt` on the tokens measured on, with the
        products computed as they were measured (`activation_rounding`)."""
        from quantkit.eval.sensitivity import model_kld
        from quantkit.runtime.model import load_model

        model = load_model(output, fuse=self.activation_rounding == "none")  # rounded: q, k, v each by its type
        if self.activation_rounding == "llama.cpp-cpu":
            from quantkit.gguf.activations import round_inputs

            round_inputs(model, self.targets)
        self.measured_kld = model_kld(ckpt, self.tokens, model)
        return self.measured_kld


def _identity(ckpt, tokens_sha: str, imatrix_sha: str, gptq: dict[str, Any] | None = None,
              head_clusters: int = 1, hessian_tokens_sha: str | None = None) -> dict[str, Any]:
    identity = {"model": ckpt.fingerprint(), "tokens_sha256": tokens_sha, "imatrix_sha256": imatrix_sha}
    if gptq is None:
        return identity
    gptq = {**gptq, "head_clusters": head_clusters, "hessian_tokens_sha256": hessian_tokens_sha}
    return {**identity, "gptq": dict(sorted(gptq.items()))}


def _key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def budget_bytes(parameters: int, target_bpw: float | None, target_bytes: int | None) -> int:
    if (target_bpw is None) == (target_bytes is None):
        raise SchemeError("give exactly one of --target-bpw and --target-size")
    if target_bytes is not None:
        return int(target_bytes)
    if not 1.0 <= target_bpw <= 32.0:
        raise SchemeError(f"--target-bpw {target_bpw}: expected bits per weight between 1 and 32")
    return int(target_bpw * parameters / 8)


def _base(fmt: str, targets: dict[str, str], numel: dict[str, int]) -> str:
    """The label of the whole allocation: the target holding the most parameters (GGUF: the file type whose default
    type it is, for general.file_type)."""
    weight = Counter()
    for name, t in targets.items():
        weight[t] += numel[name]
    ranked = [t for t, _ in weight.most_common() if not is_float_type(t)]
    if fmt != "gguf":
        return ranked[0]
    for t in ranked:
        for ft in FILE_TYPES.values():
            if ft.default_type == t:
                return ft.name
    return "Q4_K_M"


def _plan_entries(ckpt, fmt: str):
    """The plan's entries of `ckpt` in `fmt` (any target): shapes, source dtypes, and the bytes of what stays float."""
    from quantkit.pipeline.plan import build_plan

    if fmt == "gguf":
        return build_plan(ckpt.config, formats=["gguf"], gguf_type="Q8_0", checkpoint=ckpt).entries
    return build_plan(ckpt.config, formats=[fmt], preset="w4a16-g128", checkpoint=ckpt).entries


def _int_units(entries) -> dict[str, list[str]]:
    """The linears of the decoder grouped as engines fuse them (q/k/v, gate/up): one scheme per group."""
    from quantkit.model.arch import LINEAR_GROUPS

    linear = {e.name for e in entries if e.quantized}
    units: dict[str, list[str]] = {}
    for e in entries:
        if e.name not in linear or ".layers." not in e.name:
            continue
        prefix, _, rest = e.name.partition(".layers.")
        index, _, local = rest.partition(".")
        local = local.removesuffix(".weight")
        group = next(g for g in LINEAR_GROUPS if local in g)
        members = [f"{prefix}.layers.{index}.{m}.weight" for m in group]
        units.setdefault("|".join(members), [m for m in members if m in linear])
    return units


def allocate_types(ckpt, fmt: str = "gguf", *, target_bpw: float | None = None, target_bytes: int | None = None,
                   candidates: Iterable[str] | None = None, calib: str = "builtin", calib_samples: int = 16,
                   calib_seqlen: int = 256, seed: int = 0, imatrix: Path | None = None,
                   sensitivity: Path | None = None, gptq: dict[str, Any] | None = None, head_clusters: int = 1,
                   gptq_samples: int = 128, gptq_seqlen: int = 512, activation_rounding: str = "llama.cpp-cpu",
                   progress: Callable[[Iterable], Iterable] | None = None) -> Allocation:
    """Measure (or reuse) the sensitivity of `ckpt` to every candidate and choose the targets for the budget.
    `gptq`: the run rounds with GPTQ, with these options of `GPTQ.quantize` (damp, block_size, group_aware), and
    each candidate is measured rounded so, on the full-precision model's Hessians of `gptq_samples` × `gptq_seqlen`
    tokens of `calib` (the run's calibration size; other windows than the run's and the measured ones: those of the
    next seed), lm_head's with `head_clusters` KL-weighted row clusters as the run rounds it.

    GGUF: a ggml type per 2-D tensor (embedding and lm_head included), each product measured as
    `activation_rounding` says (module docstring). gptq / compressed-tensors: an integer
    preset per fused group of decoder linears (written as GPTQ `dynamic` rules / compressed-tensors config groups);
    embeddings, lm_head and norms stay float there and count against the budget."""
    from quantkit.calib import load_calibration
    from quantkit.eval.sensitivity import ggml_candidates, measure_sensitivity, scheme_candidates
    from quantkit.formats.base import get_format
    from quantkit.gguf.activations import VEC_DOT_TYPE
    from quantkit.gguf.imatrix import read_imatrix, write_imatrix
    from quantkit.io import sha256_file
    from quantkit.model.tokenizer import load_tokenizer
    from quantkit.pipeline.imatrix import collect_imatrix
    from quantkit.pipeline.plan import DTYPE_BYTES
    from quantkit.quant.scheme import get_preset

    gguf = fmt == "gguf"
    if fmt not in ALLOCATABLE_FORMATS:
        raise SchemeError(f"--target-bpw/--target-size: {fmt} cannot hold a different scheme per module "
                          f"(allocatable: {', '.join(ALLOCATABLE_FORMATS)})")
    labels = [c.strip() for c in (candidates or (DEFAULT_CANDIDATES if gguf else DEFAULT_PRESETS))]
    labels = [check_type(c.upper(), "--candidates") for c in labels] if gguf else [c.lower() for c in labels]
    if not labels:
        raise SchemeError("--candidates: name at least one")
    if activation_rounding not in ACTIVATION_ROUNDINGS:
        raise SchemeError(f"--activation-rounding {activation_rounding}: expected one of "
                          f"{', '.join(ACTIVATION_ROUNDINGS)}")
    rounding = activation_rounding if gguf else "none"  # vLLM and transformers multiply in float: nothing to add
    vec_dot = {label: VEC_DOT_TYPE.get(label, "F32") for label in labels} if rounding != "none" else {}
    form = get_format(fmt)
    entries = _plan_entries(ckpt, fmt)
    parameters = sum(e.numel for e in entries)
    budget = budget_bytes(parameters, target_bpw, target_bytes)
    if ckpt.tokenizer_path is None:
        raise SchemeError(f"{ckpt.path}: no tokenizer file; measuring tensor sensitivity needs calibration text")
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    calib_set = load_calibration(calib, tokenizer, calib_samples, calib_seqlen, seed)
    # GPTQ's Hessians from other windows (the next seed's): measured on its own Hessian's tokens, GPTQ looks better
    # than it does on any other text
    hessian_set = load_calibration(calib, tokenizer, gptq_samples, gptq_seqlen, seed + 1) if gptq else None

    imatrix_path, imatrix_sha, importance = None, "none", {}
    if gguf and imatrix is None:
        imatrix_sha = "collected"
        key = _key(_identity(ckpt, calib_set.sha256, imatrix_sha))
        imatrix_path = cache_dir() / "sensitivity" / f"{key}.imatrix.gguf"
        if not imatrix_path.exists():
            collected = collect_imatrix(ckpt, calib, calib_samples, calib_seqlen, seed, progress=progress is not None)
            imatrix_path.parent.mkdir(parents=True, exist_ok=True)
            write_imatrix(imatrix_path, collected.imatrix)
    elif gguf:
        imatrix_path, imatrix_sha = Path(imatrix), sha256_file(imatrix)
    if imatrix_path is not None:
        importance = read_imatrix(imatrix_path).to_canonical()
    identity = _identity(ckpt, calib_set.sha256, imatrix_sha, gptq, head_clusters,
                         hessian_set.sha256 if hessian_set else None)
    table_path = Path(sensitivity) if sensitivity else cache_dir() / "sensitivity" / f"{_key(identity)}.json"

    by_name = {e.name: e for e in entries}
    if gguf:
        units = {e.name: [e.name] for e in entries if len(e.shape) == 2}
        encoders = ggml_candidates(labels, importance, gptq)
        target_of = {label: label for label in labels}
    else:
        units = _int_units(entries)
        target_of = {label: get_preset(label) for label in labels}
        for scheme in target_of.values():
            form.check_scheme(scheme)  # SchemeError: this format cannot hold it
        encoders = scheme_candidates(target_of, gptq)
    in_units = {n for names in units.values() for n in names}
    fixed = sum(e.bytes_out[fmt] for e in entries if e.name not in in_units)  # what stays float (GGUF: F32 norms)
    table = measure_sensitivity(ckpt, calib_set.tokens, encoders, units, table_path, identity, progress=progress,
                                hessians=gptq is not None, head_clusters=head_clusters,
                                hessian_tokens=hessian_set.tokens if hessian_set else None,
                                activation_types=sorted(set(vec_dot.values())))

    options = {}
    for unit, names in units.items():
        row, penalty = table.kld.get(unit, {}), table.activation.get(unit, {})
        opts = [Option(label, sum(form.stored_nbytes(target_of[label], by_name[n].shape,
                                                     DTYPE_BYTES.get(by_name[n].source_dtype, 2)) for n in names),
                       row[label] + penalty.get(vec_dot.get(label, "F32"), 0.0)) for label in labels if label in row]
        if not opts:
            raise SchemeError(f"{unit}: none of the candidates ({', '.join(labels)}) can store it")
        options[unit] = opts
    smallest = fixed + sum(min(o.nbytes for o in opts) for opts in options.values())
    if budget < smallest:
        raise SchemeError(f"budget of {budget:,} bytes ({8 * budget / parameters:.3f} BPW) is below the smallest "
                          f"choice of every tensor: {smallest:,} bytes ({8 * smallest / parameters:.3f} BPW, "
                          f"{', '.join(labels)})")
    chosen = allocate(options, budget - fixed)
    targets = {n: option.label for unit, option in chosen.choice.items() for n in units[unit]}
    if gguf:
        targets = {e.name: targets.get(e.name, "F32") for e in entries}
    base = _base(fmt, targets, {e.name: e.numel for e in entries})
    return Allocation(fmt, targets, budget, fixed + chosen.nbytes, parameters, chosen.cost, base, table_path,
                      imatrix_path, table.measured, tokens=calib_set.tokens, embedding_hessian=table.embedding_hessian,
                      activation_rounding=rounding)


def check_target_arguments(formats, gguf_type: str | None, preset: str | None, overrides) -> str:
    """A size target chooses every tensor's target: one output format that can hold a different one per module
    (default gguf), and no --type, --preset or --override. Returns the format."""
    fmts = [f.strip() for f in formats.split(",") if f.strip()] if isinstance(formats, str) else list(formats or [])
    fmts = fmts or ["gguf"]
    if len(fmts) != 1 or fmts[0] not in ALLOCATABLE_FORMATS:
        raise SchemeError(f"--target-bpw/--target-size allocate one format at a time, one of "
                          f"{', '.join(ALLOCATABLE_FORMATS)} (got --format {','.join(fmts)})")
    for given, name in ((gguf_type, "--type"), (preset, "--preset")):
        if given:
            raise SchemeError(f"{name} {given} and --target-bpw/--target-size: the allocation chooses every "
                              "tensor's target; give one or the other")
    if overrides:
        raise SchemeError("--override and --target-bpw/--target-size: the allocation chooses every tensor's target")
    return fmts[0]
