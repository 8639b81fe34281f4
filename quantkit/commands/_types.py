"""Click parameter types shared by the commands: every numeric, size, regex and device option is checked here, so
a bad value is a usage error (exit 2) naming the option, before any work starts.

The library checks the same things again for Python callers (quantkit.api, quantkit.io.parse_size, ...); these
types only make the command line answer first and in click's words.
"""

from __future__ import annotations

import math
import re

import click

# torch.Generator.manual_seed takes [0, 2^64); random.Random takes any int: one range for every --seed
SEED = click.IntRange(0, 2**64 - 1)
COUNT = click.IntRange(min=1)  # a number of things to make or look at (tokens, windows, samples, rows)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (click's range checks let nan through: every comparison with
    nan is false)."""

    name = "float range"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class SizeType(click.ParamType):
    """A positive byte size: 5GB, 500MB, 2GiB or a number of bytes (quantkit.io.parse_size). The value stays the
    text the user gave, so it is recorded as written; the library parses it again."""

    name = "size"

    def convert(self, value, param, ctx):
        from quantkit.errors import QuantkitError
        from quantkit.io import parse_size

        try:
            parse_size(value)
        except (QuantkitError, ValueError, OverflowError):  # OverflowError: '1e400GB' (int of an infinite float)
            self.fail(f"{value!r} is not a size: expected a positive size such as 5GB, 500MB, 2GiB or a number of "
                      "bytes.", param, ctx)
        return value


class OverrideType(click.ParamType):
    """A per-tensor override: 're:REGEX=PRESET', 'NAME=PRESET' or '-:REGEX'. The syntax and the regular expression
    are checked here; whether PRESET names a preset or a GGUF type depends on the other options (the library
    checks that)."""

    name = "override"

    def convert(self, value, param, ctx):
        text = str(value)
        if text.startswith("-:"):
            regex = text[2:]
        else:
            pattern, eq, target = text.rpartition("=")
            if not eq or not pattern or not target:
                self.fail(f"{text!r}: expected PATTERN=PRESET (e.g. 're:.*down_proj=w8a16'), "
                          "'re:REGEX=TYPE' for GGUF, or '-:REGEX'.", param, ctx)
            regex = pattern[3:] if pattern.startswith("re:") else None
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as e:
                self.fail(f"{text!r}: invalid regular expression {regex!r} ({e}).", param, ctx)
        return text


class DeviceType(click.ParamType):
    """cpu, cuda or cuda:N (whether that GPU exists is checked when the model is placed)."""

    name = "device"
    _FORM = re.compile(r"cpu|cuda(:\d+)?")

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if not self._FORM.fullmatch(text):
            self.fail(f"{value!r} is not a device: expected cpu, cuda or cuda:N.", param, ctx)
        return text


SIZE = SizeType()
OVERRIDE = OverrideType()
DEVICE = DeviceType()
BACKEND = click.Choice(["auto", "torch", "triton"])
