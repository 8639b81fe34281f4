"""GGUF block-encoder throughput: quantkit's vectorized encoders against the baselines on the same tensor.

- legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): quantkit vs `gguf.quants.quantize` (numpy, what llama.cpp's
  converter uses), both in this process;
- k-quants (Q2_K .. Q6_K) and i-quants (IQ4_NL .. IQ1_S): quantkit vs `llama-quantize --pure` on a GGUF holding
  the same F32 tensor. The llama-quantize figure is its own reported "quantize time" (read + quantize + write of
  that one tensor; for the lattice types also its grid set-up, as quantkit's first call includes its own) and its
  CPU time, with 1 thread (per core) and with all threads. The lattice i-quants (IQ3_*, IQ2_*, IQ1_*), which
  llama-quantize writes only with an imatrix, run with the same synthetic imatrix on both sides.

Throughput is MB/s of F32 input (4 bytes per weight). Both wall time and CPU time are printed because the
development machine is shared: CPU time per core is the fairer comparison when it is loaded. Also checks that the
bytes are identical to the baseline's (a benchmark of a wrong encoder is worthless).

    python benchmarks/gguf_encoders.py [--rows 4096 --cols 4096] [--types Q4_K,Q8_0] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantkit.ggml_types import I_TYPES, K_TYPES, LEGACY_TYPES, type_size  # noqa: E402
from quantkit.gguf.quants import quantize_ggml  # noqa: E402
from quantkit.testing import llamacpp_bin  # noqa: E402


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# the llama-quantize file type that writes a block type with --pure, where the names differ
PURE_FTYPE = {"IQ2_S": "IQ2_M"}


def llama_quantize(src: Path, dst: Path, type_name: str, threads: int, imatrix: Path | None = None):
    exe = llamacpp_bin("llama-quantize")
    c0 = children_cpu()
    w0 = time.perf_counter()
    extra = [] if imatrix is None else ["--imatrix", str(imatrix)]
    proc = subprocess.run([str(exe), "--pure", *extra, str(src), str(dst), PURE_FTYPE.get(type_name, type_name),
                           str(threads)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - w0
    cpu = children_cpu() - c0
    m = re.search(r"quantize time =\s*([\d.]+) ms", proc.stdout + proc.stderr)
    qtime = float(m.group(1)) / 1000 if m else wall
    return qtime, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--types", default=",".join(LEGACY_TYPES + K_TYPES + I_TYPES))
    ap.add_argument("--threads", type=int, default=1, help="quantkit encoder threads (default 1: per core)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"tensor {args.rows}x{args.cols} F32 = {mb:.1f} MB; machine: {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'type':6} {'quantkit MB/s (wall / cpu)':>28} {'baseline MB/s (wall / cpu)':>28}  {'ratio wall':>10} "
          f"{'ratio cpu':>9}  identical  baseline")
    tmp = Path(tempfile.mkdtemp(prefix="gguf-enc-bench-"))
    src = None
    # warm-up (first-touch page faults, lazy imports) so that the first type measured is not penalised
    quantize_ggml(x, "Q8_0", threads=args.threads)
    importance = (rng.random(args.cols) ** 4 * 300).astype(np.float32)
    for type_name in args.types.split(","):
        lattice = type_name in I_TYPES and not type_name.startswith("IQ4")
        imp = importance if lattice else None
        ours, w_ours, c_ours = timed(lambda: quantize_ggml(x, type_name, importance=imp, threads=args.threads))
        if type_name in LEGACY_TYPES:
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize

            quantize(x[:256], GGMLQuantizationType[type_name])
            ref, w_ref, c_ref = timed(lambda: quantize(x, GGMLQuantizationType[type_name]))
            same = np.array_equal(ours.data.reshape(-1), ref.reshape(-1))
            name = "gguf.quants"
        else:
            exe = llamacpp_bin("llama-quantize")
            if exe is None:
                print(f"{type_name:6} skipped: llama-quantize not built")
                continue
            if src is None:
                from gguf import GGUFWriter

                src = tmp / "f32.gguf"
                w = GGUFWriter(str(src), "llama")
                w.add_block_count(1)
                w.add_embedding_length(args.cols)
                w.add_feed_forward_length(args.cols)
                w.add_context_length(512)
                w.add_head_count(8)
                w.add_layer_norm_rms_eps(1e-5)
                w.add_tensor("blk.0.ffn_down.weight", x)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
                w.close()
            dst = tmp / f"{type_name}.gguf"
            imx = None
            if lattice:
                from quantkit.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix

                imx = write_imatrix(tmp / "imatrix.gguf", Imatrix(
                    {"blk.0.ffn_down.weight": ImatrixEntry(importance[None, :] * 512, np.array([512.0], np.float32))},
                    ["synthetic"], chunk_count=1, chunk_size=512))
            w_ref, c_ref = llama_quantize(src, dst, type_name, 1, imx)
            from gguf import GGUFReader

            ref = np.asarray(GGUFReader(str(dst)).tensors[0].data)
            size = type_size(type_name)
            same = np.array_equal(ours.data.reshape(-1, size), ref.reshape(-1, size))
            name = "llama-quantize --pure, 1 thread" + (", imatrix" if lattice else "")
            dst.unlink()
            if imx is not None:
                imx.unlink()
        print(f"{type_name:6} {mb / w_ours:12.1f} / {mb / c_ours:10.1f}    {mb / w_ref:12.1f} / {mb / c_ref:10.1f}   "
              f"{w_ref / w_ours:9.2f}x {c_ref / c_ours:8.2f}x  {str(same):9}  {name}")
    if src is not None:
        src.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
