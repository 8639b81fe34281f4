"""Peak RSS of `quantkit inspect` on a multi-GB checkpoint vs. the checkpoint size and vs. an eager load.

Baseline: an eager load, `safetensors.torch.load_file` + a private copy of every tensor (what loading a model does).
Both run in fresh subprocesses on the same sparse 2.3 GB checkpoint (Mistral-7B shapes, 4 layers). Prints sizes,
peak RSS and the ratios.

    python benchmarks/inspect_memory.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from quantkit.testing import make_sparse_checkpoint

# VmHWM (peak RSS of this address space); ru_maxrss would survive exec and count the parent at fork time
REPORT_RSS = ("import sys; print('PEAK_RSS_KIB', next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))"
              ".split()[1], file=sys.stderr)")


def peak_rss(code: str) -> int:
    """Peak RSS in bytes of a fresh interpreter running `code`."""
    proc = subprocess.run([sys.executable, "-c", code + "\n" + REPORT_RSS], capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if line.startswith("PEAK_RSS_KIB"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RSS report (rc {proc.returncode}): {proc.stderr[-2000:]}")


def inspect_code(path: Path) -> str:
    return (f"from quantkit.cli import main\ntry:\n    main(['inspect', {str(path)!r}, '--json'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = make_sparse_checkpoint(Path(tmp) / "big")
        size = (path / "model.safetensors").stat().st_size
        baseline_import = peak_rss("import torch, quantkit.cli")
        inspect = peak_rss(inspect_code(path))
        eager = peak_rss(f"from safetensors.torch import load_file\n"
                         f"sd = {{k: v.clone() for k, v in load_file({str(path / 'model.safetensors')!r}).items()}}")
    gib = 1024**3
    print(f"checkpoint size            {size / gib:6.2f} GiB")
    print(f"python + torch import RSS  {baseline_import / gib:6.2f} GiB")
    print(f"quantkit inspect peak RSS  {inspect / gib:6.2f} GiB   ({inspect / size:.3f} x checkpoint size)")
    print(f"eager load_file peak RSS   {eager / gib:6.2f} GiB   ({eager / size:.3f} x checkpoint size)")
    print(f"ratio eager / inspect      {eager / inspect:6.1f} x")


if __name__ == "__main__":
    main()
