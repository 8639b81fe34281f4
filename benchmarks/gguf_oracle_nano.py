"""Byte-identity of quantkit's ggml encoders with llama.cpp's own tools on the whole of mistral-nano.

Converts models/mistral-nano with llama.cpp's `convert_hf_to_gguf.py --outtype f32`, builds an imatrix with
`llama-imatrix` on pg-english calibration text, runs `llama-quantize --pure [--imatrix]` for every type, and encodes
the same F32 tensors with `quantize_ggml` (with the imatrix read by `quantkit.gguf.imatrix`). Prints, per type,
the fraction of identical blocks over all tensors of that type.

    python benchmarks/gguf_oracle_nano.py [--types Q4_K,Q6_K] [--no-imatrix] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantkit.gguf.imatrix import read_imatrix  # noqa: E402
from quantkit.ggml_types import type_size  # noqa: E402
from quantkit.gguf.quants import quantize_ggml  # noqa: E402
from quantkit.testing import NANO_PATH, llamacpp_bin, llamacpp_convert_script, shared_data  # noqa: E402

ALL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def compare(f32: dict, quantized_path: Path, type_name: str, imatrix) -> tuple[int, int, float]:
    from gguf import GGUFReader

    same = total = 0
    seconds = 0.0
    size = type_size(type_name)
    for t in GGUFReader(str(quantized_path)).tensors:
        if t.tensor_type.name != type_name:
            continue
        x = np.asarray(f32[t.name].data, dtype=np.float32).reshape(t.data.shape[0], -1)
        importance = imatrix.importance(t.name) if imatrix is not None else None
        t0 = time.perf_counter()
        ours = quantize_ggml(x, type_name, importance=importance).data
        seconds += time.perf_counter() - t0
        eq = (ours.reshape(-1, size) == np.asarray(t.data).reshape(-1, size)).all(axis=1)
        same += int(eq.sum())
        total += eq.size
    return same, total, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(ALL_TYPES))
    ap.add_argument("--no-imatrix", action="store_true")
    ap.add_argument("--keep", help="directory for the intermediate GGUFs (default: a temporary one)")
    args = ap.parse_args()

    quantize, imatrix_tool, script = (llamacpp_bin("llama-quantize"), llamacpp_bin("llama-imatrix"),
                                      llamacpp_convert_script())
    if quantize is None or script is None:
        sys.exit("llama.cpp tools are not built (scripts/build_llamacpp.sh)")
    work = Path(args.keep or tempfile.mkdtemp(prefix="gguf-oracle-"))
    work.mkdir(parents=True, exist_ok=True)
    f32_path = work / "nano-f32.gguf"
    if not f32_path.exists():
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        subprocess.run([sys.executable, str(script), str(NANO_PATH), "--outtype", "f32", "--outfile", str(f32_path)],
                       check=True, capture_output=True, env=env)
    imatrix_path = None
    if not args.no_imatrix and imatrix_tool is not None and shared_data("pg-english", "calib") is not None:
        imatrix_path = work / "nano-imatrix.gguf"
        if not imatrix_path.exists():
            text = work / "calib.txt"
            src = sorted(shared_data("pg-english", "calib").glob("*.txt"))[0]
            text.write_text(src.read_text()[:60000])
            subprocess.run([str(imatrix_tool), "-m", str(f32_path), "-f", str(text), "-o", str(imatrix_path),
                            "-c", "128", "--chunks", "8", "-t", str(os.cpu_count() or 1)],
                           check=True, capture_output=True)

    from gguf import GGUFReader

    f32 = {t.name: t for t in GGUFReader(str(f32_path)).tensors}
    imatrix = read_imatrix(imatrix_path) if imatrix_path is not None else None
    print(f"mistral-nano, F32 GGUF by convert_hf_to_gguf.py; imatrix: {imatrix_path or 'none'}")
    print(f"{'type':6} {'imatrix':8} {'identical blocks':>22} {'rate':>9} {'quantkit s':>10}")
    for type_name in args.types.split(","):
        for use_imatrix in ([False, True] if imatrix is not None and type_name != "Q8_0" else [False]):
            out = work / f"nano-{type_name}{'-imx' if use_imatrix else ''}.gguf"
            cmd = [str(quantize), "--pure"] + (["--imatrix", str(imatrix_path)] if use_imatrix else [])
            subprocess.run(cmd + [str(f32_path), str(out), type_name], check=True, capture_output=True)
            same, total, seconds = compare(f32, out, type_name, imatrix if use_imatrix else None)
            print(f"{type_name:6} {str(use_imatrix):8} {same:>10} / {total:<10} {same / total:9.6f} {seconds:10.2f}")
            if not args.keep:
                out.unlink()
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
