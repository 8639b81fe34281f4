"""Calibration data: built-in set (`calib/` at the repository root), local files, HF datasets; seeded sampling."""

from quantkit.calib.sampling import CalibrationSet, load_calibration, sample_windows, tokens_sha256
from quantkit.calib.sources import BUILTIN_DIR, HF_DATASETS, Source, open_source

__all__ = ["CalibrationSet", "load_calibration", "sample_windows", "tokens_sha256", "BUILTIN_DIR", "HF_DATASETS",
           "Source", "open_source"]
