"""Per-tensor weight error of a quantized checkpoint against its full-precision base (SQNR dB, relative MSE).

Works from the stored tensors alone (no model is run): quantized formats are read through their format reader,
full-precision sources through `open_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def open_stored(spec: str | Path) -> tuple[list[str], Callable[[str], Any]]:
    """(canonical names, getter) of any checkpoint: quantized formats first, then full-precision sources."""
    from quantkit.errors import FormatError
    from quantkit.model.checkpoint import open_checkpoint

    path = Path(spec).expanduser()
    if path.exists():
        from quantkit.formats.base import detect_format

        try:
            fmt = detect_format(path)
        except FormatError:
            fmt = None
        if fmt is not None and fmt.name not in ("hf", "consolidated"):
            q = fmt.read(path)
            return list(q.names), q.get
    ckpt = open_checkpoint(spec)
    return ckpt.tensor_names(), ckpt.get_tensor


def as_float(t: Any) -> torch.Tensor:
    """A stored tensor (plain, QuantTensor or GGMLTensor) as float32."""
    if isinstance(t, torch.Tensor):
        return t.float()
    return t.dequantize(torch.float32)


def stored_kind(t: Any) -> str:
    """How a tensor is stored: "int4-g128", a GGML type name ("Q4_K"), or a torch dtype ("bfloat16")."""
    from quantkit.tensors import GGMLTensor, QuantTensor

    if isinstance(t, QuantTensor):
        return f"int{t.bits}-g{t.group_size}"
    if isinstance(t, GGMLTensor):
        return t.type_name
    return str(t.dtype).replace("torch.", "")


@dataclass
class WeightErrors:
    """Rows {"name", "kind", "sqnr_db", "rel_mse"} (or {"name", "kind", "error"} on a shape mismatch), worst first.

    Behaves like the list of rows (len, iteration, indexing); `to_dict()` is that list (the JSON "weights" value).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def to_dict(self) -> list[dict[str, Any]]:
        return self.rows

    def render(self, top: int = 10) -> str:
        """The `quantkit compare` weight table: the `top` worst tensors and the mean SQNR, then a blank line."""
        rows = self.rows
        lines = [f"weight error, worst {min(top, len(rows))} of {len(rows)} tensors (SQNR dB, higher is better):"]
        for r in rows[:top]:
            if "error" in r:
                lines.append(f"  {r['name']:<48} {r['kind']:<10} {r['error']}")
            else:
                lines.append(f"  {r['name']:<48} {r['kind']:<10} {r['sqnr_db']:7.2f} dB   rel MSE {r['rel_mse']:.3e}")
        finite = [r["sqnr_db"] for r in rows if "sqnr_db" in r]
        if finite:
            lines.append(f"  mean SQNR {sum(finite) / len(finite):.2f} dB over {len(finite)} tensors")
        lines.append("")
        return "\n".join(lines)


def weight_errors(base: str | Path, quant: str | Path, progress: bool = False) -> WeightErrors:
    """SQNR and relative MSE of every 2-D tensor QUANT stores, against BASE; sorted worst (lowest SQNR) first.

    `progress`: progress on stderr. Raises NonFiniteError naming the tensor when either side holds NaN or Inf."""
    from quantkit.quant.rtn import sqnr_db
    from quantkit.errors import NonFiniteError
    from quantkit.tensors import first_nonfinite

    base_names, base_get = open_stored(base)
    names, get = open_stored(quant)
    base_set = set(base_names)
    common = [n for n in names if n in base_set]
    if progress:
        from quantkit.progress import progress as progress_bar

        common = progress_bar(common, desc="weight error", unit="tensor", leave=False, dynamic_ncols=True)
    rows = []
    for name in common:
        stored = get(name)
        if len(getattr(stored, "shape", ())) != 2:
            continue
        w, wq = base_get(name).float(), as_float(stored)
        if tuple(w.shape) != tuple(wq.shape):
            rows.append({"name": name, "kind": stored_kind(stored),
                         "error": f"shape {list(wq.shape)} vs base {list(w.shape)}"})
            continue
        for spec, t in ((base, w), (quant, wq)):
            bad = first_nonfinite(t)
            if bad is not None:  # an SQNR of nan is never a result
                raise NonFiniteError(f"{spec}: {name} holds NaN or Inf (first at index {bad}); its weight error "
                                     "cannot be measured")
        rel = ((w - wq).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)).item()
        rows.append({"name": name, "kind": stored_kind(stored), "sqnr_db": sqnr_db(w, wq), "rel_mse": rel})
    rows.sort(key=lambda r: r.get("sqnr_db", -1e9))
    return WeightErrors(rows)
