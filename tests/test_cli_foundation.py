"""`quantkit inspect`, `eval`, `compare` on fixtures: output on stdout, JSON, numbers equal the library's."""

import json
import subprocess
import sys

import pytest
import torch

from quantkit.cli import main
from quantkit.eval.perplexity import evaluate_perplexity
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.reference import Transformer
from quantkit.model.tokenizer import load_tokenizer
from quantkit.testing import make_random_checkpoint, make_sparse_checkpoint


def run_cli(capsys, *args):
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out, out.err


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("cli") / "m", seed=4, shards=3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(("It was a dark and stormy night; the rain fell in torrents, except at occasional intervals. " * 30
                     + "\n\n") * 3)
    return path


def test_inspect_text_and_json(capsys, fixture_dir):
    out, _ = run_cli(capsys, "inspect", str(fixture_dir))
    assert "MistralForCausalLM" in out and "hf-sharded" in out and "BF16 x21" in out
    assert "model-00003-of-00003.safetensors" in out and "byte fallback yes" in out
    info = json.loads(run_cli(capsys, "inspect", str(fixture_dir), "--json")[0])
    assert info["parameters"] == open_checkpoint(fixture_dir).num_parameters
    assert info["layout"] == "hf-sharded" and len(info["files"]) == 3
    assert info["tokenizer"]["vocab_size"] == 32000 and info["tokenizer"]["bos_id"] == 1
    assert all(c["status"] != "fail" for c in info["checks"])


def test_inspect_consolidated(capsys, tmp_path):
    path = make_random_checkpoint(tmp_path / "c", layout="consolidated", sliding_window=4096)
    info = json.loads(run_cli(capsys, "inspect", str(path), "--json")[0])
    assert info["layout"] == "consolidated" and info["config"]["sliding_window"] == 4096
    assert any(c["name"] == "sliding_window" for c in info["checks"])


def test_eval_json_equals_library(capsys, fixture_dir, text_file):
    out, err = run_cli(capsys, "eval", str(fixture_dir), "--text", str(text_file), "--ctx", "64", "--json",
                       "--max-windows", "6")
    result = json.loads(out)  # progress bars went to stderr, stdout is pure JSON
    model = Transformer.from_checkpoint(open_checkpoint(fixture_dir), torch.float32)
    ids = load_tokenizer(fixture_dir).encode(text_file.read_text())
    expected = evaluate_perplexity(model, ids, "llamacpp", 64, progress=False, max_windows=6)  # the default
    assert result["ppl"]["ppl"] == pytest.approx(expected.ppl, rel=1e-5)
    assert result["ppl"]["n_windows"] == expected.n_windows and result["ppl"]["n_tokens"] == expected.n_tokens
    assert result["text"]["tokens"] == len(ids) and result["convention"] == "llamacpp" and result["ctx"] == 64


def test_eval_text_output_with_ref(capsys, fixture_dir, text_file):
    out, _ = run_cli(capsys, "eval", str(fixture_dir), "--text", str(text_file), "--convention", "llamacpp",
                     "--ctx", "64", "--ref", str(fixture_dir), "--max-windows", "3", "--no-progress")
    assert "llamacpp, ctx 64" in out and "3 windows, 93 scored tokens" in out
    assert "====== KL divergence statistics ======" in out and "Same top p: 100.000" in out


def test_compare_weights_and_kld(capsys, fixture_dir, tmp_path, text_file):
    other = make_random_checkpoint(tmp_path / "o", seed=4, shards=1, layout="hf-single")
    result = json.loads(run_cli(capsys, "compare", str(fixture_dir), str(other), "--text", str(text_file),
                                "--ctx", "64", "--max-windows", "2", "--json", "--no-progress")[0])
    assert len(result["weights"]) == 2 * 7 + 2  # linears + embeddings + lm_head
    assert all(r["sqnr_db"] > 200 for r in result["weights"])  # identical tensors
    assert result["compare"]["kld"]["mean"] == pytest.approx(0.0, abs=1e-7)


def test_eval_and_compare_share_one_default_convention(capsys, fixture_dir, tmp_path, text_file):
    """The same pair gives the same KLD from `eval --ref`, `compare` and quantkit.evaluate with no --convention."""
    import inspect

    import quantkit
    from quantkit.commands.compare import command as compare_cmd
    from quantkit.commands.eval import command as eval_cmd
    from quantkit.eval import run

    eval_defaults = {p.name: p.default for p in eval_cmd.params}
    compare_defaults = {p.name: p.default for p in compare_cmd.params}
    assert eval_defaults["convention"] == compare_defaults["convention"] == "llamacpp"
    for fn in (quantkit.evaluate, run.evaluate, run.compare):
        assert inspect.signature(fn).parameters["convention"].default == "llamacpp", fn
    other = make_random_checkpoint(tmp_path / "o", seed=5, shards=1, layout="hf-single")
    ev = json.loads(run_cli(capsys, "eval", str(other), "--ref", str(fixture_dir), "--text", str(text_file),
                            "--ctx", "64", "--max-windows", "3", "--json", "--no-progress")[0])
    cmp = json.loads(run_cli(capsys, "compare", str(fixture_dir), str(other), "--text", str(text_file), "--ctx",
                             "64", "--max-windows", "3", "--no-weights", "--json", "--no-progress")[0])
    assert ev["convention"] == cmp["compare"]["convention"] == "llamacpp"
    assert ev["compare"]["kld"]["mean"] == pytest.approx(cmp["compare"]["kld"]["mean"], rel=1e-6)
    assert ev["compare"]["kld"]["mean"] > 0
    assert "(default 512 for llamacpp" in run_cli(capsys, "eval", "--help")[0]


def test_inspect_peak_rss_far_below_checkpoint_size(tmp_path):
    """A sparse 2.3 GB checkpoint: inspect in a fresh interpreter must stay far below that (lazy headers only)."""
    path = make_sparse_checkpoint(tmp_path / "big")
    size = (path / "model.safetensors").stat().st_size
    assert size > 2 * 1000**3
    code = (f"import resource, sys\nfrom quantkit.cli import main\ntry:\n"
            f"    main(['inspect', {str(path)!r}, '--json'])\n"
            "except SystemExit as e:\n    assert not e.code\n"
            # VmHWM, not ru_maxrss: ru_maxrss survives exec and would count the forking pytest process
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
            "print('PEAK', hwm, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["parameters"] > 1_000_000_000
    peak = int(next(line for line in proc.stderr.splitlines() if line.startswith("PEAK")).split()[1]) * 1024
    assert peak < size / 4, f"peak RSS {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"


def test_inspect_gguf_converted_by_llamacpp(capsys, fixture_dir, tmp_path):
    """A GGUF written by llama.cpp's own converter is shown through read_checkpoint."""
    from quantkit.testing import llamacpp_convert_script

    script = llamacpp_convert_script()
    if script is None:
        pytest.skip("llama.cpp convert_hf_to_gguf.py not available (run scripts/build_llamacpp.sh)")
    pytest.importorskip("gguf")
    out = tmp_path / "m-f16.gguf"
    proc = subprocess.run([sys.executable, str(script), str(fixture_dir), "--outfile", str(out), "--outtype", "f16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(run_cli(capsys, "inspect", str(out), "--json")[0])
    assert info["kind"] == "quantized" and info["format"] == "gguf"
    assert info["architecture"] in ("MistralForCausalLM", "LlamaForCausalLM")  # GGUF says "llama" for both
    assert info["parameters"] == open_checkpoint(fixture_dir).num_parameters
    assert info["config"]["num_key_value_heads"] == 2 and info["config"]["rope_theta"] == 1e6
    text, _ = run_cli(capsys, "inspect", str(out))
    assert "format        gguf" in text and "BPW" in text


def test_inspect_and_compare_quantized_gptq(capsys, tmp_path, text_file):
    """A GPTQ-format RTN checkpoint: inspect shows int4 tensors, compare gives a finite SQNR and a positive KLD."""
    base = make_random_checkpoint(tmp_path / "b", hidden=128, intermediate=256, seed=6)
    run_cli(capsys, "quantize", str(base), "--method", "rtn", "--preset", "w4a16-g128", "--format", "gptq",
            "-o", str(tmp_path / "q"), "--no-progress")
    info = json.loads(run_cli(capsys, "inspect", str(tmp_path / "q"), "--json")[0])
    assert info["format"] == "gptq" and info["tensor_types"]["int4-g128"] == 14
    result = json.loads(run_cli(capsys, "compare", str(base), str(tmp_path / "q"), "--text", str(text_file),
                                "--ctx", "64", "--max-windows", "2", "--json", "--no-progress")[0])
    linears = [r for r in result["weights"] if r["kind"] == "int4-g128"]
    assert len(linears) == 14 and all(10 < r["sqnr_db"] < 30 for r in linears)
    assert result["compare"]["kld"]["mean"] > 0
