"""Hostile numbers through the real CLI (#13 "Bad numbers are named").

Option values: every numeric, size, regex and device option is checked by its click type, so a bad value is a
usage error (exit 2) naming the option, before any work, never a traceback and never silently ignored.
NaN/Inf weights: eval, compare, generate and chat stop with exit 3 and name the weight tensor (never `PPL nan`);
quantize refuses such a checkpoint naming the tensor and leaves no output.
"""

import importlib
import json
import math

import click
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.cli import COMMANDS, main
from quantkit.errors import EvalError, GenerationError
from quantkit.errors import NonFiniteError
from quantkit.testing import make_random_checkpoint

SMALL = dict(hidden=64, intermediate=256, heads=4, kv_heads=2, layers=2)
BAD_TENSOR = "model.layers.1.mlp.down_proj.weight"


def run(capsys, *args, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_usage_error(code, err, option):
    assert code == 2, err
    assert "Traceback" not in err
    assert f"Invalid value for '{option}'" in err, err


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("m") / "src", layout="hf-single", seed=3, **SMALL)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "t.txt"
    path.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 120)
    return path


def poisoned(directory, name, value, index=(3, 5)):
    """A copy of the small random checkpoint with one element of tensor `name` set to `value` (nan or inf)."""
    path = make_random_checkpoint(directory, layout="hf-single", seed=3, **SMALL)
    sd = load_file(path / "model.safetensors")
    t = sd[name].clone()
    t[index[: t.dim()]] = value
    sd[name] = t
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def nan_src(tmp_path_factory):
    return poisoned(tmp_path_factory.mktemp("nan") / "m", BAD_TENSOR, float("nan"))


# ---- option values: a usage error naming the option ----

M = "MODEL"  # parsing fails before the model is opened
USAGE_CASES = [
    # eval
    (["eval", M, "--text", "t.txt", "--max-windows", "0"], "--max-windows"),
    (["eval", M, "--text", "t.txt", "--max-windows", "-1"], "--max-windows"),
    (["eval", M, "--text", "t.txt", "--max-windows", "1.5"], "--max-windows"),
    (["eval", M, "--text", "t.txt", "--ctx", "0"], "--ctx"),
    (["eval", M, "--text", "t.txt", "--ctx", "3"], "--ctx"),
    (["eval", M, "--text", "t.txt", "--device", "gpu"], "--device"),
    (["eval", M, "--text", "t.txt", "--backend", "cuda"], "--backend"),
    # compare
    (["compare", M, M, "--max-windows", "0"], "--max-windows"),
    (["compare", M, M, "--ctx", "-8"], "--ctx"),
    (["compare", M, M, "--top", "-1"], "--top"),
    (["compare", M, M, "--device", "cuda:x"], "--device"),
    # generate / chat
    (["generate", M, "hi", "--max-tokens", "-1"], "--max-tokens"),
    (["generate", M, "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", M, "hi", "--temperature", "-0.5"], "--temperature"),
    (["generate", M, "hi", "--temperature", "nan"], "--temperature"),
    (["generate", M, "hi", "--temperature", "inf"], "--temperature"),
    (["generate", M, "hi", "--top-k", "-1"], "--top-k"),
    (["generate", M, "hi", "--top-p", "0"], "--top-p"),
    (["generate", M, "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", M, "hi", "--top-p", "nan"], "--top-p"),
    (["generate", M, "hi", "--seed", "-1"], "--seed"),
    (["generate", M, "hi", "--seed", str(2**64)], "--seed"),
    (["generate", M, "hi", "--device", "foo"], "--device"),
    (["chat", M, "--max-tokens", "-5"], "--max-tokens"),
    (["chat", M, "--top-p", "-1"], "--top-p"),
    # quantize / plan
    (["quantize", M, "-o", "out", "--block-size", "0"], "--block-size"),
    (["quantize", M, "-o", "out", "--block-size", "-4"], "--block-size"),
    (["quantize", M, "-o", "out", "--damp", "-0.1"], "--damp"),
    (["quantize", M, "-o", "out", "--damp", "0"], "--damp"),
    (["quantize", M, "-o", "out", "--damp", "1.5"], "--damp"),
    (["quantize", M, "-o", "out", "--damp", "nan"], "--damp"),
    (["quantize", M, "-o", "out", "--shard-size", "abc"], "--shard-size"),
    (["quantize", M, "-o", "out", "--shard-size", "0"], "--shard-size"),
    (["quantize", M, "-o", "out", "--shard-size", "-5GB"], "--shard-size"),
    (["quantize", M, "-o", "out", "--shard-size", "1e400GB"], "--shard-size"),
    (["quantize", M, "-o", "out", "--calib-samples", "0"], "--calib-samples"),
    (["quantize", M, "-o", "out", "--calib-seqlen", "1"], "--calib-seqlen"),
    (["quantize", M, "-o", "out", "--seed", "-3"], "--seed"),
    (["quantize", M, "-o", "out", "--override", "re:([=w8a16"], "--override"),
    (["quantize", M, "-o", "out", "--override", "-:(unclosed"], "--override"),
    (["quantize", M, "-o", "out", "--override", "no-equals-sign"], "--override"),
    (["quantize", M, "-o", "out", "--device", "cuda:"], "--device"),
    (["plan", M, "--override", "re:*bad=w8a16"], "--override"),
    (["plan", M, "--type", "Q4_K_M", "--override", "re:[=Q6_K"], "--override"),
    (["plan", M, "--calib-samples", "-1"], "--calib-samples"),
    # convert / imatrix / verify
    (["convert", M, "-o", "out", "--format", "hf", "--shard-size", "abc"], "--shard-size"),
    (["convert", M, "-o", "out", "--format", "hf", "--shard-size", "0.1B"], "--shard-size"),
    (["imatrix", M, "-o", "im.gguf", "--calib-samples", "0"], "--calib-samples"),
    (["imatrix", M, "-o", "im.gguf", "--calib-seqlen", "0"], "--calib-seqlen"),
    (["imatrix", M, "-o", "im.gguf", "--seed", "-1"], "--seed"),
    (["imatrix", M, "-o", "im.gguf", "--device", "tpu"], "--device"),
    (["verify", ".", "--ref", M, "--tol", "-1"], "--tol"),
    (["verify", ".", "--ref", M, "--tol", "nan"], "--tol"),
]


@pytest.mark.parametrize("args,option", USAGE_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USAGE_CASES])
def test_bad_option_value_is_a_usage_error_naming_the_option(capsys, tmp_path, monkeypatch, args, option):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *args)
    assert_usage_error(code, err, option)
    assert out == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "im.gguf").exists()


def _all_options():
    for name, module in COMMANDS.items():
        command = importlib.import_module(f"quantkit.commands.{module}").command
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_flag:
                yield name, param


NUMERIC_NAMES = ("max_windows", "max_tokens", "ctx", "top", "top_k", "top_p", "temperature", "seed", "tol", "damp",
                 "block_size", "calib_samples", "calib_seqlen", "shard_size", "overrides", "device", "backend")


def test_no_option_takes_an_unchecked_number():
    """The class, not the examples: no option of any command is a bare int/float (any value passes) and every
    numeric, size, regex, device or backend option has a checking type."""
    seen = set()
    for name, param in _all_options():
        assert param.type not in (click.INT, click.FLOAT), f"{name} {param.opts}: bare {param.type.name}"
        if param.name in NUMERIC_NAMES:
            seen.add(param.name)
            assert param.type is not click.STRING, f"{name} {param.opts}: unchecked string"
    assert seen == set(NUMERIC_NAMES)


def test_valid_values_still_pass(capsys, src, text, tmp_path):
    code, out, err = run(capsys, "plan", src, "--preset", "w4a16-g32", "--override", "re:.*down_proj=w8a16",
                         "--override", "-:.*layers\\.0\\.mlp.*", "--calib-samples", "1", "--calib-seqlen", "2",
                         "--seed", str(2**64 - 1), "--device", "cpu", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["overrides"] == ["re:.*down_proj=w8a16", "-:.*layers\\.0\\.mlp.*"]
    code, out, err = run(capsys, "quantize", src, "--preset", "w4a16-g32", "--shard-size", "2GiB", "--block-size", "1",
                         "--damp", "1", "--no-progress", "-o", tmp_path / "q")
    assert code == 0, err
    code, out, err = run(capsys, "eval", src, "--text", text, "--ctx", "4", "--max-windows", "1", "--no-progress",
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ppl"]["n_windows"] == 1 and math.isfinite(report["ppl"]["ppl"])
    code, out, err = run(capsys, "generate", src, "hi", "--max-tokens", "1", "--temperature", "0.5", "--top-p", "1",
                         "--top-k", "0", "--seed", "0")
    assert code == 0, err


def test_max_windows_is_checked_by_the_library_too():
    from quantkit.eval.perplexity import evaluate_perplexity

    ids = list(range(1, 200))
    for bad in (0, -1, 1.5):
        with pytest.raises(EvalError, match="max_windows"):
            evaluate_perplexity(lambda t: torch.zeros(1, t.shape[1], 300), ids, "gptq", 16, progress=False,
                                max_windows=bad)


def test_sampling_numbers_are_checked_by_the_library_too():
    from quantkit.runtime.generate import SamplingParams

    for kwargs in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": -1.0},
                   {"top_p": float("nan")}, {"top_k": -1}):
        with pytest.raises(GenerationError):
            SamplingParams(**kwargs)


# ---- NaN / Inf weights: an error naming the tensor, never a nan result ----

def assert_nonfinite_error(code, out, err, *needles):
    assert code == 3, err
    assert "Traceback" not in err and "PPL" not in out and "nan ±" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "NaN or Inf" in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_eval_of_nan_weights_is_an_error_naming_the_tensor(capsys, nan_src, text):
    code, out, err = run(capsys, "eval", nan_src, "--text", text, "--ctx", "32", "--max-windows", "2", "--no-progress")
    assert_nonfinite_error(code, out, err, str(nan_src), BAD_TENSOR, "[3, 5]")
    code, out, err = run(capsys, "eval", nan_src, "--text", text, "--ctx", "32", "--max-windows", "2", "--no-progress",
                         "--json")
    assert_nonfinite_error(code, out, err, BAD_TENSOR)
    assert out == ""


def test_eval_with_a_nan_reference_names_the_reference(capsys, src, nan_src, text):
    code, out, err = run(capsys, "eval", src, "--ref", nan_src, "--text", text, "--convention", "llamacpp", "--ctx",
                         "32", "--max-windows", "1", "--no-progress")
    assert_nonfinite_error(code, out, err, str(nan_src), BAD_TENSOR)


def test_compare_kld_of_nan_weights_is_an_error(capsys, src, nan_src, text):
    code, out, err = run(capsys, "compare", src, nan_src, "--text", text, "--ctx", "32", "--max-windows", "1",
                         "--no-weights", "--no-progress")
    assert_nonfinite_error(code, out, err, str(nan_src), BAD_TENSOR)


@pytest.mark.parametrize("nan_side", ["quant", "base"])
def test_compare_weight_error_of_nan_weights_is_an_error(capsys, src, nan_src, nan_side):
    base, quant = (src, nan_src) if nan_side == "quant" else (nan_src, src)
    code, out, err = run(capsys, "compare", base, quant, "--no-progress", "--json")
    assert_nonfinite_error(code, out, err, str(nan_src), BAD_TENSOR, "[3, 5]")
    assert out == ""


def test_eval_of_inf_in_a_norm_names_it(capsys, tmp_path, text):
    path = poisoned(tmp_path / "inf", "model.norm.weight", float("inf"))
    code, out, err = run(capsys, "eval", path, "--text", text, "--ctx", "32", "--max-windows", "1", "--no-progress")
    assert_nonfinite_error(code, out, err, "model.norm.weight", "[3]")


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--seed", "1"]], ids=["greedy", "sampled"])
def test_generate_with_nan_weights_is_an_error(capsys, nan_src, sampling):
    code, out, err = run(capsys, "generate", nan_src, "Once upon a time", "--max-tokens", "4", *sampling)
    assert code == 3, err
    assert "Traceback" not in err and "tokens |" not in err
    assert err.startswith("error: ") and BAD_TENSOR in err and "NaN or Inf" in err
    assert out.endswith("\n")  # the text's line is ended before the error line


def test_chat_with_nan_weights_is_an_error(capsys, monkeypatch, nan_src):
    code, out, err = run(capsys, "chat", nan_src, "--max-tokens", "4", stdin="Hello\n", monkeypatch=monkeypatch)
    assert code == 3, err
    assert "Traceback" not in err and BAD_TENSOR in err and "NaN or Inf" in err


@pytest.mark.parametrize("args", [["--preset", "w4a16-g32"], ["--type", "Q8_0"],
                                  ["--preset", "w4a16-g32", "--method", "gptq", "--calib-samples", "2",
                                   "--calib-seqlen", "32"]], ids=["rtn-gptq", "gguf-Q8_0", "gptq"])
def test_quantize_refuses_nan_weights_naming_the_tensor(capsys, nan_src, tmp_path, args):
    out_path = tmp_path / ("m.gguf" if "--type" in args else "out")
    code, out, err = run(capsys, "quantize", nan_src, *args, "--no-progress", "-o", out_path)
    assert code == 1, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and BAD_TENSOR in err and "NaN or Inf" in err and "[3, 5]" in err
    assert not out_path.exists()


# ---- the library pieces behind it ----

def test_perplexity_of_nan_logits_raises_exit_code_3():
    from quantkit.eval.perplexity import evaluate_perplexity

    def logits(t):
        out = torch.zeros(1, t.shape[1], 300)
        out[0, 5, 7] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match="window 0 .position 5") as exc:
        evaluate_perplexity(logits, list(range(1, 100)), "gptq", 16, progress=False)
    assert exc.value.exit_code == 3


def test_nonfinite_weights_finds_ggml_blocks_and_int_scales(src, tmp_path, capsys):
    from quantkit.runtime.generate import Generator
    from quantkit.runtime.model import load_model, nonfinite_weights
    from quantkit.runtime.qlinear import GGMLLinear, QuantLinear

    assert run(capsys, "quantize", src, "--type", "Q8_0", "--no-progress", "-o", tmp_path / "m.gguf")[0] == 0
    net = load_model(tmp_path / "m.gguf")
    assert nonfinite_weights(net) == []
    down = net.model.layers[0].mlp.down_proj
    assert isinstance(down, GGMLLinear) and down.type_name == "Q8_0"
    down.data = down.data.clone()  # (the loaded bytes may be a read-only file mapping)
    down.data[1, 34:36] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # row 1, block 1: fp16 scale d = NaN
    assert nonfinite_weights(net) == ["model.layers.0.mlp.down_proj.weight (Q8_0; first at index [1, 32])"]
    with pytest.raises(NonFiniteError, match="model.layers.0.mlp.down_proj.weight"):
        list(Generator(net, max_len=16).stream([1, 2, 3], 4))

    assert run(capsys, "quantize", src, "--preset", "w4a16-g32", "--no-progress", "-o", tmp_path / "q")[0] == 0
    net = load_model(tmp_path / "q")
    q = net.model.layers[1].self_attn.q_proj
    assert isinstance(q, QuantLinear)
    q.scales[0, 2] = float("inf")
    found = nonfinite_weights(net)
    assert found == ["model.layers.1.self_attn.q_proj.weight (its scales; first at index [0, 2])"]


def test_overflow_with_finite_weights_says_so(src):
    from quantkit.runtime.model import explain_nonfinite, load_model

    net = load_model(src)
    assert "every weight is finite" in explain_nonfinite(net)
