"""Evaluation reports on disk: `report.json` (the CLI's JSON document) and `report.md` (Markdown tables)."""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.eval.kld import DP_PERCENTILES, KLD_PERCENTILES
from quantkit.io import atomic_dir


def markdown_report(out: dict) -> str:
    """Markdown for the document `quantkit eval --json` prints (with or without a reference)."""
    p = out["ppl"]
    text = out["text"]
    lines = [
        f"# quantkit eval: {out['model']['source']}",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{out['model']['source']}` ({out['model'].get('format', '?')}, {out['model'].get('device', '?')}, "
        f"{out['model'].get('dtype', '?')}) |",
        f"| text | `{text['path']}`: {text['documents']} document(s), {text['tokens']} tokens, "
        f"sha256 `{text['sha256'][:16]}` |",
        f"| tokenizer | `{out['tokenizer']}` |",
        f"| convention | `{out['convention']}`, ctx {out['ctx']}, BOS {out['bos']} |",
        f"| windows / scored tokens | {p['n_windows']} / {p['n_tokens']}"
        + (f" (--max-windows {out['max_windows']}{', spread' if out.get('spread') else ''})"
           if out.get("max_windows") else "")
        + " |",
        f"| **perplexity** | **{p['ppl']:.4f} ± {p['ppl_stderr']:.4f}** |",
    ]
    if "ref" in out:
        r = out["ref"]["ppl"]
        c = out["compare"]
        s = c["ppl"]
        lines += [
            f"| reference perplexity | {r['ppl']:.4f} ± {r['ppl_stderr']:.4f} (`{out['ref']['source']}`) |",
            "",
            "## Perplexity statistics",
            "",
            "| statistic | value |",
            "|---|---|",
            f"| PPL(Q) / PPL(base) | {s['ratio']:.6f} ± {s['ratio_stderr']:.6f} |",
            f"| ln(PPL(Q) / PPL(base)) | {s['ln_ratio']:.6f} ± {s['ln_ratio_stderr']:.6f} |",
            f"| PPL(Q) − PPL(base) | {s['diff']:.6f} ± {s['diff_stderr']:.6f} |",
            f"| Cor(ln PPL(Q), ln PPL(base)) | {100 * s['cor_ln_ppl']:.2f}% |",
            "",
            "## KL divergence",
            "",
            "| statistic | KLD |",
            "|---|---|",
            f"| mean | {c['kld']['mean']:.6f} ± {c['kld']['mean_stderr']:.6f} |",
            f"| max | {c['kld']['max']:.6f} |",
        ]
        lines += [f"| {'median' if q == 50.0 else f'{q:g}%'} | {c['kld']['percentiles'][str(q)]:.6f} |"
                  for q in KLD_PERCENTILES]
        lines += [f"| min | {c['kld']['min']:.6f} |", "",
                  "## Token probability (Δp = p_Q − p_base of the correct token)",
                  "", "| statistic | Δp |", "|---|---|"]
        d = c["delta_p"]
        lines += [f"| mean | {100 * d['mean']:.3f} ± {100 * d['mean_stderr']:.3f} % |",
                  f"| RMS | {100 * d['rms']:.3f} ± {100 * d['rms_stderr']:.3f} % |",
                  f"| max | {100 * d['max']:.3f} % |"]
        lines += [f"| {'median' if q == 50.0 else f'{q:g}%'} | {100 * d['percentiles'][str(q)]:.3f} % |"
                  for q in DP_PERCENTILES]
        lines += [f"| min | {100 * d['min']:.3f} % |", "",
                  f"**Same top token: {100 * c['same_top']['fraction']:.3f} ± {100 * c['same_top']['stderr']:.3f} %**"]
    return "\n".join(lines) + "\n"


def write_report(out: dict, directory: str | Path) -> Path:
    """Write report.json and report.md into `directory` (replaced atomically if it exists)."""
    with atomic_dir(directory, force=True) as tmp:
        (tmp / "report.json").write_text(json.dumps(out, indent=2) + "\n")
        (tmp / "report.md").write_text(markdown_report(out))
    return Path(directory)
