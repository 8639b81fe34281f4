"""GGUF types chosen by measurement under a size budget (`quantize --format gguf --target-bpw B`).

1. calibration windows, and an importance matrix of the full-precision model over them (or the one given);
2. the sensitivity table (`eval/sensitivity.py`): the KL divergence of the model with one tensor in one candidate
   type, for every 2-D tensor (embedding and lm_head included) and every candidate — cached under
   `~/.cache/quantkit/sensitivity/` (or `--sensitivity FILE`), keyed by the model, the tokens and the imatrix, so
   a second budget costs no measurement;
3. the assignment with the least predicted KLD (the sum of the per-tensor KLDs) whose tensor bytes fit the budget
   (`quant/allocate.py`); 1-D tensors stay F32 and count against the budget.

The result is an ordinary `quantize` run with one override per tensor and the same imatrix, so every tensor is
encoded as it was when it was measured.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import SchemeError
from quantkit.ggml_types import check_type, is_float_type, tensor_nbytes
from quantkit.gguf.mixes import FILE_TYPES
from quantkit.quant.allocate import Option, allocate

DEFAULT_CANDIDATES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def cache_dir() -> Path:
    """Where quantkit keeps what it measured: $QUANTKIT_CACHE, else $XDG_CACHE_HOME/quantkit, else ~/.cache/quantkit."""
    if os.environ.get("QUANTKIT_CACHE"):
        return Path(os.environ["QUANTKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantkit"


@dataclass
class GGUFAllocation:
    """The measured choice: a ggml type per tensor, its bytes against the budget, the predicted KLD."""

    types: dict[str, str]  # canonical name -> ggml type, every tensor
    budget_bytes: int
    tensor_bytes: int
    parameters: int
    predicted_kld: float
    file_type: str  # general.file_type label: the mix whose default type holds most parameters
    sensitivity_path: Path
    imatrix_path: Path
    measured: int  # (tensor, type) pairs measured by this call (0: all from the cache)
    tokens: Any = field(default=None, repr=False)  # the calibration windows measured on (int64 [n, seqlen])
    measured_kld: float | None = None  # of the written file, on the same tokens (set after the run)

    @property
    def bpw(self) -> float:
        return 8 * self.tensor_bytes / self.parameters

    @property
    def target_bpw(self) -> float:
        return 8 * self.budget_bytes / self.parameters

    def overrides(self) -> list[str]:
        return [f"{name}={t}" for name, t in self.types.items()]

    def histogram(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"target_bpw": round(self.target_bpw, 4), "budget_bytes": self.budget_bytes,
                "tensor_bytes": self.tensor_bytes, "bpw": round(self.bpw, 4),
                "predicted_kld": self.predicted_kld, "file_type": self.file_type, "types": self.types,
                "histogram": self.histogram(), "sensitivity": str(self.sensitivity_path),
                "imatrix": str(self.imatrix_path), "measured_pairs": self.measured,
                "measured_kld": self.measured_kld}

    def render(self) -> str:
        hist = ", ".join(f"{t} {n}" for t, n in self.histogram().items())
        lines = [f"allocation: {self.bpw:.3f} BPW for a budget of {self.target_bpw:.3f} ({self.tensor_bytes:,} of "
                 f"{self.budget_bytes:,} bytes); tensors: {hist}",
                 f"KLD on the {self.n_tokens} calibration tokens: predicted {self.predicted_kld:.6f}"]
        if self.measured_kld is not None:
            ratio = self.predicted_kld / self.measured_kld if self.measured_kld > 0 else float("inf")
            lines[-1] += f", measured {self.measured_kld:.6f} (predicted/measured {ratio:.2f})"
        return "\n".join(lines)

    @property
    def n_tokens(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.numel())

    def measure(self, ckpt, output: Path) -> float:
        """Load the written GGUF and set `measured_kld`: its KLD from `ckpt` on the tokens measured on."""
        from quantkit.eval.sensitivity import model_kld
        from quantkit.runtime.model import load_model

        self.measured_kld = model_kld(ckpt, self.tokens, load_model(output))
        return self.measured_kld


def _identity(ckpt, tokens_sha: str, imatrix_sha: str) -> dict[str, Any]:
    return {"model": ckpt.fingerprint(), "tokens_sha256": tokens_sha, "imatrix_sha256": imatrix_sha}


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


def _file_type(types: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> str:
    weight: dict[str, int] = {}
    for name, t in types.items():
        n = 1
        for d in shapes[name]:
            n *= d
        weight[t] = weight.get(t, 0) + n
    for t in sorted(weight, key=lambda t: -weight[t]):
        for ft in FILE_TYPES.values():
            if ft.default_type == t and not is_float_type(t):
                return ft.name
    return "Q4_K_M"


def allocate_gguf(ckpt, *, target_bpw: float | None = None, target_bytes: int | None = None,
                  candidates: Iterable[str] = DEFAULT_CANDIDATES, calib: str = "builtin", calib_samples: int = 16,
                  calib_seqlen: int = 256, seed: int = 0, imatrix: Path | None = None,
                  sensitivity: Path | None = None,
                  progress: Callable[[Iterable], Iterable] | None = None) -> GGUFAllocation:
    """Measure (or reuse) the sensitivity of every tensor of `ckpt` and choose its types for the budget."""
    from quantkit.calib import load_calibration
    from quantkit.eval.sensitivity import SensitivityTable, candidate_types, measure_sensitivity
    from quantkit.gguf.imatrix import read_imatrix, write_imatrix
    from quantkit.io import sha256_file
    from quantkit.model.tokenizer import load_tokenizer
    from quantkit.pipeline.imatrix import collect_imatrix

    candidates = [check_type(t.upper(), "--candidates") for t in candidates]
    if not candidates:
        raise SchemeError("--candidates: name at least one ggml type")
    shapes = ckpt.config.expected_shapes()
    parameters = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= d
        parameters += n
    budget = budget_bytes(parameters, target_bpw, target_bytes)
    if ckpt.tokenizer_path is None:
        raise SchemeError(f"{ckpt.path}: no tokenizer file; measuring tensor sensitivity needs calibration text")
    calib_set = load_calibration(calib, load_tokenizer(ckpt.tokenizer_path), calib_samples, calib_seqlen, seed)
    if imatrix is None:
        imatrix_sha = "collected"
        key = _key(_identity(ckpt, calib_set.sha256, imatrix_sha))
        imatrix_path = cache_dir() / "sensitivity" / f"{key}.imatrix.gguf"
        if not imatrix_path.exists():
            collected = collect_imatrix(ckpt, calib, calib_samples, calib_seqlen, seed, progress=progress is not None)
            imatrix_path.parent.mkdir(parents=True, exist_ok=True)
            write_imatrix(imatrix_path, collected.imatrix)
    else:
        imatrix_path, imatrix_sha = Path(imatrix), sha256_file(imatrix)
    identity = _identity(ckpt, calib_set.sha256, imatrix_sha)
    table_path = Path(sensitivity) if sensitivity else cache_dir() / "sensitivity" / f"{_key(identity)}.json"
    importance = read_imatrix(imatrix_path).to_canonical()
    before = SensitivityTable.load(table_path, identity)
    done_before = sum(len(v) for v in before.kld.values())
    table = measure_sensitivity(ckpt, calib_set.tokens, candidates, importance, table_path, identity,
                                progress=progress)
    measured = sum(len(v) for v in table.kld.values()) - done_before

    fixed, options = 0, {}
    types: dict[str, str] = {}
    for name, shape in shapes.items():
        if len(shape) < 2:
            types[name] = "F32"
            fixed += tensor_nbytes(tuple(shape), "F32")
            continue
        fits = candidate_types(tuple(shape), candidates)
        if not fits:
            raise SchemeError(f"{name}: none of the candidate types fits its rows of {shape[-1]} values")
        options[name] = [Option(t, tensor_nbytes(tuple(shape), t), table.kld[name][t]) for t in fits]
    if budget <= fixed:
        raise SchemeError(f"budget of {budget:,} bytes does not even hold the {fixed:,} bytes of F32 norm weights")
    chosen = allocate(options, budget - fixed)
    types.update(chosen.labels())
    types = {name: types[name] for name in shapes}  # file order
    return GGUFAllocation(types, budget, fixed + chosen.nbytes, parameters, chosen.cost,
                          _file_type(types, {k: tuple(v) for k, v in shapes.items()}), table_path, imatrix_path,
                          measured, tokens=calib_set.tokens)


def check_target_arguments(formats, gguf_type: str | None, overrides) -> None:
    """A size target chooses every tensor's type: it writes GGUF, and takes no --type or --override."""
    fmts = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats or ["gguf"])
    if fmts != ["gguf"]:
        raise SchemeError(f"--target-bpw/--target-size choose ggml types: use --format gguf (got {','.join(fmts)})")
    if gguf_type:
        raise SchemeError(f"--type {gguf_type} and --target-bpw/--target-size: the allocation chooses every "
                          "tensor's type; give one or the other")
    if overrides:
        raise SchemeError("--override and --target-bpw/--target-size: the allocation chooses every tensor's type")
