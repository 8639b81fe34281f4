"""Does a written checkpoint compute what quantkit thinks it computes? (the library behind `quantkit verify`)

1. OUT is read back through quantkit's own reader (every tensor decoded and validated) and run as the reference
   model with dequantized weights (fp32, CPU).
2. When its real client is installed (transformers + optimum + gptqmodel for GPTQ/AWQ, transformers +
   compressed-tensors for compressed-tensors), OUT is loaded through it too.
3. A fixed prompt set goes through both and through the full-precision SOURCE. Reported: the max logit
   difference quantkit vs client (absolute and relative to the largest logit), and KLD / same-top-token vs SOURCE
   for each. The client fails when it disagrees with quantkit beyond `tol` (relative).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import CheckFailed

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In the beginning of the nineteenth century, the city grew rapidly as new factories",
)


def prompt_tokens(tokenizer_path: Path | None, vocab_size: int) -> list[torch.Tensor]:
    """The fixed prompts as token ids; without a tokenizer, fixed pseudo-random ids (reproducible)."""
    if tokenizer_path is not None:
        from quantkit.model.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        return [torch.tensor([tok.encode(p, bos=True)]) for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 24), generator=g) for _ in PROMPTS]


def verify(out: str | Path, ref: str | Path, tol: float = 1e-3, use_client: bool = True) -> VerifyResult:
    """Read `out` with quantkit (every tensor decoded) and, when installed and `use_client`, with its real client;
    run the fixed prompts through both and through the full-precision `ref`.

    Raises CheckFailed when `ref` is a different model. A client disagreeing beyond `tol` (relative) is not raised
    here: the result says so (`.failed`, `.client_status == "fail"`)."""
    from quantkit.eval.kld import KLDAccumulator
    from quantkit.formats.base import read_checkpoint
    from quantkit.formats.clients import missing_client, transformers_logits_fn
    from quantkit.formats.dequantized import dequantized_model
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.model.reference import Transformer

    ckpt = read_checkpoint(out)
    for name in ckpt.names:  # decode and validate every tensor
        ckpt.get(name)
    source = open_checkpoint(ref)
    if source.config.summary() | {"torch_dtype": None} != ckpt.config.summary() | {"torch_dtype": None}:
        raise CheckFailed(f"{out}: config does not match the reference {ref} (different model)")
    ours = dequantized_model(ckpt)
    base = Transformer.from_checkpoint(source, dtype=torch.float32)
    client: Callable | None = None
    reason = missing_client(ckpt.format) if use_client else "disabled (--no-client)"
    if reason is None:
        client = transformers_logits_fn(out)
    prompts = prompt_tokens(source.tokenizer_path or ckpt.tokenizer_path, ckpt.config.vocab_size)
    kld_ours, kld_client = KLDAccumulator(), KLDAccumulator()
    max_abs, max_logit = 0.0, 0.0
    with torch.no_grad():
        for ids in prompts:
            r, q = base(ids), ours(ids)
            kld_ours.update(r[0], q[0])
            max_logit = max(max_logit, float(q.abs().max()))
            if client is not None:
                c = client(ids)
                kld_client.update(r[0], c[0])
                max_abs = max(max_abs, float((c - q).abs().max()))
    result: dict[str, Any] = {
        "output": str(out), "format": ckpt.format, "reference": str(ref),
        "prompts": len(prompts), "tokens": int(sum(p.shape[1] for p in prompts)),
        "quantkit_vs_source": _kld_summary(kld_ours.result()),
    }
    if client is not None:
        rel = max_abs / max(max_logit, 1e-30)
        result["client"] = {"name": "transformers", "max_abs_logit_diff": max_abs, "max_rel_logit_diff": rel,
                            "tolerance": tol, "status": "pass" if rel <= tol else "fail",
                            "client_vs_source": _kld_summary(kld_client.result())}
    else:
        result["client"] = {"status": "skipped", "reason": reason}
    return VerifyResult(result)


def _kld_summary(r: dict) -> dict:
    return {"kld_mean": r["kld"]["mean"], "kld_max": r["kld"]["max"], "same_top": r["same_top"]["fraction"]}


def render(result: dict) -> str:
    """The text `quantkit verify` prints for a result dict."""
    q = result["quantkit_vs_source"]
    lines = [(f"verify {result['output']} ({result['format']}) against {result['reference']}: "
              f"{result['prompts']} prompts, {result['tokens']} tokens"),
             (f"  quantkit reader vs source : KLD mean {q['kld_mean']:.6f}  max {q['kld_max']:.6f}  "
              f"same top {100 * q['same_top']:.1f}%")]
    c = result["client"]
    if c["status"] == "skipped":
        lines.append(f"  real client               : SKIPPED ({c['reason']})")
    else:
        cs = c["client_vs_source"]
        lines.append(f"  {c['name']} vs source  : KLD mean {cs['kld_mean']:.6f}  max {cs['kld_max']:.6f}  "
                     f"same top {100 * cs['same_top']:.1f}%")
        lines.append(f"  quantkit vs {c['name']}: max |dlogit| {c['max_abs_logit_diff']:.3e}  "
                     f"relative {c['max_rel_logit_diff']:.3e}  (tolerance {c['tolerance']:.0e})  "
                     f"{c['status'].upper()}")
    return "\n".join(lines)


@dataclass
class VerifyResult:
    """`data`: {"output", "format", "reference", "prompts", "tokens", "quantkit_vs_source", "client"} (the JSON
    `quantkit verify --json` prints); client["status"] is "pass", "fail" or "skipped" (with a "reason")."""

    data: dict[str, Any]

    @property
    def client_status(self) -> str:
        return self.data["client"]["status"]

    @property
    def failed(self) -> bool:
        """The client's logits differ from quantkit's beyond the tolerance."""
        return self.client_status == "fail"

    @property
    def max_rel_logit_diff(self) -> float | None:
        return self.data["client"].get("max_rel_logit_diff")

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def render(self) -> str:
        return render(self.data)
