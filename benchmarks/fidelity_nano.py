"""Fidelity of quantkit's quantizers on mistral-nano: perplexity and KLD against the BF16 model.

    python benchmarks/fidelity_nano.py [--windows 160] [--calib-samples 128] [--calib-seqlen 512] [--seed 0]
                                       [--configs rtn:w4a16-g128,gptq:w4a16-g128,...] [--json out.json]

Evaluation: wikitext-2 test (../shared/data/wikitext-2-raw/wiki.test.raw), perplexity convention `gptq` with
ctx 512 (non-overlapping windows, one BOS at the start of the stream), the first `--windows` windows (a fixed
subset; 0 = all). KLD(base || quant) per scored position, mean over positions (quantkit.eval.compare).
Calibration: ../shared/data/pg-english/calib (`pg`) and quantkit's built-in set (`builtin`), 128 x 512 tokens.
Each configuration runs the real layer-wise pipeline (quantkit/pipeline/layerwise.py) into a dump and is evaluated by
loading the dequantized weights into the reference model (fp32).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantkit.calib import load_calibration  # noqa: E402
from quantkit.eval.compare import compare_models  # noqa: E402
from quantkit.eval.perplexity import read_texts, tokenize_for_convention  # noqa: E402
from quantkit.model.checkpoint import open_checkpoint  # noqa: E402
from quantkit.model.reference import Transformer  # noqa: E402
from quantkit.model.tokenizer import load_tokenizer  # noqa: E402
from quantkit.formats.dump import DumpWriter, read_dump  # noqa: E402
from quantkit.pipeline.layerwise import PipelineOptions, quantize_model  # noqa: E402
from quantkit.pipeline.plan import build_plan  # noqa: E402
from quantkit.tensors import QuantTensor  # noqa: E402
from quantkit.testing import NANO_PATH, shared_data  # noqa: E402

DEFAULT_CONFIGS = ("rtn:w8a16", "rtn:w4a16-g128", "gptq:w4a16-g128:pg", "gptq:w4a16-g128:builtin",
                   "rtn:w4a16-g128-asym", "awq:w4a16-g128-asym:pg", "awq:w4a16-g128-asym:builtin")


def logits_fn(model, cache: dict | None = None):
    """Model logits; with `cache`, each window's logits are computed once (the BF16 reference, shared by configs)."""
    def fn(tokens):
        key = hash(tokens.numpy().tobytes()) if cache is not None else None
        if key is not None and key in cache:
            return cache[key]
        with torch.no_grad():
            out = model(tokens)
        if key is not None:
            cache[key] = out
        return out
    return fn


def quantized_model(ckpt, method: str, preset: str, tokens, damp: float, workdir: Path,
                    compute_dtype: str = "float32", act_order: bool | None = None,
                    **options) -> tuple[Transformer, dict]:
    """`options`: further PipelineOptions fields (group_aware, block_size, ...)."""
    plan = build_plan(ckpt.config, preset=preset, formats=["dump"], method=method, checkpoint=ckpt,
                      act_order=act_order)
    out = workdir / f"{method}-{preset}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    quantize_model(ckpt, plan.targets(), [DumpWriter(out)], tokens if method != "rtn" else None,
                   PipelineOptions(method=method, damp=damp, compute_dtype=compute_dtype, **options), progress=True)
    seconds = time.perf_counter() - t0
    model = Transformer.from_checkpoint(ckpt, torch.float32)
    state = model.state_dict()
    for name, t in read_dump(out):
        state[name] = t.dequantize() if isinstance(t, QuantTensor) else t.float()
    model.load_state_dict(state)
    return model.eval(), {"quantize_seconds": round(seconds, 2), "bpw": round(plan.bpw("dump"), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=160, help="evaluation windows of 512 tokens (0 = all)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma-separated METHOD:PRESET[:pg|builtin]")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    wiki = shared_data("wikitext-2-raw", "wiki.test.raw")
    pg = shared_data("pg-english", "calib")
    if wiki is None or pg is None:
        print("needs ../shared/data (wikitext-2-raw and pg-english/calib)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    ckpt = open_checkpoint(NANO_PATH)
    tok = load_tokenizer(ckpt.tokenizer_path)
    eval_ids = tokenize_for_convention(tok, read_texts(wiki), "gptq")
    ref = Transformer.from_checkpoint(ckpt, torch.float32).eval()
    calib = {}
    rows = []
    ref_cache: dict = {}
    max_windows = args.windows or None
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.configs.split(","):
            parts = spec.split(":")
            method, preset = parts[0], parts[1]
            source = parts[2] if len(parts) > 2 else None
            tokens = None
            if method != "rtn":
                source = source or "pg"
                if source not in calib:
                    calib[source] = load_calibration(str(pg) if source == "pg" else "builtin", tok, args.calib_samples,
                                                     args.calib_seqlen, args.seed)
                tokens = calib[source].tokens
            try:
                model, info = quantized_model(ckpt, method, preset, tokens, args.damp, Path(tmp))
            except Exception as e:  # e.g. AWQ not available yet
                print(f"{spec}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                rows.append({"config": spec, "skipped": f"{type(e).__name__}: {e}"})
                continue
            r = compare_models(logits_fn(ref, ref_cache), logits_fn(model), eval_ids, "gptq", 512, progress=False,
                               bos_id=tok.bos_id, max_windows=max_windows)
            row = {"config": spec, "method": method, "preset": preset, "calib": source or "-", **info,
                   "ppl": r["ppl_test"]["ppl"], "ppl_stderr": r["ppl_test"]["ppl_stderr"],
                   "ppl_base": r["ppl_ref"]["ppl"], "kld_mean": r["kld"]["mean"],
                   "kld_stderr": r["kld"]["mean_stderr"], "kld_p99": r["kld"]["p99"],
                   "same_top": r["same_top"]["fraction"], "n_tokens": r["n_tokens"], "n_windows": r["n_windows"]}
            rows.append(row)
            print(f"{spec:32s} PPL {row['ppl']:.4f} (base {row['ppl_base']:.4f})  KLD {row['kld_mean']:.6f} "
                  f"± {row['kld_stderr']:.6f}  same-top {100 * row['same_top']:.2f}%  [{info['quantize_seconds']}s]",
                  flush=True)
            del model
    print()
    print(markdown(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "calibration": {k: c.identity for k, c in calib.items()}, "rows": rows},
                                        indent=2))
    return 0


def markdown(rows, args) -> str:
    ok = [r for r in rows if "ppl" in r]
    lines = []
    if ok:
        r0 = ok[0]
        lines.append(f"BF16 reference: PPL {r0['ppl_base']:.4f} on {r0['n_windows']} windows x 512 "
                     f"({r0['n_tokens']} scored tokens), convention gptq, ctx 512")
        lines.append("")
    lines.append("| method | scheme | calibration | BPW | PPL | mean KLD | KLD p99 | same top | quantize time |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ppl" not in r:
            lines.append(f"| {r['config']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['preset']} | {r['calib']} | {r['bpw']:.3f} | {r['ppl']:.4f} ± "
                     f"{r['ppl_stderr']:.4f} | {r['kld_mean']:.6f} ± {r['kld_stderr']:.6f} | {r['kld_p99']:.5f} | "
                     f"{100 * r['same_top']:.2f}% | {r['quantize_seconds']} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
