"""KL divergence against size on mistral-nano: quantkit's measured allocation (`quantize --target-bpw`) against
llama.cpp's stock mixes with `llama-imatrix`, all judged by `llama-perplexity --kl-divergence` on held-out text.

Variants (one calibration text for every tool: --calib-text mix, the five pg-english calib books other than the
evaluation book, interleaved, or hound, *The Hound of the Baskervilles* alone (the tables before the fourteenth
session); see nano_gguf_setup):
  llama.cpp MIX + imatrix      llama-imatrix (CALIB windows x 512), llama-quantize --imatrix, for every k-quant
                               and i-quant mix
  quantkit alloc B             quantize --target-bpw B (RTN blocks with quantkit's imatrix of the same text; the
                               sensitivities measured once on 16 x 256 tokens of it, cached)
  quantkit GPTQ alloc B        quantize --target-bpw B --method gptq (GPTQ-calibrated blocks on CALIB windows x 512;
                               the sensitivities measured on the same 16 x 256 tokens, GPTQ-rounded on Hessians of
                               other windows of the text, cached apart)
  quantkit GPTQ +refineN alloc with --refine-sweeps N (N > 0): the same, each GPTQ solve followed by N sweeps of
                               coordinate descent on its codes (its own files and table)
  AutoRound SCHEME             auto-round --format gguf:SCHEME (SignRound-tuned k-quants, CALIB windows x 512), when
                               installed in --autoround-venv
Evaluation: *Pride and Prejudice* (first 200k characters), llama.cpp convention (ctx 512), CHUNKS chunks, against
llama.cpp's F32 GGUF of the model. For each target the ratio compares quantkit's best file with the smallest
llama.cpp (and AutoRound) file of the same or larger size.

Usage: python benchmarks/gguf_allocation.py [--calib-text mix|hound] [--work /tmp/gguf_alloc-mix]
       [--targets 2.5,3.5,4.5,5.5] [--chunks 40] [--methods rtn,gptq] [--refine-sweeps N]
Prints a Markdown table, writes <work>/results.json and benchmarks/results/gguf_allocation.png. Steps are cached.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nano_gguf_setup import CALIB_TEXTS, CTX, QUANTKIT, prepare, run  # noqa: E402

from quantkit.gguf.llamacpp import parse_kld_summary, run_perplexity  # noqa: E402
from quantkit.gguf.reader import parse_gguf  # noqa: E402
from quantkit.testing import NANO_PATH  # noqa: E402

AUTOROUND_SCHEMES = ["q2_k_s", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"]  # auto-round --format gguf:<scheme>
LLAMACPP_MIXES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K", "IQ3_XXS", "IQ3_XS", "IQ3_S",
                  "IQ3_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "IQ4_NL", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                  "Q6_K"]


def tensor_bytes(path: Path) -> int:
    return sum(t.nbytes for t in parse_gguf(path).tensors.values())


def bpw(path: Path) -> float:
    g = parse_gguf(path)
    params = sum(math.prod(t.shape) for t in g.tensors.values())
    return 8 * sum(t.nbytes for t in g.tensors.values()) / params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="cache directory (default /tmp/gguf_alloc-CALIB_TEXT)")
    ap.add_argument("--targets", default="2.5,3.5,4.5,5.5")
    ap.add_argument("--chunks", type=int, default=40, help="evaluation chunks of 512 tokens")
    ap.add_argument("--calib-chunks", type=int, default=64, help="calibration windows of 512 tokens (imatrix, GPTQ)")
    ap.add_argument("--calib-text", default="mix", choices=CALIB_TEXTS,
                    help="the calibration text of every tool (a --work directory holds one)")
    ap.add_argument("--methods", default="rtn,gptq", help="quantkit's methods to allocate with (rtn, gptq)")
    ap.add_argument("--refine-sweeps", type=int, default=0,
                    help="GPTQ allocations also written with `--refine-sweeps N` (their own files and table)")
    ap.add_argument("--autoround-venv", default="~/.cache/quantkit/autoround-venv",
                    help="a venv with `pip install auto-round` (0.16.1 here); its GGUF exports join the comparison")
    args = ap.parse_args()
    env = prepare(Path(args.work or f"/tmp/gguf_alloc-{args.calib_text}"), args.chunks, args.calib_chunks,
                  args.calib_text)
    work, qk = env.work, QUANTKIT

    variants: dict[str, tuple[str, Path]] = {}  # label -> (tool, file)
    for mix in LLAMACPP_MIXES:
        out = work / f"llamacpp-{mix}.gguf"
        if not out.exists():
            run([str(env.quantize), "--imatrix", str(env.llamacpp_imatrix), str(env.f32), str(out), mix, "2"],
                work / f"{out.stem}.log")
        variants[f"llama.cpp {mix} + imatrix"] = ("llama.cpp", out)
    venv = Path(args.autoround_venv).expanduser()
    if (venv / "bin" / "auto-round").exists():
        calib_json = work / "calib.json"
        text = env.calib_txt.read_text()
        calib_json.write_text(json.dumps([text[i:i + 4000] for i in range(0, len(text), 4000)]))
        for scheme in AUTOROUND_SCHEMES:
            out_dir = work / f"autoround-{scheme}"
            found = sorted(out_dir.rglob("*.gguf")) if out_dir.exists() else []
            if not found:
                run([str(venv / "bin" / "auto-round"), "--model", str(NANO_PATH), "--scheme", f"gguf:{scheme}",
                     "--format", f"gguf:{scheme}", "--nsamples", str(args.calib_chunks), "--seqlen", str(CTX),
                     "--dataset", str(calib_json), "--device", "cpu", "--output_dir", str(out_dir)],
                    work / f"autoround-{scheme}.log")
                found = sorted(out_dir.rglob("*.gguf"))
            variants[f"AutoRound {scheme}"] = ("AutoRound", found[0])
    else:
        print(f"AutoRound not installed in {venv}: its rows are left out", file=sys.stderr)
    # quantkit at each target BPW, and at exactly the tensor bytes of llama.cpp's and AutoRound's files at the next
    # size up from it (the "same size" comparison)
    budgets: dict[str, list[str]] = {t: ["--target-bpw", t] for t in args.targets.split(",")}
    for tool in ("llama.cpp", "AutoRound"):
        sized = sorted((bpw(path), label.split()[1], path) for label, (who, path) in variants.items() if who == tool)
        for t in args.targets.split(","):
            up = [(b, mix, path) for b, mix, path in sized if b >= float(t)]
            if up:
                _, mix, path = up[0]
                budgets[f"={'AutoRound-' if tool == 'AutoRound' else ''}{mix}"] = ["--target-size",
                                                                                  str(tensor_bytes(path))]
    predicted: dict[str, dict] = {}
    runs = [(m, 0) for m in args.methods.split(",")]  # (method, refine sweeps)
    if args.refine_sweeps and "gptq" in args.methods.split(","):
        runs.append(("gptq", args.refine_sweeps))
    for target, budget in budgets.items():
        for method, sweeps in runs:
            variant = method + (f"-refine{sweeps}" if sweeps else "")
            out = work / f"quantkit-{variant}-{target.lstrip('=')}{'' if target.startswith('=') else 'bpw'}.gguf"
            label = (f"quantkit {'GPTQ ' if method == 'gptq' else ''}{f'+refine{sweeps} ' if sweeps else ''}"
                     f"alloc {target}")
            log = work / f"{out.stem}.json"
            if not out.exists() or not log.exists():
                cmd = qk + ["quantize", str(NANO_PATH), *budget, "--method", method,
                            "--calib", str(env.calib_txt),
                            "--sensitivity", str(work / f"sensitivity{'' if method == 'rtn' else '-' + variant}.json"),
                            "--imatrix", str(env.quantkit_imatrix), "-o", str(out), "--force", "--json"]
                if method == "gptq":
                    cmd += ["--calib-samples", str(args.calib_chunks), "--calib-seqlen", str(CTX),
                            "--refine-sweeps", str(sweeps)]
                log.write_text(run(cmd, work / f"{out.stem}.log").strip().splitlines()[-1])
            predicted[label] = json.loads(log.read_text())["allocation"]
            variants[label] = ("quantkit", out)

    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for label, (_, path) in variants.items():
        key = f"{label}|{path.stat().st_mtime_ns}"
        if key not in results:
            out = run_perplexity(env.perplexity, path, env.eval_txt, ctx=CTX, chunks=args.chunks,
                                 kld_base_in=env.base_kld)
            results[key] = {"label": label, "bytes": path.stat().st_size, "bpw": bpw(path),
                            "llamacpp": parse_kld_summary(out)}
            results_path.write_text(json.dumps(results, indent=1))
    rows = sorted((results[f"{label}|{path.stat().st_mtime_ns}"] | {"tool": tool}
                   for label, (tool, path) in variants.items()), key=lambda r: r["bpw"])

    print(f"\nmistral-nano; eval: pride-and-prejudice (first 200k chars), {args.chunks} x {CTX} tokens, "
          f"llama-perplexity --kl-divergence against the F32 GGUF; calibration: {args.calib_text} "
          f"({args.calib_chunks} x {CTX} tokens for the imatrix files and GPTQ).\n")
    print("| file | BPW | bytes | mean KLD | same top % | PPL | predicted KLD (calib) | measured KLD (calib) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lc, p = r["llamacpp"], predicted.get(r["label"], {})
        pred = f"{p['predicted_kld']:.5f}" if p else ""
        meas = f"{p['measured_kld']:.5f}" if p else ""
        print(f"| {r['label']} | {r['bpw']:.3f} | {r['bytes']:,} | {lc['kld_mean']:.5f} | "
              f"{lc.get('same_top_pct', float('nan')):.2f} | {lc.get('ppl', float('nan')):.3f} | {pred} | {meas} |")
    print("\n| target BPW | quantkit best (KLD) | llama.cpp, next size up (KLD) | ratio | AutoRound, next size up "
          "(KLD) | ratio |")
    print("|---|---|---|---:|---|---:|")
    for target in budgets:
        ours = [r for r in rows if r["tool"] == "quantkit" and re.search(rf"alloc {re.escape(target)}$", r["label"])]
        best = min(ours, key=lambda r: r["llamacpp"]["kld_mean"])
        cells = [f"{best['label']} ({best['llamacpp']['kld_mean']:.5f})"]
        for tool in ("llama.cpp", "AutoRound"):
            theirs = [r for r in rows if r["tool"] == tool and r["bytes"] >= best["bytes"]]
            if not theirs:
                cells += ["none as large", ""]
                continue
            ref = min(theirs, key=lambda r: r["bytes"])  # the next size up (or the same)
            cells += [f"{ref['label']} ({ref['llamacpp']['kld_mean']:.5f}, {ref['bpw']:.2f} BPW)",
                      f"{best['llamacpp']['kld_mean'] / ref['llamacpp']['kld_mean']:.2f}x"]
        print(f"| {target} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pick, style in (("llama.cpp + imatrix", lambda r: r["tool"] == "llama.cpp", "o--"),
                              ("AutoRound", lambda r: r["tool"] == "AutoRound", "d:"),
                              ("quantkit alloc (RTN)", lambda r: r["label"].startswith("quantkit alloc"), "s-"),
                              ("quantkit alloc (GPTQ)", lambda r: r["label"].startswith("quantkit GPTQ alloc"), "^-"),
                              ("quantkit alloc (GPTQ + refine)", lambda r: r["label"].startswith("quantkit GPTQ +"),
                               "v-")):
        pts = [r for r in rows if pick(r)]
        if pts:
            ax.plot([r["bpw"] for r in pts], [r["llamacpp"]["kld_mean"] for r in pts], style, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all tensors)")
    ax.set_ylabel("mean KLD vs F32 (llama-perplexity)")
    ax.set_title("mistral-nano: KLD against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    png = Path(__file__).resolve().parent / "results" / "gguf_allocation.png"
    png.parent.mkdir(exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
