"""Progress reporting on stderr, made in one place: `progress(...)` is what every progress bar of quantkit is.

On a terminal it is a tqdm bar (redrawn in place). Anywhere else (a log file, a pipe, CI, a notebook's captured
stderr) redrawing would write carriage-return spam, and tqdm's own non-terminal mode writes nothing for minutes;
there it is `LineProgress`: one plain line at most every `interval` seconds, when the count advances, e.g.

    quantize (gptq): layer 3/32 (9%), 41 s elapsed, ~7 min left

and a last `... done in ...` line when it printed anything before. The interval is 10 s, or the number of seconds
in the environment variable QUANTKIT_PROGRESS_INTERVAL (0: a line for every step).

Library code makes progress only when its caller asks for it (`progress=True`); this module only decides how.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

INTERVAL_ENV = "QUANTKIT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def interval_s() -> float:
    """Seconds between two plain progress lines: QUANTKIT_PROGRESS_INTERVAL, else 10."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if math.isfinite(value) and value >= 0 else DEFAULT_INTERVAL_S


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, *, desc: str, total: int | float | None = None, unit: str = "it",
             initial: int = 0, unit_scale: bool = False, file: TextIO | None = None, enabled: bool = True,
             **tqdm_options: Any):
    """A progress object over `iterable` (or updated by hand with `.update(n)`): tqdm on a terminal, plain lines
    (`LineProgress`) elsewhere, a silent stand-in when not `enabled`. All three offer iteration, `update`,
    `set_postfix_str`, `close` and use as a context manager. `unit_scale`: the count is bytes (shown as kB/MB/GB).
    `tqdm_options` (leave, dynamic_ncols, ...) apply to the terminal bar only."""
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    file = file if file is not None else sys.stderr
    if not enabled:
        return LineProgress(iterable, desc=desc, total=total, unit=unit, initial=initial, file=file, silent=True)
    if is_terminal(file):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, unit_scale=unit_scale, file=file,
                    **tqdm_options)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, initial=initial, unit_scale=unit_scale,
                        file=file)


def human_duration(seconds: float) -> str:
    """41 -> "41 s", 420 -> "7 min", 9000 -> "2.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _amount(n: float, unit_scale: bool) -> str:
    if not unit_scale:
        return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"
    for suffix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}" if not suffix else f"{n:.1f}{suffix}"
        n /= 1000
    return f"{n:.1f}T"


class LineProgress:
    """Plain progress lines for a stream that is not a terminal (see the module docstring); no carriage returns."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, total: int | float | None = None,
                 unit: str = "it", initial: int = 0, unit_scale: bool = False, file: TextIO | None = None,
                 interval: float | None = None, silent: bool = False):
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self.start_n = initial
        self.unit_scale, self.file, self.silent = unit_scale, file if file is not None else sys.stderr, silent
        self.interval = interval_s() if interval is None else interval
        self.postfix = ""
        self.started = self.last_line = time.monotonic()
        self.lines = 0
        self.closed = False

    # ---- tqdm's interface ----

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress made without an iterable is updated with .update(n)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int | float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.silent and now - self.last_line >= self.interval:
            self._write(self.status(now))
            self.last_line = now

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = str(text)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.lines and not self.silent:  # a run long enough to have reported says how it ended
            plural = "" if self.unit_scale or self.n == 1 or self.unit.endswith("s") else "s"
            done = f"{_amount(self.n, self.unit_scale)}{'' if self.unit_scale else ' '}{self.unit}{plural}"
            self._write(f"{self.desc}: {done} done in {human_duration(time.monotonic() - self.started)}")

    # ---- the line ----

    def status(self, now: float | None = None) -> str:
        """`desc: unit n/total (p%), t elapsed, ~t left; postfix`."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        amount = (f"{_amount(self.n, True)}B" if self.unit_scale and self.unit == "B"
                  else f"{self.unit} {_amount(self.n, self.unit_scale)}")
        if self.total:
            total = f"{_amount(self.total, True)}B" if self.unit_scale and self.unit == "B" else \
                _amount(self.total, self.unit_scale)
            text = f"{self.desc}: {amount}/{total} ({100 * self.n / self.total:.0f}%), " \
                   f"{human_duration(elapsed)} elapsed"
            done = self.n - self.start_n
            if 0 < done and self.n < self.total:
                text += f", ~{human_duration(elapsed * (self.total - self.n) / done)} left"
        else:
            text = f"{self.desc}: {amount}, {human_duration(elapsed)} elapsed"
        return text + (f"; {self.postfix}" if self.postfix else "")

    def _write(self, line: str) -> None:
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except (OSError, ValueError):  # a closed or broken stderr never stops the work
            pass
        self.lines += 1
