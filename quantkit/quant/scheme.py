"""Quantization schemes, named presets and per-tensor overrides.

A `Scheme` says how one weight matrix is quantized (bits, group size, symmetry, act-order); a preset names a
Scheme (`w4a16-g128`); overrides map tensor-name patterns to other presets or to "leave unquantized":

    re:.*down_proj=w8a16      regex (full match) -> preset
    -:.*layers\\.0\\..*       regex -> not quantized
    model.layers.3.mlp.up_proj=w4a16-g32   exact module name -> preset

Fused groups (q/k/v, gate/up) are widened to the scheme of their first member so serving engines can fuse them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from quantkit.errors import SchemeError
from quantkit.model.arch import LINEAR_GROUPS


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    group_size: int = 128  # -1: per output channel (one group spanning the row)
    symmetric: bool = True
    act_order: bool = False
    scale_dtype: str = "float16"
    mse_clip: bool = False  # RTN: search the clipping range that minimises the group's error

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise SchemeError(f"bits={self.bits} is not supported (choose 2, 3, 4 or 8)")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise SchemeError(f"group_size={self.group_size} must be -1 (per channel) or a positive multiple of 8")
        if self.scale_dtype not in ("float16", "bfloat16", "float32"):
            raise SchemeError(f"scale_dtype={self.scale_dtype!r} must be float16, bfloat16 or float32")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups_for(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        in_features = shape[-1]
        if self.group_size != -1 and in_features % self.group_size:
            raise SchemeError(
                f"{name}: group_size {self.group_size} does not divide the input dimension {in_features} "
                f"(choose a divisor of {in_features}, or -1 for per-channel)"
            )

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}" + (" act-order" if self.act_order else "")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Scheme] = {
    "w8a16": Scheme(bits=8, group_size=-1, symmetric=True),
    "w8a16-g128": Scheme(bits=8, group_size=128, symmetric=True),
    "w4a16-g128": Scheme(bits=4, group_size=128, symmetric=True),
    "w4a16-g128-asym": Scheme(bits=4, group_size=128, symmetric=False),
    "w4a16-g64": Scheme(bits=4, group_size=64, symmetric=True),
    "w4a16-g32": Scheme(bits=4, group_size=32, symmetric=True),
    "w4a16-g32-asym": Scheme(bits=4, group_size=32, symmetric=False),
    "w4a16": Scheme(bits=4, group_size=-1, symmetric=True),
    "w3a16-g128": Scheme(bits=3, group_size=128, symmetric=False),
    "w2a16-g64": Scheme(bits=2, group_size=64, symmetric=False),
}


# one line per preset for `--list-presets` (the scheme itself says bits, group and symmetry)
PRESET_NOTES: dict[str, str] = {
    "w8a16": "8-bit, one scale per output channel: near-lossless",
    "w8a16-g128": "8-bit, groups of 128",
    "w4a16-g128": "4-bit symmetric, groups of 128: the default (vLLM Marlin kernels)",
    "w4a16-g128-asym": "4-bit with zero points, groups of 128: AWQ's usual scheme",
    "w4a16-g64": "4-bit symmetric, groups of 64",
    "w4a16-g32": "4-bit symmetric, groups of 32: more scales, less error",
    "w4a16-g32-asym": "4-bit with zero points, groups of 32",
    "w4a16": "4-bit symmetric, one scale per output channel: smallest 4-bit, most error",
    "w3a16-g128": "3-bit with zero points, groups of 128",
    "w2a16-g64": "2-bit with zero points, groups of 64: experimental",
}


def get_preset(name: str) -> Scheme:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise SchemeError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Override:
    pattern: str  # "re:<regex>", "-:<regex>" or an exact module name
    scheme: Scheme | None  # None: leave unquantized

    def matches(self, module: str) -> bool:
        if self.pattern.startswith(("re:", "-:")):
            regex = self.pattern[3:] if self.pattern.startswith("re:") else self.pattern[2:]
            return re.fullmatch(regex, module) is not None
        return module == self.pattern


def parse_override(text: str) -> Override:
    """`re:REGEX=PRESET`, `NAME=PRESET` or `-:REGEX` (skip)."""
    if text.startswith("-:"):
        _compile(text[2:], text)
        return Override(text, None)
    if "=" not in text:
        raise SchemeError(f"override {text!r}: expected PATTERN=PRESET (e.g. 're:.*down_proj=w8a16') or '-:REGEX'")
    pattern, preset = text.rsplit("=", 1)
    if pattern.startswith("re:"):
        _compile(pattern[3:], text)
    return Override(pattern, get_preset(preset))


def _compile(regex: str, text: str) -> None:
    try:
        re.compile(regex)
    except re.error as e:
        raise SchemeError(f"override {text!r}: invalid regular expression ({e})") from None


def module_name(tensor_name: str) -> str:
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def resolve_schemes(linear_names: list[str], default: Scheme,
                    overrides: list[Override] = ()) -> dict[str, Scheme | None]:
    """Module name -> Scheme (or None = unquantized) for every linear, with fused groups made consistent.

    The last matching override wins. Within a fused group (q/k/v; gate/up of one layer) every member gets the
    scheme of the group's first member, so engines that fuse them (vLLM) accept the checkpoint.
    """
    chosen: dict[str, Scheme | None] = {}
    for name in linear_names:
        scheme: Scheme | None = default
        for ov in overrides:
            if ov.matches(name):
                scheme = ov.scheme
        chosen[name] = scheme
    for name in linear_names:
        if ".layers." not in name:
            continue
        prefix, _, rest = name.partition(".layers.")
        index, _, local = rest.partition(".")
        for group in LINEAR_GROUPS:
            if local in group and len(group) > 1:
                leader = f"{prefix}.layers.{index}.{group[0]}"
                if leader in chosen:
                    chosen[name] = chosen[leader]
    return chosen


def with_act_order(scheme: Scheme, act_order: bool | None) -> Scheme:
    return scheme if act_order is None else replace(scheme, act_order=act_order)
