"""How long does AWQ take on models/mistral-nano, per decoder layer and in all?

    python benchmarks/awq_speed.py [--calib-samples 32] [--calib-seqlen 256] [--threads N] [--impl PATH]

Runs `quantkit quantize models/mistral-nano --method awq --preset w4a16-g128 --format awq` with the given
calibration size into a temporary folder and prints the settings, the seconds each layer spent in
`awq.awq_layer` (scale search, folding, clipping search), their sum, the whole command's wall time and the sha256
of every .safetensors file written (so two implementations can be checked for bit-identical output).

`--impl PATH` runs another copy of quant/awq.py (e.g. a saved pre-change version) in place of the installed one,
for before/after comparisons in one environment; compare implementations at the same --threads (reductions and
matmuls may round differently with another thread count, so outputs are comparable only at equal thread counts).
On a machine shared with other work, time both implementations back to back, or use --threads 1: torch's
multi-threaded ops slow down a lot when another process holds the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_impl(path: str):
    spec = importlib.util.spec_from_file_location("awq_impl", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["awq_impl"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "mistral-nano"))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--impl", default=None, help="path of an awq.py to run instead of quantkit.quant.awq")
    ap.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="quantize --compute-dtype: what the scale search's forwards run in (auto: bf16 for a bf16 "
                         "model; an --impl without search_dtype runs float32)")
    args = ap.parse_args()

    import torch

    from quantkit.allocator import tune_allocator
    from quantkit.pipeline import layerwise

    tune_allocator()  # as the CLI does
    if args.threads:
        torch.set_num_threads(args.threads)
    impl = load_impl(args.impl) if args.impl else layerwise.awq
    layer_seconds: list[float] = []
    inner = impl.awq_layer

    params = inspect.signature(inner).parameters

    def timed(*a, **kw):
        # an older --impl without the search shortcuts runs the full fp32 search
        if "search_dtype" not in params and kw.pop("search_dtype", None) not in (None, torch.float32):
            raise SystemExit("this --impl has no search_dtype: run it with --compute-dtype float32")
        if "rank_every" not in params:
            kw.pop("rank_every", None)
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            layer_seconds.append(time.perf_counter() - t)

    impl.awq_layer = timed
    layerwise.awq = impl

    from quantkit.cli import main as cli_main

    print(f"model {args.model}  calib {args.calib_samples} x {args.calib_seqlen}  threads {torch.get_num_threads()}"
          f"  impl {args.impl or 'quantkit.quant.awq'}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        argv = ["quantize", args.model, "--method", "awq", "--preset", "w4a16-g128", "--format", "awq",
                "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
                "--compute-dtype", args.compute_dtype, "-o", str(out), "--force"]
        t0 = time.perf_counter()
        try:
            cli_main(argv)
        except SystemExit as e:  # the CLI exits 0 on success
            if e.code not in (0, None):
                raise
        wall = time.perf_counter() - t0
        hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}
    for i, s in enumerate(layer_seconds):
        print(f"layer {i}: awq {s:.2f} s")
    print(f"awq total {sum(layer_seconds):.2f} s over {len(layer_seconds)} layers; command wall {wall:.2f} s")
    for name, h in hashes.items():
        print(f"sha256 {h}  {name}")


if __name__ == "__main__":
    main()
