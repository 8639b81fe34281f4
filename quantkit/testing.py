"""Helpers for tests and benchmarks: where the small model, shared data and llama.cpp tools are.

(The fixture factory for random checkpoints lives here too.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NANO_PATH = REPO_ROOT / "models" / "mistral-nano"
SHARED_DATA = Path(os.environ.get("QUANTKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
LLAMACPP_DIR = Path(os.environ.get("QUANTKIT_LLAMACPP_DIR", Path.home() / ".cache" / "quantkit" / "llama.cpp"))


def llamacpp_bin(name: str) -> Path | None:
    """Path of a llama.cpp tool (e.g. 'llama-quantize') built by scripts/build_llamacpp.sh, or None."""
    path = LLAMACPP_DIR / "build" / "bin" / name
    if path.exists():
        return path
    found = shutil.which(name)
    return Path(found) if found else None


def llamacpp_convert_script() -> Path | None:
    path = LLAMACPP_DIR / "convert_hf_to_gguf.py"
    return path if path.exists() else None


def shared_data(*parts: str) -> Path | None:
    path = SHARED_DATA.joinpath(*parts)
    return path if path.exists() else None
