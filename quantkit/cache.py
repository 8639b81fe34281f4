"""Where quantkit keeps what it computed once and reuses: measurements, built native code, extracted tokenizers."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$QUANTKIT_CACHE, else $XDG_CACHE_HOME/quantkit, else ~/.cache/quantkit."""
    if os.environ.get("QUANTKIT_CACHE"):
        return Path(os.environ["QUANTKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantkit"
