"""GGUF conversion speed and memory: quantkit vs llama.cpp on a Mistral-7B-shaped BF16 checkpoint.

A synthetic checkpoint with Mistral-7B-Instruct-v0.2's real tensor names and shapes (hidden 4096, ffn 14336,
32/8 heads, vocab 32000; `--layers` of the 32 decoder layers, default all) is generated once, deterministically,
as BF16 safetensors shards in the work dir. For each target type (Q8_0, Q4_0, Q4_K_M):

  quantkit:   quantkit convert SRC --format gguf --type T -o OUT          (streams tensor by tensor)
  llama.cpp:  convert_hf_to_gguf.py SRC --outtype bf16  (once)  +  llama-quantize BF16.gguf OUT T 2

Wall time, CPU time and peak memory (the main process's RSS, and the summed PSS of it and its worker processes) of
each process are measured in this script, one process at a time; the ratio is quantkit / (llama.cpp convert +
quantize). Outputs are deleted after each measurement; `--cleanup` deletes
the synthetic checkpoint at the end.

Usage: nice -n 10 python benchmarks/gguf_convert_speed.py [--layers 8] [--work /tmp/gguf_speed] [--cleanup]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.model import arch
from quantkit.model.config import ModelConfig
from quantkit.testing import NANO_PATH, llamacpp_bin, llamacpp_convert_script

TARGETS = ("Q8_0", "Q4_0", "Q4_K_M")


def mistral_7b_config(layers: int) -> ModelConfig:
    return ModelConfig(num_hidden_layers=layers)  # the dataclass defaults are Mistral-7B-Instruct-v0.2's


def generate_checkpoint(path: Path, layers: int, shard_bytes: int = 2 * 1024**3, outliers: bool = False) -> Path:
    """Deterministic BF16 weights (N(0, 0.02), norms ~1) under real names, written shard by shard.

    `outliers`: shaped like a trained model's statistics instead of white noise: every matrix's input columns
    scaled by a log-normal factor (sigma 0.5), and 8 fixed hidden channels made outliers (norm weights x8 there,
    embedding columns x10), so the activations have the heavy channels that calibration must cope with."""
    done = path / ".complete"
    if done.exists():
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    cfg = mistral_7b_config(layers)
    shapes = cfg.expected_shapes()
    names = [n for n in arch.canonical_names(layers) if n in shapes]
    groups, cur, used = [], [], 0
    for n in names:
        size = 2
        for d in shapes[n]:
            size *= d
        if cur and used + size > shard_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += size
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            gen = torch.Generator().manual_seed(zlib.crc32(n.encode()))
            shape = shapes[n]
            if len(shape) == 1:
                t = 1.0 + 0.05 * torch.randn(shape, generator=gen)
            else:
                t = 0.02 * torch.randn(shape, generator=gen)
            if outliers:
                t = _with_outliers(n, t, gen)
            tensors[n] = t.to(torch.bfloat16)
            total += tensors[n].numel() * 2
            weight_map[n] = fname
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname}", file=sys.stderr)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(NANO_PATH / f, path / f)
    done.write_text("ok")
    return path


OUTLIER_CHANNELS = (17, 301, 1024, 1555, 2048, 2900, 3333, 4000)


def _with_outliers(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A trained model's uneven statistics on random weights (see generate_checkpoint)."""
    if t.dim() == 1:
        if name.endswith("layernorm.weight") and t.numel() == 4096:
            t[list(OUTLIER_CHANNELS)] *= 8.0
        return t
    if name == "model.embed_tokens.weight":
        t[:, list(OUTLIER_CHANNELS)] *= 10.0
        return t
    return t * torch.empty(1, t.shape[1]).log_normal_(0.0, 0.5, generator=gen)


def _status_kib(pid: int, path: str, field: str) -> int:
    """A `Field:  N kB` line of /proc/PID/<path> (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                stack += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return out


def measure(cmd: list[str], log: Path) -> dict:
    """Run one process: wall seconds, CPU seconds (its children included) and peak memory.

    `peak_rss_gib` is the process's own VmHWM, read every 50 ms (monotonic, so the last read is the peak up to
    50 ms before exit); `peak_pss_gib` is the peak of the summed proportional set size of the process and its
    descendants (shared pages counted once) — the figure that compares a multi-process tool with a single-process
    one — read every 0.5 s: summing smaps_rollup over a process tree costs ~15% of a core at 50 ms, which this
    script would take from the measured tool. ru_maxrss from wait4 is not used: Linux folds the parent's RSS at
    fork into it."""
    peak = {"hwm": 0, "pss": 0}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

        def sample(tick: int) -> None:
            peak["hwm"] = max(peak["hwm"], _status_kib(proc.pid, "status", "VmHWM:"))
            if tick % 10 == 0:
                peak["pss"] = max(peak["pss"], sum(_status_kib(p, "smaps_rollup", "Pss:") for p in _tree(proc.pid)))

        wall, code, cpu = watch(proc, sample, 0.05)
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"seconds": round(wall, 1), "peak_rss_gib": round(peak["hwm"] / 1024**2, 3),
            "peak_pss_gib": round(peak["pss"] / 1024**2, 3), "cpu_seconds": round(cpu, 1)}


def watch(proc: subprocess.Popen, on_tick, interval: float) -> tuple[float, int, float]:
    """Call on_tick(tick) every `interval` seconds until `proc` exits: (wall seconds, exit code, CPU seconds of it
    and its children)."""
    t0 = time.perf_counter()
    for tick in itertools.count():
        on_tick(tick)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(interval)
    return time.perf_counter() - t0, os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--work", default="/tmp/gguf_speed")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--cleanup", action="store_true", help="delete the synthetic checkpoint at the end")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"mistral-7b-shaped-{args.layers}L"
    if not (src / ".complete").exists():  # in a child process: keeps this (measuring) process small
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; "
                        "import gguf_convert_speed as g; g.generate_checkpoint(Path(sys.argv[1]), int(sys.argv[2]))",
                        str(src), str(args.layers)], check=True)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    quantize, convert = llamacpp_bin("llama-quantize"), llamacpp_convert_script()
    if quantize is None or convert is None:
        raise SystemExit("needs llama.cpp's llama-quantize and convert_hf_to_gguf.py")
    results: dict = {"layers": args.layers, "source_bytes": src_bytes, "targets": {}}

    bf16 = work / "llamacpp-BF16.gguf"
    results["llamacpp_convert_bf16"] = measure(
        [sys.executable, str(convert), str(src), "--outtype", "bf16", "--outfile", str(bf16)], work / "convert.log")
    print(f"llama.cpp convert_hf_to_gguf -> BF16: {results['llamacpp_convert_bf16']}", file=sys.stderr)
    for target in args.targets.split(","):
        theirs, ours = work / f"llamacpp-{target}.gguf", work / f"quantkit-{target}.gguf"
        lq = measure([str(quantize), str(bf16), str(theirs), target, str(os.cpu_count() or 2)],
                     work / f"quantize-{target}.log")
        theirs_size = theirs.stat().st_size
        theirs.unlink()
        qk = measure([sys.executable, "-m", "quantkit", "convert", str(src), "--format", "gguf", "--type", target,
                      "-o", str(ours), "--no-progress"], work / f"quantkit-{target}.log")
        ours_size = ours.stat().st_size
        ours.unlink()
        total = results["llamacpp_convert_bf16"]["seconds"] + lq["seconds"]
        results["targets"][target] = {
            "quantkit": qk, "llamacpp_quantize": lq, "llamacpp_total_seconds": round(total, 1),
            "ratio_quantkit_over_llamacpp": round(qk["seconds"] / total, 3),
            "bytes": {"quantkit": ours_size, "llamacpp": theirs_size},
        }
        print(f"{target}: {results['targets'][target]}", file=sys.stderr)
    bf16.unlink()
    if args.cleanup:
        shutil.rmtree(src)
    (work / "results.json").write_text(json.dumps(results, indent=1))

    gb = src_bytes / 1e9
    print(f"\nMistral-7B-shaped BF16 checkpoint, {args.layers} of 32 layers, {gb:.2f} GB; llama.cpp convert_hf_to_gguf "
          f"to BF16: {results['llamacpp_convert_bf16']['seconds']} s, peak PSS / RSS "
          f"{results['llamacpp_convert_bf16']['peak_pss_gib']} / "
          f"{results['llamacpp_convert_bf16']['peak_rss_gib']} GiB\n")
    print("| target | quantkit s | quantkit peak PSS (all processes) / main-process RSS GiB "
          "| llama.cpp convert+quantize s | llama-quantize peak PSS / RSS GiB | ratio quantkit/llama.cpp "
          "| sizes (quantkit / llama.cpp bytes) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for target, r in results["targets"].items():
        qk, lq = r["quantkit"], r["llamacpp_quantize"]
        print(f"| {target} | {qk['seconds']} | {qk['peak_pss_gib']} / {qk['peak_rss_gib']} "
              f"| {r['llamacpp_total_seconds']} "
              f"| {lq['peak_pss_gib']} / {lq['peak_rss_gib']} | {r['ratio_quantkit_over_llamacpp']} "
              f"| {r['bytes']['quantkit']:,} / {r['bytes']['llamacpp']:,} |")


if __name__ == "__main__":
    main()
