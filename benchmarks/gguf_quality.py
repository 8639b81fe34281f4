"""GGUF quality on mistral-nano: quantkit's GGUF quantizations against llama.cpp's own, side by side.

Every file is judged by llama.cpp itself (`llama-perplexity --kl-divergence` against the F32 GGUF's logits) and by
quantkit's eval (compare_models, llama.cpp convention, same windows), on held-out text. Variants:

  llama.cpp Q4_K_M / Q4_0            llama-quantize, no imatrix
  llama.cpp Q4_K_M / Q4_0 + imatrix  llama-imatrix on the calibration text, then llama-quantize --imatrix
  quantkit  Q4_K_M / Q4_0 + imatrix  quantkit imatrix on the same text (same token budget), then quantkit's encoders
  quantkit  GPTQ Q4_K_M / Q4_0       quantkit quantize --method gptq --format gguf (GPTQ under the exact ggml grid)

Usage: python benchmarks/gguf_quality.py [--work /tmp/gguf_quality] [--chunks 40] [--calib-chunks 64]
Prints a Markdown table (and writes <work>/results.json). Steps are cached in the work dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from nano_gguf_setup import CTX, QUANTKIT, prepare, run

from quantkit.formats.base import read_checkpoint
from quantkit.gguf.convert import convert_to_gguf
from quantkit.gguf.llamacpp import parse_kld_summary, run_perplexity
from quantkit.model.reference import Transformer
from quantkit.model.tokenizer import load_tokenizer
from quantkit.testing import NANO_PATH


class Dequantized:
    def __init__(self, q):
        self.q, self.config = q, q.config

    def get_tensor(self, name):
        t = self.q.get(name)
        return t.float() if isinstance(t, torch.Tensor) else t.dequantize(torch.float32)


def logits_fn_for(gguf: Path):
    model = Transformer.from_checkpoint(Dequantized(read_checkpoint(gguf)), torch.float32)

    def fn(tokens):
        with torch.no_grad():
            return model(tokens)
    return fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/gguf_quality")
    ap.add_argument("--chunks", type=int, default=40, help="evaluation chunks of 512 tokens")
    ap.add_argument("--calib-chunks", type=int, default=64, help="calibration windows of 512 tokens (both tools)")
    ap.add_argument("--qk-windows", type=int, default=16, help="windows for quantkit's own eval (CPU-bound)")
    ap.add_argument("--skip-gptq", action="store_true")
    args = ap.parse_args()
    env = prepare(Path(args.work), args.chunks, args.calib_chunks)
    work, env_q, quantize = env.work, QUANTKIT, env.quantize
    calib_txt, eval_txt, f32, base, lc_imx, qk_imx = (env.calib_txt, env.eval_txt, env.f32, env.base_kld,
                                                       env.llamacpp_imatrix, env.quantkit_imatrix)
    perplexity = env.perplexity

    variants: dict[str, Path] = {}
    for ftype in ("Q4_K_M", "Q4_0"):
        out = work / f"llamacpp-{ftype}.gguf"
        if not out.exists():
            run([str(quantize), str(f32), str(out), ftype, "2"], work / f"{out.stem}.log")
        variants[f"llama.cpp {ftype}"] = out
        out = work / f"llamacpp-{ftype}-imatrix.gguf"
        if not out.exists():
            run([str(quantize), "--imatrix", str(lc_imx), str(f32), str(out), ftype, "2"], work / f"{out.stem}.log")
        variants[f"llama.cpp {ftype} + llama-imatrix"] = out
        out = work / f"quantkit-{ftype}-imatrix.gguf"
        if not out.exists():
            convert_to_gguf(NANO_PATH, out, ftype, imatrix=qk_imx, progress=False)
        variants[f"quantkit {ftype} + quantkit imatrix"] = out
        if not args.skip_gptq:
            out = work / f"quantkit-{ftype}-gptq.gguf"
            if not out.exists():
                run(env_q + ["quantize", str(NANO_PATH), "--method", "gptq", "--format", "gguf", "--type", ftype,
                             "--calib", str(calib_txt), "--calib-samples", str(args.calib_chunks), "--calib-seqlen",
                             str(CTX), "-o", str(out), "--no-progress", "--force"], work / f"{out.stem}.log")
            variants[f"quantkit GPTQ {ftype}"] = out

    from quantkit.eval.compare import compare_models

    tok = load_tokenizer(NANO_PATH)
    ids = tok.encode(eval_txt.read_text(), bos=False)
    ref_fn = logits_fn_for(f32)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for label, path in variants.items():
        key = f"{label}|{path.stat().st_mtime_ns}"
        if key in results:
            continue
        out = run_perplexity(perplexity, path, eval_txt, ctx=CTX, chunks=args.chunks, kld_base_in=base)
        lc = parse_kld_summary(out)
        qk = compare_models(ref_fn, logits_fn_for(path), ids, convention="llamacpp", ctx=CTX, progress=False,
                            max_windows=args.qk_windows)
        results[key] = {"label": label, "file": path.name, "bytes": path.stat().st_size, "llamacpp": lc,
                        "quantkit": {"kld_mean": qk["kld"]["mean"], "kld_p99": qk["kld"]["p99"],
                                     "same_top_pct": 100 * qk["same_top"]["fraction"],
                                     "ppl": qk["ppl_test"]["ppl"], "ppl_ref": qk["ppl_ref"]["ppl"]}}
        results_path.write_text(json.dumps(results, indent=1))
        print(f"  evaluated {label}", file=sys.stderr)

    print(f"\nmistral-nano, eval: pride-and-prejudice (first 200k chars), llama.cpp {args.chunks} chunks / quantkit "
          f"{args.qk_windows} windows x {CTX} tokens (KLD on the second half of each); calibration: "
          f"the-hound-of-the-baskervilles, {args.calib_chunks} x {CTX} tokens for every imatrix / GPTQ run.\n")
    print("| variant | size (bytes) | llama.cpp mean KLD | llama.cpp same top % | llama.cpp PPL | quantkit mean KLD "
          "| quantkit same top % | quantkit PPL |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    current = {f"{label}|{path.stat().st_mtime_ns}" for label, path in variants.items()}
    for key, r in results.items():
        if key not in current:
            continue
        lc, qk = r["llamacpp"], r["quantkit"]
        print(f"| {r['label']} | {r['bytes']:,} | {lc.get('kld_mean', float('nan')):.5f} | "
              f"{lc.get('same_top_pct', float('nan')):.2f} | {lc.get('ppl', float('nan')):.3f} | "
              f"{qk['kld_mean']:.5f} | {qk['same_top_pct']:.2f} | {qk['ppl']:.3f} |")
    any_r = next(iter(results.values()))
    print(f"\nF32 reference PPL: llama.cpp {any_r['llamacpp'].get('ppl_base', float('nan')):.3f}, "
          f"quantkit {any_r['quantkit']['ppl_ref']:.3f}")


if __name__ == "__main__":
    main()
