"""The C++ compiler quantkit builds its native code with, and plain shared libraries built by it (no torch).

`cxx_compiler()` is the compiler torch.utils.cpp_extension uses too ($CXX, else c++). `build_library` compiles one
C++ source into a shared library for ctypes, for processes that must not import torch (the GGUF encoder
workers): cached under the quantkit cache (`native/`), keyed by the source, the flags, the compiler and the CPU,
built to a temporary name and renamed, so concurrent processes never load a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from quantkit.cache import cache_dir
from quantkit.errors import KernelBuildError

OUTPUT_LINES = 15  # compiler output lines a KernelBuildError carries


def cxx_compiler() -> str:
    """The C++ compiler command ($CXX, else c++ / cl on Windows)."""
    return os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")


def missing_compiler() -> str | None:
    """Why nothing can be compiled here (the compiler is not on PATH), or None."""
    cxx = cxx_compiler()
    argv = shlex.split(cxx) if cxx.strip() else []
    if not argv or shutil.which(argv[0]) is None:
        what = f"$CXX={cxx!r}" if "CXX" in os.environ else cxx
        return f"no C++ compiler ({what} is not on PATH; install g++ or clang++, or set CXX)"
    return None


def compiler_output_head(output: str, n: int = OUTPUT_LINES) -> list[str]:
    """The first n lines of a failed build's output from its first diagnostic on (build tools first echo progress
    lines and whole compile commands, which say nothing about the error)."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if re.search(r"\berror\b:", line, re.IGNORECASE)), None)
    if first is None:
        first = next((i for i, line in enumerate(lines) if not line.startswith(("[", "FAILED:"))), 0)
    return lines[first:first + n]


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's feature flags (a shared cache never hands an AVX512 build to a
    machine without it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def build_library(source: Path, flags: Sequence[str], name: str) -> Path:
    """Compile `source` with `flags` into a shared library (reused while source, flags, compiler and CPU are the
    same). Raises KernelBuildError with the compiler's first lines when it fails; check `missing_compiler()` first."""
    if not source.is_file():
        raise KernelBuildError(f"{name}: source {source} is missing (the package data of a broken install?)")
    cxx = cxx_compiler()
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(flags).encode(), cxx.encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    out = cache_dir() / "native" / f"{name}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    argv = [*shlex.split(cxx), *flags, "-shared", "-fPIC", "-o", str(tmp), str(source)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            head = compiler_output_head(r.stdout + r.stderr)
            raise KernelBuildError(f"building {name} ({source}) with {cxx!r} failed; first lines of the compiler "
                                   "output:\n" + "\n".join("  " + line for line in head))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
