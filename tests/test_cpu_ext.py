"""The C++ CPU extension (kernels/cpu_ext.py, source in kernels/csrc/) against its plain-torch reference and the
exact fp32 result, how it reports a missing toolchain vs a failing build, and the compiled CPU decode step
(Generator(compile=True)) against the eager one."""

import stat
import warnings
import zlib
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import quantkit
from quantkit.errors import KernelBuildError
from quantkit.kernels import cpu, cpu_ext, toolchain
from quantkit.kernels.ggml_ref import dequantize_rows
from quantkit.runtime.qlinear import GGMLLinear
from test_kernels_ggml import random_blocks  # noqa: E402 (tests/ is on sys.path under pytest)


def _skip_unless(ok: bool, why: str):
    """Skip for a missing C++ compiler / ninja (tests/conftest.py turns such a skip into a failure under CI=true)."""
    if not ok:
        pytest.skip(why)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test's random blocks and activations are fixed by its name. Drawn afresh every run, about 0.3% of random
    Q4_K / Q5_K cases cancel enough to exceed the 1e-3 bound of the 15-bit activation rounding (seen once in a run)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _rng() -> np.random.Generator:
    return np.random.default_rng(torch.initial_seed())


@pytest.fixture
def ext():
    """The built extension. A missing toolchain skips; a build that fails raises KernelBuildError here (an error)."""
    _skip_unless(cpu_ext.available(), f"C++ extension unavailable: {cpu_ext.reason()}")


needs_ext = pytest.mark.usefixtures("ext")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


TYPES = ["Q6_K", "Q8_0", "Q5_K", "Q4_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _blocks_per_row(type_name, k):
    return k // (256 if type_name.endswith("_K") else 32)


@needs_ext
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("m,n,k", [(1, 48, 256), (1, 37, 512), (3, 40, 768), (9, 16, 512)])
def test_kernel_matches_reference_and_exact_fp32(type_name, m, n, k):
    rng = _rng()
    data = torch.from_numpy(random_blocks(type_name, n, _blocks_per_row(type_name, k), rng))
    x = torch.randn(m, k) * torch.rand(m, 1) * 10
    x[0, :7] *= 50  # an outlier block
    got = cpu_ext.ggml_matmul(x, data, type_name)
    assert got.shape == (m, n) and got.dtype == torch.float32
    ref = cpu_ext.reference_matmul(x, data, type_name)
    assert rel(got, ref) <= 1e-5  # same arithmetic, summation order aside
    assert rel(cpu_ext.ggml_matmul(x, data, type_name, portable=True), ref) <= 1e-5  # the non-SIMD loop too
    exact = x @ dequantize_rows(data, type_name).t()
    assert rel(got, exact) <= 1e-3  # 15-bit activation rounding only (typically ~5e-5)
    assert rel(ref, exact) <= 1e-3


def _at_threads(n: int, fn):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(threads)


@needs_ext
def test_kernels_really_run_on_several_threads():
    """The extension's parallel_for uses the threads it is given (built without OpenMP it silently used one)."""
    assert _at_threads(2, lambda: int(torch.ops.quantkit_cpu.parallel_threads(64))) == 2
    assert _at_threads(1, lambda: int(torch.ops.quantkit_cpu.parallel_threads(64))) == 1


@needs_ext
def test_q6k_kernel_splits_rows_across_threads():
    rng = _rng()
    data = torch.from_numpy(random_blocks("Q6_K", 1000, 1, rng))
    x = torch.randn(1, 256)
    two = _at_threads(2, lambda: cpu_ext.ggml_matmul(x, data, "Q6_K"))
    one = _at_threads(1, lambda: cpu_ext.ggml_matmul(x, data, "Q6_K"))
    assert torch.equal(one, two)  # each output row is computed by one thread, in the same order
    assert rel(one, cpu_ext.reference_matmul(x, data)) <= 1e-5


@needs_ext
def test_q6k_kernel_edge_cases():
    rng = _rng()
    data = torch.from_numpy(random_blocks("Q6_K", 32, 2, rng))
    x = torch.zeros(2, 512)
    x[1, 256:] = torch.randn(256)  # first super-block of row 1 all zero (scale 0 path)
    got = cpu_ext.ggml_matmul(x, data, "Q6_K")
    assert torch.equal(got[0], torch.zeros(32))
    assert rel(got[1], (x[1:] @ dequantize_rows(data, "Q6_K").t())[0]) <= 1e-3
    with pytest.raises(RuntimeError, match="multiple of 256"):
        cpu_ext.ggml_matmul(torch.zeros(1, 300), data, "Q6_K")
    with pytest.raises(ValueError, match="no kernel"):
        cpu_ext.ggml_matmul(torch.zeros(1, 256), data, "Q2_K")
    with pytest.raises(ValueError, match="no kernel"):
        cpu_ext.tiled_matmul(torch.zeros(1, 256), data, "Q2_K")


@pytest.mark.parametrize("type_name", TYPES)
def test_reference_is_the_dequantized_matmul(type_name):
    """The reference itself (no extension needed): 15-bit activations + integer block sums ~= fp32 matmul."""
    rng = _rng()
    data = torch.from_numpy(random_blocks(type_name, 8, _blocks_per_row(type_name, 512), rng))
    x = torch.randn(2, 512)
    assert rel(cpu_ext.reference_matmul(x, data, type_name), x @ dequantize_rows(data, type_name).t()) <= 1e-3


def _needs_simd():
    if not cpu_ext.uses_simd():
        pytest.skip("the tiled prefill path is built only with AVX512")


@needs_ext
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("m,n,k", [(8, 40, 512), (33, 300, 768), (64, 17, 256)])
def test_tiled_prefill_matches_bf16_reference_and_exact_fp32(type_name, m, n, k):
    """Many activation rows: bf16 tiles of the dequantized rows through torch's bf16 matmul. The dequantizer is
    bit-exact with dequantize_rows rounded to bf16; the product equals the bf16 reference up to summation order
    (one bf16 rounding of the output: 2^-9 relative), and the fp32 result up to bf16 rounding of x, w and the
    output (each ~2^-9 relative per element, partly averaging out over a dot product: ~3e-3 measured)."""
    _needs_simd()
    rng = _rng()
    data = torch.from_numpy(random_blocks(type_name, n, _blocks_per_row(type_name, k), rng))
    x = torch.randn(m, k) * torch.rand(m, 1) * 10
    assert torch.equal(cpu_ext.dequant_bf16(data, type_name), dequantize_rows(data, type_name).bfloat16())
    got = cpu_ext.tiled_matmul(x, data, type_name)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert rel(got, cpu_ext.bf16_reference(x, data, type_name)) <= 4e-3
    assert rel(got, x @ dequantize_rows(data, type_name).t()) <= 1e-2


@needs_ext
def test_tiled_prefill_spans_several_tiles():
    """More weight rows than one ~1 MB tile (K = 256: 2048 rows a tile), and 2 threads splitting the dequantization."""
    _needs_simd()
    rng = _rng()
    data = torch.from_numpy(random_blocks("Q4_0", 5000, 8, rng))
    x = torch.randn(12, 256)
    two = _at_threads(2, lambda: cpu_ext.tiled_matmul(x, data, "Q4_0"))
    assert rel(two, cpu_ext.bf16_reference(x, data, "Q4_0")) <= 4e-3


def test_sources_are_package_data():
    """The C++ lives in kernels/csrc/ and is found through the package (as an installed wheel has it), and
    pyproject.toml's package-data globs cover every file there."""
    csrc = files("quantkit.kernels") / "csrc"
    names = sorted(p.name for p in csrc.iterdir() if p.is_file())
    assert "cpu_ext.cpp" in names
    assert [Path(s).resolve() for s in cpu_ext.SOURCES] == [Path(str(csrc / "cpu_ext.cpp")).resolve()]
    source = (csrc / "cpu_ext.cpp").read_text()
    assert "TORCH_LIBRARY(quantkit_cpu, m)" in source and "q6k_row_scalar" in source
    pyproject = Path(quantkit.__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.exists():  # a source checkout / editable install
        tomllib = pytest.importorskip("tomllib")
        globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["quantkit"]
        for name in names:
            assert any(fnmatch(f"kernels/csrc/{name}", g) for g in globs), f"{name} is not package data"


def _fake_tools(tmp_path, *tools):
    """A PATH holding only these (do-nothing) executables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(stat.S_IRWXU)
    return str(bin_dir)


@pytest.mark.parametrize("tools,cxx,expect", [
    ((), None, ["no C++ compiler (c++ is not on PATH", "no ninja"]),
    (("c++",), None, ["no ninja on PATH"]),
    (("ninja",), "/nonexistent/g++", ["no C++ compiler ($CXX='/nonexistent/g++' is not on PATH"]),
])
def test_missing_toolchain_is_unavailable_with_one_warning(tmp_path, monkeypatch, tools, cxx, expect):
    monkeypatch.setenv("PATH", _fake_tools(tmp_path, *tools))
    if cxx is None:
        monkeypatch.delenv("CXX", raising=False)
    else:
        monkeypatch.setenv("CXX", cxx)
    monkeypatch.setattr(cpu_ext, "_state", {})  # a fresh process, as far as cpu_ext knows

    def no_build(*args, **kwargs):
        raise AssertionError("a missing toolchain must not get as far as building")

    monkeypatch.setattr(cpu_ext, "build", no_build)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels .* unavailable") as record:
        assert cpu_ext.available() is False
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: later calls neither warn nor raise
        assert cpu_ext.available() is False and cpu_ext.uses_simd() is False
    for part in expect:
        assert part in cpu_ext.reason()
    assert (("no C++ compiler" in cpu_ext.reason()) == ("c++" not in tools))
    # tests skip for it, and fail under CI=true (the suite-wide rule of tests/conftest.py)
    from tests.conftest import _fail_tool_skip

    with pytest.raises(pytest.skip.Exception, match="no ") as skipped:
        _skip_unless(cpu_ext.available(), f"C++ extension unavailable: {cpu_ext.reason()}")
    report = SimpleNamespace(skipped=True, outcome="skipped", longrepr=("test_cpu_ext.py", 1, skipped.value.msg))
    monkeypatch.delenv("CI", raising=False)
    _fail_tool_skip(report)
    assert report.outcome == "skipped"
    monkeypatch.setenv("CI", "true")
    _fail_tool_skip(report)
    assert report.outcome == "failed" and "CI=true" in report.longrepr


def test_broken_source_raises_build_error(tmp_path, monkeypatch):
    """A compiler that rejects the sources is an error carrying its first output lines — never 'unavailable'."""
    _skip_unless(cpu_ext.missing_toolchain() is None, f"cannot build here: {cpu_ext.missing_toolchain()}")
    src = tmp_path / "src"
    src.mkdir()
    broken = []
    for s in cpu_ext.SOURCES:
        text = Path(s).read_text()
        if Path(s).name == "cpu_ext.cpp":
            assert "\nnamespace {\n" in text
            text = text.replace("\nnamespace {\n", "\nnamespace {\nint quantkit_broken_on_purpose = ;\n", 1)
        (src / Path(s).name).write_text(text)
        broken.append(src / Path(s).name)
    with pytest.raises(KernelBuildError) as info:
        cpu_ext.build(sources=broken, name="quantkit_cpu_ext_broken_test", build_directory=tmp_path / "build")
    msg = str(info.value)
    assert "quantkit_cpu_ext_broken_test" in msg and "first lines of the compiler output" in msg
    assert "error:" in msg and "quantkit_broken_on_purpose" in msg
    assert len(msg.splitlines()) <= 1 + toolchain.OUTPUT_LINES

    # available() passes it on (every call, one build) instead of reporting the extension unavailable
    calls = []

    def failing_build(*args, **kwargs):
        calls.append(1)
        raise info.value

    monkeypatch.setattr(cpu_ext, "_state", {})
    monkeypatch.setattr(cpu_ext, "build", failing_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(KernelBuildError, match="quantkit_broken_on_purpose"):
                cpu_ext.available()
        with pytest.raises(KernelBuildError):
            cpu_ext.uses_simd()
    assert len(calls) == 1 and "quantkit_broken_on_purpose" in cpu_ext.reason()


@needs_ext
@pytest.mark.parametrize("type_name,blocks,k,direct", [("Q6_K", 2, 512, True), ("Q8_0", 16, 512, True),
                                                       ("Q5_K", 2, 512, True), ("Q4_K", 2, 512, True),
                                                       ("Q4_0", 16, 512, True), ("Q5_1", 8, 256, True),
                                                       ("Q8_0", 5, 160, False),  # K % 256 != 0: grouped int8
                                                       ("Q4_0", 5, 160, False)])  # ... and torch's int4 kernel
def test_ggml_linear_uses_the_extension(type_name, blocks, k, direct):
    if not cpu_ext.uses_simd():
        pytest.skip("the runtime uses the extension only with AVX512-VNNI")
    rng = _rng()
    data = torch.from_numpy(random_blocks(type_name, 32, blocks, rng))
    lin = GGMLLinear(type_name, data, (32, k), cpu_kernels=True)
    exact = lambda x: x @ dequantize_rows(data, type_name).t()  # noqa: E731
    x = torch.randn(2, 3, k)  # decode-sized: the integer kernels
    assert rel(lin(x), exact(x)) <= (1e-3 if direct else 1e-2)
    assert isinstance(lin._fast, cpu.DirectGGML) == direct
    x = torch.randn(1, cpu.PREFILL_ROWS, k)  # prefill-sized: bf16 tiles
    assert rel(lin(x), exact(x)) <= 1e-2


def _nano_gguf(tmp_path_factory, nano_path, ftype):
    from quantkit.cli import main

    path = tmp_path_factory.mktemp("gguf") / f"nano-{ftype}.gguf"
    try:
        main(["quantize", str(nano_path), "--type", ftype, "-o", str(path)])
    except SystemExit as e:
        assert not e.code, f"quantize failed ({e.code})"
    return path


@pytest.fixture(scope="module")
def nano_q4_k_m(tmp_path_factory, nano_path):
    """mistral-nano as GGUF Q4_K_M (Q4_K and Q6_K linears, Q6_K output matrix) written by the real writer."""
    return _nano_gguf(tmp_path_factory, nano_path, "Q4_K_M")


@pytest.fixture(scope="module")
def nano_q8_0(tmp_path_factory, nano_path):
    return _nano_gguf(tmp_path_factory, nano_path, "Q8_0")


@pytest.fixture(scope="module")
def nano_q5_k_m(tmp_path_factory, nano_path):
    return _nano_gguf(tmp_path_factory, nano_path, "Q5_K_M")


@pytest.mark.slow
def test_compiled_cpu_decode_matches_eager_and_is_deterministic(nano_q4_k_m):
    from quantkit.runtime.generate import Generator
    from quantkit.runtime.model import load_model

    model = load_model(nano_q4_k_m, cpu_kernels=True)
    prompt = [1, 6843, 3714, 264, 727, 28725, 736]
    eager, compiled = Generator(model, max_len=48), Generator(model, max_len=48, compile=True)
    tok_e = eager.forward(torch.tensor([prompt[:4]]), 0).argmax(-1)
    tok_c = compiled.forward(torch.tensor([prompt[:4]]), 0).argmax(-1)
    for pos in range(4, 12):  # teacher-forced steps first (the 1st is eager, the 2nd compiles), then greedy
        tok_e = torch.tensor([prompt[pos]]) if pos < len(prompt) else tok_e
        tok_c = torch.tensor([prompt[pos]]) if pos < len(prompt) else tok_c
        le, lc = eager.decode_step(tok_e, pos), compiled.decode_step(tok_c, pos)
        # equal up to float summation order, which the bf16 rounding inside the int4 kernel can amplify
        assert rel(lc, le) <= 1e-2, pos
        tok_e, tok_c = le.argmax(-1), lc.argmax(-1)
    assert compiled.compile and compiled.compile_error is None  # really compiled, no eager fallback
    assert compiled._compiled is not None and compiled._compiled_calls >= 6
    for k_e, k_c in zip(eager.k, compiled.k):  # the compiled step wrote the same cache entries
        assert rel(k_c[:, :, :7], k_e[:, :, :7]) <= 1e-2
    again = Generator(model, max_len=48, compile=True)
    a = again.generate(prompt, 24)
    again.cached = []
    b = again.generate(prompt, 24)
    assert a.tokens == b.tokens and len(a.tokens) == 24  # greedy decoding through the compiled step is deterministic
    assert a.extra["compile_s"] > 0 and "compile_s" not in b.extra  # reported once, with the call that compiled


@pytest.mark.slow
def test_cli_generate_compile_flag_gives_the_eager_text(nano_q4_k_m, capfd):
    from quantkit.cli import main

    greedy = ["--temperature", "0"]  # the default samples with a fresh seed
    main(["generate", str(nano_q4_k_m), "Once upon a time", "--max-tokens", "12", *greedy])
    eager_out, _ = capfd.readouterr()
    main(["generate", str(nano_q4_k_m), "Once upon a time", "--max-tokens", "12", "--compile", *greedy])
    out, err = capfd.readouterr()
    assert out.startswith("Once upon a time") and len(out.split()) >= 6 and "tok/s" in err
    assert out == eager_out  # same kernels; the compiled step only fuses the small ops around them


def test_compile_failure_falls_back_to_eager_decoding(nano_path, monkeypatch):
    from quantkit.runtime.generate import Generator
    from quantkit.runtime.model import load_model

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = load_model(nano_path)
    prompt = [1, 6843, 3714, 264, 727]
    gen = Generator(model, max_len=32, compile=True)
    got = gen.generate(prompt, 6)
    assert not gen.compile and "no C++ compiler" in gen.compile_error
    assert got.tokens == Generator(model, max_len=32).generate(prompt, 6).tokens


@pytest.fixture(scope="module")
def nano_q4_0(tmp_path_factory, nano_path):
    return _nano_gguf(tmp_path_factory, nano_path, "Q4_0")


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0", "Q5_K_M", "Q4_0"])
def test_cpu_kernel_model_logits_match_the_exact_path(request, ftype):
    """Whole mistral-nano GGUF: the cpu-kernels model (this extension's kernels on every linear where it builds with
    AVX512-VNNI) against the exact fp32 dequantize-per-chunk path: prefill of 6 tokens (integer kernels) and of 12
    (bf16 tiles), and one decode step (M = 1)."""
    from quantkit.runtime.generate import Generator
    from quantkit.runtime.model import load_model

    path = request.getfixturevalue({"Q4_K_M": "nano_q4_k_m", "Q8_0": "nano_q8_0", "Q5_K_M": "nano_q5_k_m",
                                    "Q4_0": "nano_q4_0"}[ftype])
    fast, exact = load_model(path, cpu_kernels=True), load_model(path)
    gf, ge = Generator(fast, max_len=16), Generator(exact, max_len=16)
    long = torch.tensor([[1, 6843, 3714, 264, 727, 28725, 736, 264, 727, 3714, 6843, 264]])
    assert long.shape[1] >= cpu.PREFILL_ROWS
    assert rel(gf.forward(long, 0, all_logits=True), ge.forward(long, 0, all_logits=True)) <= 1e-2
    prompt = long[:, :6]
    assert rel(gf.forward(prompt, 0, all_logits=True), ge.forward(prompt, 0, all_logits=True)) <= 1e-2
    step = torch.tensor([736])
    assert rel(gf.decode_step(step, 6), ge.decode_step(step, 6)) <= 1e-2
    direct = cpu_ext.uses_simd()
    assert isinstance(fast.lm_head._fast, cpu.DirectGGML) == direct
    # every linear, Q4_0 / Q4_K included: no repacked copy of the weights
    assert isinstance(fast.model.layers[0].mlp.gate_up._fast, cpu.DirectGGML) == direct
    assert isinstance(fast.model.layers[0].self_attn.qkv._fast, cpu.DirectGGML) == direct


def test_gguf_weights_are_read_in_place(nano_q4_0):
    """A GGUF model's quantized weights are views of the file's memory map: nothing is copied at load (q|k|v and
    gate|up, written next to each other, are fused as views too), and q/k rows are in HF order (exact logits: the
    test above)."""
    from quantkit.gguf.reader import GGUFModel
    from quantkit.runtime.model import load_model

    model = load_model(nano_q4_0, cpu_kernels=True)
    layer = model.model.layers[1]
    storage = model.lm_head.data.untyped_storage()
    assert storage.nbytes() == nano_q4_0.stat().st_size  # the whole file, once
    for mod in (layer.self_attn.qkv, layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_up,
                layer.mlp.down_proj, model.model.embed_tokens):
        assert mod.data.untyped_storage().data_ptr() == storage.data_ptr()
    qkv, q = layer.self_attn.qkv.data, layer.self_attn.q_proj.data
    assert qkv.data_ptr() == q.data_ptr() and qkv.shape[0] == q.shape[0] + 2 * layer.self_attn.k_proj.data.shape[0]
    gguf = GGUFModel(nano_q4_0)
    name = "model.layers.1.self_attn.q_proj.weight"
    first, again = gguf.load(name).data, gguf.load(name).data
    assert np.array_equal(first, again)  # un-permuted once, in place
    from quantkit.gguf.reader import unpermute_rows

    assert np.array_equal(first, unpermute_rows(name, np.array(gguf.raw(name)), gguf.config))  # raw: file order
