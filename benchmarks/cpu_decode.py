#!/usr/bin/env python
"""CPU decode tokens/s: quantkit's runtime vs llama.cpp on the same GGUF files, same thread count.

    python benchmarks/cpu_decode.py                      # makes nano Q4_0 / Q4_K_M GGUFs in --workdir if needed
    python benchmarks/cpu_decode.py --files a.gguf b.gguf --threads 2 --tokens 64

Baseline: `llama-bench -m FILE -p 0 -n TOKENS -t THREADS` (decode only, avg tokens/s).
quantkit modes, each decoding TOKENS tokens greedily after a short prompt (static KV cache, batch 1):
  cpu-kernels  torch int4/int8 CPU kernels on the packed codes, Q6_K through kernels/cpu_ext.py where it builds
               with AVX512-VNNI (the `generate` default on CPU; eager decode step)
  exact        fp32 dequantize-per-chunk reference path (no full-precision weights kept)
  cache        --cache-dequant: dequantized fp32 weights kept after first use (memory traded for speed)
  compiled     cpu-kernels + the decode step compiled with torch.compile (`Generator(compile=True)`,
               `quantkit generate --compile`); compile time is spent in the warm-up, not in the timed steps
Runs alternate between llama.cpp and quantkit (`--rounds`) so a loaded machine affects both alike; the median
of the rounds is reported. Ratio = quantkit / llama.cpp (goal >= 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from quantkit.testing import NANO_PATH, llamacpp_bin  # noqa: E402

MODES = {"cpu-kernels": dict(cpu_kernels=True), "exact": dict(), "cache": dict(cache_dequant=True),
         "compiled": dict(cpu_kernels=True)}
GENERATOR_OPTIONS = {"compiled": dict(compile=True)}


def llama_bench(path: Path, threads: int, tokens: int) -> float:
    exe = llamacpp_bin("llama-bench")
    if exe is None:
        raise SystemExit("error: llama-bench not found (build llama.cpp: scripts/build_llamacpp.sh)")
    out = subprocess.run([str(exe), "-m", str(path), "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", "2",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def quantkit_decode(gen, tokens: int) -> float:
    """Prefill a 5-token prompt, warm up (first use builds repacked weights; a compiled step compiles), then time
    `tokens` greedy decode steps (each includes the argmax over the vocabulary)."""
    prompt = torch.tensor([[1, 6843, 3714, 264, 727]])
    logits = gen.forward(prompt, 0)
    tok = logits.argmax(-1)
    for i in range(2 if gen.compile else 1):
        tok = gen.decode_step(tok, 5 + i).argmax(-1)
    start = 7 if gen.compile else 6
    t = time.perf_counter()
    for i in range(tokens):
        tok = gen.decode_step(tok, start + i).argmax(-1)
    return tokens / (time.perf_counter() - t)


def ensure_files(workdir: Path) -> list[Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    files = []
    for ftype in ("Q4_0", "Q4_K_M"):
        path = workdir / f"mistral-nano-{ftype}.gguf"
        if not path.exists():
            print(f"writing {path} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "quantkit", "quantize", str(NANO_PATH), "--type", ftype, "-o",
                            str(path)], check=True)
        files.append(path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="*", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/quantkit-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="compiled,cpu-kernels,exact,cache")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from quantkit.runtime.generate import Generator
    from quantkit.runtime.model import load_model

    torch.set_num_threads(args.threads)
    files = args.files or ensure_files(args.workdir)
    modes = [m for m in args.modes.split(",") if m]
    results = []
    for path in files:
        models = {mode: load_model(path, **MODES[mode]) for mode in modes}
        gens = {mode: Generator(models[mode], max_len=args.tokens + 16, **GENERATOR_OPTIONS.get(mode, {}))
                for mode in modes}  # one per mode, reused across rounds (a compiled step compiles once)
        runs: dict[str, list[float]] = {"llama.cpp": [], **{m: [] for m in modes}}
        for r in range(args.rounds):
            runs["llama.cpp"].append(llama_bench(path, args.threads, args.tokens))
            for mode in modes:
                n = args.tokens if mode != "exact" else max(8, args.tokens // 4)  # the exact path is slow
                runs[mode].append(quantkit_decode(gens[mode], n))
            print(f"{path.name} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()),
                  file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        row = {"file": path.name, "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
               "tok_per_s": {k: round(v, 2) for k, v in med.items()},
               "ratio_vs_llama.cpp": {m: round(med[m] / med["llama.cpp"], 3) for m in modes}}
        results.append(row)
        del models, gens
    print(f"CPU decode, batch 1, {args.threads} threads, {args.tokens} tokens, median of {args.rounds} "
          f"interleaved rounds ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print("| file | llama.cpp tok/s | " + " | ".join(f"quantkit {m} tok/s (ratio)" for m in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for row in results:
        t = row["tok_per_s"]
        print(f"| {row['file']} | {t['llama.cpp']} | " + " | ".join(
            f"{t[m]} ({row['ratio_vs_llama.cpp'][m]})" for m in modes) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
