"""The C++ Q3_K / Q6_K encoders (gguf/native.py) against their numpy reference (gguf/kquants.py), every block of
every case byte for byte; the numpy reference is itself byte-identical to llama-quantize (tests/test_gguf_quants.py,
which now runs through the C++ encoders where they build)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from quantkit.errors import KernelBuildError
from quantkit.gguf import encode, kquants, native
from quantkit.kernels import toolchain


def _lib():
    lib = native.library()
    if lib is None:  # tests/conftest.py turns this skip into a failure under CI=true
        pytest.skip(f"C++ k-quant encoders unavailable: {toolchain.missing_compiler()}")
    return lib


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 512
    base = (rng.standard_normal((n, 256)) * 0.02).astype(np.float32)
    cases = {"normal": base, "heavy tails": (rng.standard_t(2, (n, 256)) * 0.01).astype(np.float32)}
    odd = base[:64].copy()
    odd[0] = 0  # an all-zero super-block
    odd[1, :16] = 0  # an all-zero sub-block
    odd[2, 16:32] = 1e-20  # below GROUP_MAX_EPS
    odd[3] = -np.abs(odd[3])  # every max negative: the Q3_K descent runs everywhere
    odd[4] = np.abs(odd[4])  # every max positive: it runs nowhere
    odd[5, 7] = 50.0  # one outlier
    odd[6] *= 1e-6  # scales whose fp16 super-block scale is subnormal
    odd[7] *= 1e-9  # ... or rounds to zero
    odd[8] *= 1e4  # large: fp16 scale near its range
    odd[9, :16] = [0.5, -0.5] * 8  # ties in |max|
    odd[10, 5] = np.inf
    odd[11, 9] = -np.inf
    odd[12, 40] = np.nan
    odd[13] = np.float32(1e-30)
    odd[14, ::2] = 0
    cases["corner cases"] = odd
    return cases


@pytest.mark.parametrize("type_name", native.TYPES)
@pytest.mark.parametrize("with_importance", [False, True])
def test_identical_to_the_numpy_reference(type_name, with_importance):
    _lib()
    rng = np.random.default_rng(1)
    for label, x in _cases().items():
        qw = rng.random(x.shape).astype(np.float32) if with_importance else None
        if qw is not None:
            qw[:, ::7] = 0  # columns without importance
        ref = kquants.ENCODERS[type_name](x, qw)
        out = np.empty_like(ref)
        got = native.encode(type_name, x, qw, out)
        bad = np.flatnonzero((got != ref).any(axis=1))
        assert bad.size == 0, f"{type_name} {label}: blocks {bad[:8].tolist()} differ from the numpy reference"


def test_the_encoder_table_uses_the_library():
    _lib()
    x = _cases()["normal"][:8]
    for type_name in native.TYPES:
        assert encode.SEARCHED_ENCODERS[type_name] is not kquants.ENCODERS[type_name]
        assert np.array_equal(encode.SEARCHED_ENCODERS[type_name](x), kquants.ENCODERS[type_name](x))


def test_no_compiler_falls_back_to_numpy_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("QUANTKIT_NATIVE", raising=False)
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match="C\\+\\+ Q3_K/Q6_K encoders are unavailable.*no C\\+\\+ compiler"):
        assert native.library() is None
    x = _cases()["normal"][:4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert np.array_equal(encode.SEARCHED_ENCODERS["Q6_K"](x), kquants.q6_k(x))


def test_a_broken_source_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    if toolchain.missing_compiler():
        pytest.skip(f"cannot build here: {toolchain.missing_compiler()}")
    src = tmp_path / "kquants.cpp"
    src.write_text(native.SOURCE.read_text().replace("namespace {", "namespace {\nint broken_on_purpose = ;", 1))
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "SOURCE", src)
    monkeypatch.setattr(native, "_state", {})
    for _ in range(2):  # and again on a later call
        with pytest.raises(KernelBuildError, match="(?s)first lines of the compiler output.*broken_on_purpose"):
            native.library()
    assert not list((tmp_path / "cache" / "native").glob("*"))  # nothing half-written left


def test_built_once_and_reused(monkeypatch, tmp_path):
    if toolchain.missing_compiler():
        pytest.skip(f"cannot build here: {toolchain.missing_compiler()}")
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    first = toolchain.build_library(native.SOURCE, native.FLAGS, "quantkit_kquants")
    mtime = first.stat().st_mtime_ns
    assert toolchain.build_library(native.SOURCE, native.FLAGS, "quantkit_kquants") == first
    assert first.stat().st_mtime_ns == mtime and first.parent == tmp_path / "native"
    other = toolchain.build_library(native.SOURCE, (*native.FLAGS, "-DQUANTKIT_OTHER"), "quantkit_kquants")
    assert other != first  # other flags, another build
