#!/usr/bin/env python
"""7B on a CPU: quantkit's default `generate` path against llama.cpp on the same Mistral-7B-shaped GGUF files.

    python benchmarks/cpu_decode_7b.py                       # 32-layer source (waits for its .complete marker)
    python benchmarks/cpu_decode_7b.py --layers 2            # own 2-layer 7B-shaped checkpoint (a quick dry run)

Files: `quantkit convert SRC --format gguf --type T` (Q4_0 and Q4_K_M by default) of the synthetic BF16 checkpoint
(--src, default /tmp/e2e7b/mistral-7b-shaped-32L-outliers; --layers N writes an N-layer one under --work instead),
written once and kept in --work. For each file and each thread count (OMP_NUM_THREADS for quantkit, -t for
llama.cpp), in this order:
  generate   `quantkit generate FILE hi --max-tokens 16 --temperature 0` as its own process (the default path: cpu
             kernels, eager decode step): wall time to the first generated token from process start (the first
             text it writes), decode tok/s from its speed line, peak RSS (wait4), total wall time
  prefill    a fresh process loads the model as `generate` does, runs one decode-sized step (pages the weights in,
             builds the kernels), then times a 512-token prefill and --steps decode steps (tok/s each)
  llama.cpp  `llama-bench -m FILE -p 512 -n 16 -t T -r 2` (pp512 and tg16 tokens/s)
Ratios are quantkit / llama.cpp. Goals (issue #16): decode >= 0.8x, first token <= 5 s, peak RSS <= 1.2x the file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_SRC = Path("/tmp/e2e7b/mistral-7b-shaped-32L-outliers")


def source_checkpoint(args) -> Path:
    if args.layers:
        import gguf_convert_speed

        return gguf_convert_speed.generate_checkpoint(args.work / f"src-{args.layers}L", args.layers)
    while not (args.src / ".complete").exists():  # another job may still be writing it
        print(f"waiting for {args.src / '.complete'} ...", file=sys.stderr, flush=True)
        time.sleep(60)
    return args.src


def ensure_gguf(src: Path, work: Path, ftype: str) -> Path:
    out = work / f"{src.name}-{ftype}.gguf"
    if not out.exists():
        print(f"writing {out} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "quantkit", "convert", str(src), "--format", "gguf", "--type", ftype,
                        "-o", str(out)], check=True, stdout=sys.stderr)
    return out


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_generate(path: Path, threads: int, tokens: int) -> dict:
    """`quantkit generate` as a child process: first-token time (its first write to stdout comes with the first
    generated token: the prompt echo is flushed together with it), decode tok/s, peak RSS, wall."""
    cmd = [sys.executable, "-m", "quantkit", "generate", str(path), "hi", "--max-tokens", str(tokens),
           "--temperature", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=thread_env(threads), bufsize=0)
    first = proc.stdout.read(1)
    ttft = time.perf_counter() - t0
    rest = proc.stdout.read()
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    speed = re.search(r"(\d+) tokens \| prefill .*?\| decode ([\d.]+) tok/s", err)
    return {"first_token_s": round(ttft, 2), "wall_s": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "tokens": int(speed.group(1)) if speed else None,
            "decode_tok_s": float(speed.group(2)) if speed else None,
            "text": (first + rest).decode(errors="replace").strip()[:80]}


def worker(path: Path, prompt_tokens: int, steps: int) -> dict:
    """In its own process (thread count from OMP_NUM_THREADS): prefill and steady decode of the default path."""
    import torch

    from quantkit.runtime.generate import Generator
    from quantkit.runtime.loading import load_with_tokenizer

    model, _ = load_with_tokenizer(path)
    gen = Generator(model, max_len=prompt_tokens + steps + 8)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_tokens), generator=g)
    gen.forward(prompt[:, :1], 0)  # pages the weights in, builds the kernels
    t = time.perf_counter()
    tok = gen.forward(prompt, 0).argmax(-1)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        tok = gen.decode_step(tok, prompt_tokens + i).argmax(-1)
    decode = time.perf_counter() - t
    return {"prefill_tok_s": round(prompt_tokens / prefill, 2), "steady_decode_tok_s": round(steps / decode, 2),
            "threads": torch.get_num_threads()}


def run_worker(path: Path, threads: int, prompt_tokens: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(path), "--prompt-tokens", str(prompt_tokens),
                          "--steps", str(steps)], capture_output=True, text=True, env=thread_env(threads))
    if out.returncode:
        raise SystemExit(f"error: the prefill worker failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_bench(path: Path, threads: int, prompt_tokens: int, tokens: int) -> dict:
    from quantkit.testing import llamacpp_bin

    exe = llamacpp_bin("llama-bench")
    if exe is None:
        raise SystemExit("error: llama-bench not found (build llama.cpp: scripts/build_llamacpp.sh)")
    out = subprocess.run([str(exe), "-m", str(path), "-p", str(prompt_tokens), "-n", str(tokens), "-t", str(threads),
                          "-r", "2", "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r.get("n_prompt") == prompt_tokens and not r.get("n_gen"))
    tg = next(r["avg_ts"] for r in rows if r.get("n_gen") == tokens and not r.get("n_prompt"))
    return {"prefill_tok_s": round(float(pp), 2), "decode_tok_s": round(float(tg), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="BF16 7B-shaped checkpoint (read only)")
    ap.add_argument("--layers", type=int, default=0, help="write and use an N-layer checkpoint in --work instead")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cpu7b"))
    ap.add_argument("--types", default="Q4_0,Q4_K_M")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=16, help="generated tokens (generate, llama-bench -n)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (worker, llama-bench -p)")
    ap.add_argument("--steps", type=int, default=16, help="steady-state decode steps timed by the worker")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.prompt_tokens, args.steps)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    src = source_checkpoint(args)
    files = [ensure_gguf(src, args.work, t) for t in args.types.split(",") if t]
    results = []
    for path in files:
        size_gb = path.stat().st_size / 2**30
        for threads in [int(t) for t in args.threads.split(",") if t]:
            row = {"file": path.name, "file_gb": round(size_gb, 3), "threads": threads,
                   "generate": run_generate(path, threads, args.tokens),
                   "quantkit": run_worker(path, threads, args.prompt_tokens, args.steps),
                   "llama.cpp": llama_bench(path, threads, args.prompt_tokens, args.tokens)}
            g, q, ll = row["generate"], row["quantkit"], row["llama.cpp"]
            row["ratios"] = {"decode": round((g["decode_tok_s"] or 0) / ll["decode_tok_s"], 3),
                             "steady_decode": round(q["steady_decode_tok_s"] / ll["decode_tok_s"], 3),
                             "prefill": round(q["prefill_tok_s"] / ll["prefill_tok_s"], 3),
                             "rss_over_file": round(g["peak_rss_gb"] / size_gb, 3)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
    print(f"7B-shaped CPU decode/prefill, quantkit default `generate` path vs llama-bench "
          f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, source {src.name})")
    print("| file | threads | llama.cpp tg/pp tok/s | quantkit decode (ratio) | steady decode (ratio) | "
          "prefill 512 (ratio) | first token s | peak RSS GB (x file) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        g, q, ll, x = r["generate"], r["quantkit"], r["llama.cpp"], r["ratios"]
        print(f"| {r['file']} | {r['threads']} | {ll['decode_tok_s']} / {ll['prefill_tok_s']} | "
              f"{g['decode_tok_s']} ({x['decode']}) | {q['steady_decode_tok_s']} ({x['steady_decode']}) | "
              f"{q['prefill_tok_s']} ({x['prefill']}) | {g['first_token_s']} | {g['peak_rss_gb']} "
              f"({x['rss_over_file']}) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
