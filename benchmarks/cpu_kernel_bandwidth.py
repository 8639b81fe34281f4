"""The CPU decode kernels' speed with the weights in cache and streamed from memory.

    python benchmarks/cpu_kernel_bandwidth.py [--types Q4_0,Q4_K,Q6_K] [--threads 1,2] [--ring-gib 1.5]

One activation row (decode) times a 14336 x 4096 weight matrix of each type through `cpu_ext.ggml_matmul`:
- cache: the same matrix every call (33-47 MB: it stays in the last-level cache), the kernel's arithmetic speed;
- stream: a ring of matrices of `--ring-gib` in all, each used once per turn, as a model's decode step reads its
  weights from memory.
Prints the weight bytes per second of each and the ratio stream / cache (the baseline is the same kernel in
cache). Block bytes are random with every fp16 scale set to 0.01 (no NaN, inf or subnormal in the timed data).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from quantkit.ggml_types import block_size, type_size
from quantkit.kernels import cpu_ext

ROWS, COLS = 14336, 4096
SCALE_OFFSETS = {"Q4_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # fp16 d (and dmin)


def random_blocks(type_name: str, gen: torch.Generator) -> torch.Tensor:
    row_bytes = COLS // block_size(type_name) * type_size(type_name)
    data = torch.randint(0, 256, (ROWS, row_bytes), dtype=torch.uint8, generator=gen)
    blocks = data.view(ROWS, -1, type_size(type_name))
    for off in SCALE_OFFSETS[type_name]:  # fp16 0x211F = 0.0099, little-endian
        blocks[:, :, off] = 0x1F
        blocks[:, :, off + 1] = 0x21
    return data


def seconds_per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q4_K,Q6_K")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ring-gib", type=float, default=1.5)
    args = ap.parse_args()
    if not cpu_ext.available() or not cpu_ext.uses_simd():
        raise SystemExit("error: the AVX512-VNNI CPU kernels are not available here")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {ROWS}x{COLS}, m=1")
    print("| type | threads | cache GB/s | stream GB/s | stream / cache |")
    print("|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, COLS, generator=gen)
    for type_name in args.types.split(","):
        one = random_blocks(type_name, gen)
        ring = [one] + [random_blocks(type_name, gen) for _ in range(max(1, int(args.ring_gib * 2**30 / one.nbytes)))]
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for i in range(3):
                cpu_ext.ggml_matmul(x, one, type_name)
            cached = seconds_per_call(lambda i: cpu_ext.ggml_matmul(x, one, type_name), 30)
            seconds_per_call(lambda i: cpu_ext.ggml_matmul(x, ring[i], type_name), len(ring))  # one turn to warm up
            streamed = seconds_per_call(lambda i: cpu_ext.ggml_matmul(x, ring[i % len(ring)], type_name),
                                        2 * len(ring))
            gb = one.nbytes / 1e9
            print(f"| {type_name} | {threads} | {gb / cached:.1f} | {gb / streamed:.1f} | {cached / streamed:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
