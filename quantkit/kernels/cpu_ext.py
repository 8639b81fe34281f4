"""A small C++ CPU extension that multiplies activations by ggml block bytes exactly as GGUF stores them — no
repacking, no full-precision copy.

Layout: the C++ source is `quantkit/kernels/csrc/cpu_ext.cpp` (shipped as package data); this module compiles it on
first use with `torch.utils.cpp_extension.load` (-O3 -march=native, cached in torch's extension build directory under
a name that includes the CPU capability) and loads it as the operator library `torch.ops.quantkit_cpu`. It also holds
the Python side: `available()` / `reason()` / `uses_simd()`, `ggml_matmul` and the plain-torch references.

`ggml_matmul(x [M, K] float32, data uint8 [N, row bytes], type) -> [M, N] float32` (K % 256 == 0) for the types in
SUPPORTED (Q6_K, Q8_0, Q5_K, Q4_K, Q4_0, Q4_1, Q5_0, Q5_1): the integer kernels, for decode (few rows of x).
`tiled_matmul(x, data, type)` is the prefill path (many rows): tiles of ~1 MB of weight rows dequantized to bf16
(`dequant_bf16`, bit-exact with `dequantize_rows(...).bfloat16()`) and multiplied by torch's bf16 matmul (oneDNN,
AMX where present); reference `bf16_reference`. The weights are always read where they lie (a memory-mapped GGUF).

Math: each row of `x` is rounded to 15-bit integers per 256 values (`quantize_x15`: d = max|x| / 16383,
q = round(x / d); much finer than llama.cpp's 8-bit activations and than the bf16 of the int4/int8 torch kernels).
Every block's dot product with the integer codes is then an exact integer, and the float scales are applied per
block: Q6_K d_w * d_x * sum_j sc_j * sum((code - 32) * q) over its 16-value sub-blocks; Q8_0
d_w * d_x * sum(code * q) per 32 values; Q5_K d_x * (d * sum_s sc_s * sum(code * q) - dmin * sum_s m_s * sum(q))
over its 32-value sub-blocks (Q4_K the same without the fifth bit); Q4_0/Q5_0 d_x * d * (sum(code * q) - offset *
sum(q)) and Q4_1/Q5_1 d_x * (d * sum(code * q) + m * sum(q)) per 32 values. `reference_matmul` is that
computation in plain torch (equal up to float summation order); `x @ dequantize_rows(data).T` in fp32 is the exact
result it approximates (relative error ~5e-5, from the activation rounding).

The AVX512-VNNI path (where -march=native provides it) splits q = 128 * hi + lo into two int8 digits and runs
`vpdpbusd` (64 unsigned-code x signed-digit multiply-adds per instruction) twice per 64 values, restoring any code
offset (-32 for Q6_K, -8 / -16 for Q4_0 / Q5_0; +128 added to make Q8_0's signed codes unsigned) from per-block
activation sums, and reduces 16 weight rows at once (each tile of 16 rows serves every row of x before the next).
Elsewhere a portable scalar loop computes the same integers (~35x slower, so the runtime uses these kernels only
where `uses_simd()`; kernels/cpu.py keeps torch's int4 / grouped int8 paths otherwise).
Weight rows are split across torch's intra-op threads.

When it cannot be built — two different cases:
- no C++ compiler (`$CXX`, else `c++`, the one torch compiles with) or no ninja on PATH: `available()` is False,
  `reason()` says which tool is missing, one RuntimeWarning says so, and callers keep their torch kernels;
- the tools are there but compiling/loading the sources fails: `available()` raises `KernelBuildError` with the
  first lines of the compiler output (and again on every later call) — a broken source is never a silent fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from quantkit.errors import KernelBuildError
from quantkit.ggml_types import f16_to_f32
from quantkit.kernels.toolchain import compiler_output_head, cxx_compiler, missing_compiler
from quantkit.kernels.ggml_ref import LEGACY_LAYOUT, _blocks, _q4k_codes, dequantize_rows, k_scale_min, legacy_fields

# type name -> operator (torch.ops.quantkit_cpu.*) of the integer kernels
_OPS = {"Q6_K": "q6k_matmul", "Q8_0": "q8_0_matmul", "Q5_K": "q5k_matmul", "Q4_K": "q4k_matmul",
        "Q4_0": "q4_0_matmul", "Q4_1": "q4_1_matmul", "Q5_0": "q5_0_matmul", "Q5_1": "q5_1_matmul"}
SUPPORTED = tuple(_OPS)

CSRC = Path(__file__).resolve().parent / "csrc"  # package data (pyproject.toml [tool.setuptools.package-data])
SOURCES = (CSRC / "cpu_ext.cpp",)
CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # -fopenmp: at::parallel_for is serial without it

_lock = threading.Lock()
_state: dict[str, object] = {}


def default_name() -> str:
    # -march=native: the build cache is keyed by the CPU capability too, so a shared home directory never hands
    # an AVX512 binary to a machine without it
    return f"quantkit_cpu_ext_{torch.backends.cpu.get_cpu_capability().lower()}"


def missing_toolchain() -> str | None:
    """Why nothing can be built here (no C++ compiler / no ninja on PATH), or None when both are found."""
    missing = [m for m in [missing_compiler()] if m]
    if shutil.which("ninja") is None:
        missing.append("no ninja on PATH (pip install ninja, or quantkit[cpu])")
    return "; ".join(missing) or None


def build(sources: Sequence[str | os.PathLike] | None = None, name: str | None = None,
          build_directory: str | os.PathLike | None = None) -> str:
    """Compile `sources` (default: SOURCES) with this module's flags and load them as a torch.ops library.

    `name` defaults to default_name(); `build_directory` to torch's extension cache (TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions), where an unchanged build is reused. Returns the library's path. Check
    `missing_toolchain()` first: any failure here — the compiler rejects the sources, or the built library does not
    load — raises KernelBuildError.
    """
    from torch.utils.cpp_extension import load

    sources = [str(s) for s in (SOURCES if sources is None else sources)]
    name = name or default_name()
    where = f"in {build_directory}" if build_directory else "in torch's extension cache"
    for s in sources:
        if not Path(s).is_file():
            raise KernelBuildError(f"C++ extension {name}: source {s} is missing (the package data of a broken "
                                   "install?)")
    if build_directory is not None:
        build_directory = str(build_directory)
        os.makedirs(build_directory, exist_ok=True)
    try:
        return load(name=name, sources=sources, extra_cflags=list(CFLAGS), build_directory=build_directory,
                    is_python_module=False, verbose=False)
    except Exception as e:
        cause = e.__cause__
        if isinstance(cause, subprocess.CalledProcessError) and cause.output:
            output = cause.output.decode(errors="replace") if isinstance(cause.output, bytes) else str(cause.output)
            head = compiler_output_head(output)
            raise KernelBuildError(
                f"building the C++ extension {name} ({', '.join(sources)}) with {cxx_compiler()!r} failed {where}; "
                "first lines of the compiler output:\n" + "\n".join("  " + line for line in head)) from e
        raise KernelBuildError(f"building/loading the C++ extension {name} ({', '.join(sources)}) failed {where}: "
                               f"{type(e).__name__}: {e}") from e


def _build_and_register() -> None:
    build()
    for op in _OPS.values():
        @torch.library.register_fake(f"quantkit_cpu::{op}")
        def _(x, data, portable=False):
            return x.new_empty((x.shape[0], data.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("quantkit_cpu::tiled_matmul")
    def _(x, data, type):
        return x.new_empty((x.shape[0], data.shape[0]), dtype=torch.float32)


def available() -> bool:
    """Build/load the extension once per process (a C++ compiler and ninja are needed the first time).

    False, with `reason()` and one RuntimeWarning, when no compiler or no ninja is found; raises KernelBuildError
    (on this and every later call) when they are found but the build fails.
    """
    with _lock:
        if "ok" not in _state:
            missing = missing_toolchain()
            if missing:
                _state["ok"], _state["reason"] = False, missing
                warnings.warn(f"quantkit: the C++ CPU kernels (kernels/cpu_ext.py) are unavailable, torch's kernels "
                              f"are used instead: {missing}", RuntimeWarning, stacklevel=2)
            else:
                try:
                    _build_and_register()
                except KernelBuildError as e:
                    _state["ok"], _state["error"] = False, str(e)
                    raise
                _state["ok"] = True
        if "error" in _state:
            raise KernelBuildError(str(_state["error"]))
        return bool(_state["ok"])


def reason() -> str | None:
    """Why the extension is unavailable (missing compiler / ninja, or the build error), after `available()`; None
    when it is available or has not been tried."""
    return _state.get("reason") or _state.get("error")  # type: ignore[return-value]


def uses_simd() -> bool:
    """True where the AVX512-VNNI path was compiled in (the runtime only routes to this kernel then)."""
    if "simd" not in _state:
        _state["simd"] = available() and bool(torch.ops.quantkit_cpu.simd_flag())
    return bool(_state["simd"])


def ggml_matmul(x2: torch.Tensor, data: torch.Tensor, type_name: str, portable: bool = False) -> torch.Tensor:
    """x2 [M, K] @ W^T for ggml block bytes data [N, row bytes] -> [M, N] float32, by the integer kernels (15-bit
    activations). `portable`: the scalar loop even where the SIMD path exists (same integers; for tests)."""
    if type_name not in _OPS:
        raise ValueError(f"cpu_ext: no kernel for {type_name} (supported: {', '.join(SUPPORTED)})")
    return getattr(torch.ops.quantkit_cpu, _OPS[type_name])(x2, data, portable)


def tiled_matmul(x2: torch.Tensor, data: torch.Tensor, type_name: str) -> torch.Tensor:
    """x2 [M, K] @ W^T for many activation rows (prefill): tiles of weight rows dequantized to bf16 and multiplied
    with torch's bf16 matmul (oneDNN; AMX where the CPU has it) -> [M, N] float32. Reference: `bf16_reference`.
    Needs the AVX512 build (`uses_simd()`)."""
    if type_name not in _OPS:
        raise ValueError(f"cpu_ext: no kernel for {type_name} (supported: {', '.join(SUPPORTED)})")
    return torch.ops.quantkit_cpu.tiled_matmul(x2, data, type_name)


def dequant_bf16(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """The tiled path's dequantizer on its own: block bytes [N, row bytes] -> [N, K] bfloat16 (round to nearest
    even of the fp32 weights; equals `dequantize_rows(data).bfloat16()`)."""
    return torch.ops.quantkit_cpu.dequant_bf16(data, type_name)


# ---- plain torch references ----


XQ_MAX = 16383.0


def quantize_x15(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (q int32 [M, K/256, 256] in -16383..16383, d float32 [M, K/256]): the kernel's activation
    rounding (x ~= q * d per 256 values)."""
    xb = x2.float().reshape(x2.shape[0], -1, 256)
    amax = xb.abs().amax(-1)
    iscale = torch.where(amax > 0, torch.tensor(XQ_MAX) / amax, torch.zeros_like(amax))
    q = torch.round(xb * iscale[..., None]).clamp(-XQ_MAX, XQ_MAX).to(torch.int32)
    d = torch.where(amax > 0, 1.0 / iscale, torch.zeros_like(amax))
    return q, d


def q6k_codes_scales(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K bytes -> (codes int32 0..63 [N, nb, 256], sub-block scales int32 [N, nb, 16], d float32 [N, nb])."""
    b = _blocks(data, "Q6_K")
    ql = b[..., 0:128].to(torch.int32).reshape(*b.shape[:2], 2, 64)
    qh = b[..., 128:192].to(torch.int32).reshape(*b.shape[:2], 2, 1, 32)
    low = torch.stack([ql[..., 0:32] & 0xF, ql[..., 32:64] & 0xF, ql[..., 0:32] >> 4, ql[..., 32:64] >> 4], dim=-2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32)[:, None]
    codes = (low | (((qh >> shifts) & 3) << 4)).reshape(*b.shape[:2], 256)
    scales = b[..., 192:208].contiguous().view(torch.int8).to(torch.int32)
    return codes, scales, f16_to_f32(b[..., 208:210])


def bf16_reference(x2: torch.Tensor, data: torch.Tensor, type_name: str) -> torch.Tensor:
    """Plain torch version of `tiled_matmul`: bf16 activations times bf16-rounded dequantized weights (fp32
    accumulation), rounded to bf16 like the kernel's matmul output."""
    w = dequantize_rows(data, type_name).bfloat16().float()
    return (x2.bfloat16().float() @ w.t()).bfloat16().float()


def legacy_codes(data: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Q4_0/Q4_1/Q5_0/Q5_1 bytes -> (codes int32 [N, K/32, 32] in 0..31, d float32 [N, K/32], m float32 or None,
    offset): w = d * (code - offset) + m."""
    return legacy_fields(_blocks(data, type_name), type_name)


def reference_matmul(x2: torch.Tensor, data: torch.Tensor, type_name: str = "Q6_K") -> torch.Tensor:
    """Plain torch version of the kernel's arithmetic (15-bit activations, exact integer sub-block sums)."""
    if type_name in LEGACY_LAYOUT:
        codes, d, m, offset = legacy_codes(data, type_name)  # [N, nb32, 32]
        q, dx = quantize_x15(x2)
        qb = q.double().reshape(q.shape[0], -1, 32)  # [M, nb32, 32]
        dots = torch.einsum("nbk,mbk->mnb", codes.double(), qb)  # exact integers
        xs = qb.sum(-1)[:, None]  # [M, 1, nb32]
        per_block = d.double()[None] * (dots - offset * xs) + (0 if m is None else m.double()[None] * xs)
        return (per_block * dx.double().repeat_interleave(8, 1)[:, None]).sum(-1).float()
    if type_name == "Q8_0":
        b = _blocks(data, "Q8_0")  # [N, K/32, 34]
        codes = b[..., 2:34].contiguous().view(torch.int8).double()  # [N, nb32, 32]
        q, dx = quantize_x15(x2)  # [M, K/256, 256], [M, K/256]
        qb = q.double().reshape(q.shape[0], -1, 32)  # [M, nb32, 32]
        sums = torch.einsum("nbk,mbk->mnb", codes, qb)  # exact integers
        scale = f16_to_f32(b[..., 0:2]).double()[None] * dx.double().repeat_interleave(8, 1)[:, None]
        return (sums * scale).sum(-1).float()
    if type_name in ("Q4_K", "Q5_K"):
        b = _blocks(data, type_name)  # [N, nb, 144 | 176]
        d, dmin = f16_to_f32(b[..., 0:2]).double(), f16_to_f32(b[..., 2:4]).double()
        sc, mn = k_scale_min(b[..., 4:16])  # [N, nb, 8] each
        if type_name == "Q4_K":
            codes = _q4k_codes(b[..., 16:144]).double()  # [N, nb, 8, 32]
        else:
            qh = b[..., 16:48].to(torch.int32)
            high = ((qh[..., None, :] >> torch.arange(8)[:, None]) & 1) << 4
            codes = (_q4k_codes(b[..., 48:176]) | high).double()
        q, dx = quantize_x15(x2)  # [M, nb, 256], [M, nb]
        qs = q.double().reshape(q.shape[0], q.shape[1], 8, 32)
        dots = torch.einsum("nbsk,mbsk->mnbs", codes, qs)  # exact integers
        xsum = qs.sum(-1)[:, None]  # [M, 1, nb, 8]
        per_block = d[None] * (dots * sc.double()).sum(-1) - dmin[None] * (xsum * mn.double()).sum(-1)
        return (per_block * dx.double()[:, None]).sum(-1).float()
    if type_name != "Q6_K":
        raise ValueError(f"cpu_ext reference: no {type_name}")
    codes, scales, dw = q6k_codes_scales(data)  # [N, nb, 256], [N, nb, 16], [N, nb]
    q, dx = quantize_x15(x2)  # [M, nb, 256], [M, nb]
    n, nb = dw.shape
    prod = torch.einsum("nbk,mbk->mnbk", (codes - 32).double(), q.double()).reshape(q.shape[0], n, nb, 16, 16)
    blocks = (prod.sum(-1) * scales.double()).sum(-1)  # [M, N, nb]: exact integers
    return (blocks * dw.double()[None] * dx.double()[:, None]).sum(-1).float()
