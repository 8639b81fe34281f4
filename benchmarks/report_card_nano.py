"""The report card of mistral-nano: RTN, GPTQ and AWQ at w4a16-g128 and GGUF Q8_0, Q4_K_M and Q4_0, against the
original on the held-out evaluation text, from one `quantkit report` command.

Usage: python benchmarks/report_card_nano.py [--work /tmp/report_card_nano] [--max-windows N]
Quantizes the six outputs into <work> (kept between runs: an existing output is reused), then runs

    quantkit report <six outputs> --ref models/mistral-nano --text evaltext/prose.txt -o <work>/report --force

and prints its table. Calibration (GPTQ, AWQ, and the GGUF types through --method gptq) is the built-in set, which
never overlaps evaltext/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANO = REPO / "models" / "mistral-nano"

OUTPUTS = {  # name -> quantize arguments
    "rtn-w4a16-g128": ["--method", "rtn", "--preset", "w4a16-g128", "--format", "gptq"],
    "gptq-w4a16-g128": ["--method", "gptq", "--preset", "w4a16-g128", "--format", "gptq"],
    "awq-w4a16-g128": ["--method", "awq", "--preset", "w4a16-g128", "--format", "awq"],
    "Q8_0.gguf": ["--method", "rtn", "--format", "gguf", "--type", "Q8_0"],
    "Q4_K_M.gguf": ["--method", "gptq", "--format", "gguf", "--type", "Q4_K_M"],
    "Q4_0.gguf": ["--method", "gptq", "--format", "gguf", "--type", "Q4_0"],
}


def quantkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "quantkit.cli", *args], check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/report_card_nano"))
    parser.add_argument("--max-windows", type=int, default=None, help="default: every window of the text")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for name, quant_args in OUTPUTS.items():
        out = args.work / name
        if not out.exists():
            t0 = time.perf_counter()
            quantkit("quantize", str(NANO), *quant_args, "-o", str(out))
            print(f"{name}: quantized in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    report = ["report", *(str(args.work / n) for n in OUTPUTS), "--ref", str(NANO), "--text",
              str(REPO / "evaltext" / "prose.txt"), "-o", str(args.work / "report"), "--force", "--no-progress"]
    if args.max_windows:
        report += ["--max-windows", str(args.max_windows)]
    t0 = time.perf_counter()
    quantkit(*report)
    print(f"report: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
