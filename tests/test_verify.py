"""`quantkit verify OUT --ref SOURCE`: quantkit's reader vs the real client vs the source; exit 3 on disagreement."""

import json

import pytest

from cli_helpers import exit_code, run_captured
from quantkit.formats.clients import missing_client
from quantkit.pipeline.export import export_rtn
from quantkit.quant.scheme import PRESETS


@pytest.fixture(scope="module")
def ct_out(nano_path, tmp_path_factory):
    return export_rtn(nano_path, {"compressed-tensors": tmp_path_factory.mktemp("v") / "ct"},
                      PRESETS["w4a16-g128"])["compressed-tensors"]


@pytest.mark.slow
@pytest.mark.compat
def test_verify_compressed_tensors_passes(ct_out, nano_path, capsys):
    if missing_client("compressed-tensors"):
        pytest.skip(missing_client("compressed-tensors"))
    code, out = run_captured(capsys, "verify", str(ct_out), "--ref", str(nano_path), "--json")
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["client"]["status"] == "pass"
    assert result["client"]["max_rel_logit_diff"] <= 1e-3
    q = result["quantkit_vs_source"]
    assert 0 < q["kld_mean"] < 0.2 and q["same_top"] > 0.8  # 4-bit RTN: close to, not equal to, the source
    assert abs(result["client"]["client_vs_source"]["kld_mean"] - q["kld_mean"]) < 1e-3


@pytest.mark.slow
def test_verify_without_client_reports_skip(ct_out, nano_path, capsys):
    code, out = run_captured(capsys, "verify", str(ct_out), "--ref", str(nano_path), "--no-client")
    assert code == 0, out.err
    assert "SKIPPED" in out.out and "KLD mean" in out.out


def test_verify_refuses_a_different_reference(ct_out, tmp_path, capsys):
    from quantkit.testing import make_random_checkpoint

    other = make_random_checkpoint(tmp_path / "other", hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2)
    code, out = run_captured(capsys, "verify", str(ct_out), "--ref", str(other), "--no-client")
    assert code == 3 and "does not match the reference" in out.err


@pytest.mark.slow
@pytest.mark.compat
def test_verify_exit_code_3_when_client_disagrees(nano_path, tmp_path, capsys):
    """GPTQModel's CPU kernel differs from quantkit by ~2e-4 relative: a 1e-7 tolerance must fail with exit 3."""
    if missing_client("gptq"):
        pytest.skip(missing_client("gptq"))
    out = export_rtn(nano_path, {"gptq": tmp_path / "g"}, PRESETS["w4a16-g128"])["gptq"]
    code, res = run_captured(capsys, "verify", str(out), "--ref", str(nano_path), "--tol", "1e-7")
    assert code == 3, res.err
    assert "FAIL" in res.out and "differ from quantkit" in res.err


def test_verify_fails_when_the_client_is_missing(ct_out, nano_path, capsys, monkeypatch):
    """A verification that did not run is a failure (exit 3, one line saying why), not a quiet SKIPPED."""
    monkeypatch.setattr("quantkit.formats.clients.missing_client",
                        lambda fmt: "client packages not installed: compressed_tensors")
    code, out = run_captured(capsys, "verify", str(ct_out), "--ref", str(nano_path), "--json")
    assert code == 3
    result = json.loads(out.out)
    assert result["client"]["status"] == "not_run" and "not installed" in result["client"]["reason"]
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "client did not run: client packages not installed" in errors[0]
    code, out = run_captured(capsys, "verify", str(ct_out), "--ref", str(nano_path))
    assert code == 3 and "DID NOT RUN" in out.out


def test_verify_fails_when_the_client_cannot_load(ct_out, nano_path, capsys, monkeypatch):
    monkeypatch.setattr("quantkit.formats.clients.missing_client", lambda fmt: None)

    def broken(path, exact=True):
        raise RuntimeError("size mismatch for model.layers.0.mlp.up_proj.weight_zero_point")

    monkeypatch.setattr("quantkit.formats.clients.transformers_logits_fn", broken)
    code, out = run_captured(capsys, "verify", str(ct_out), "--ref", str(nano_path))
    assert code == 3 and "transformers could not load" in out.err and "size mismatch" in out.err


def test_verify_vllm_fails_when_its_venv_is_missing(ct_out, nano_path, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTKIT_VLLM_VENV", str(tmp_path / "no-venv"))
    code, out = run_captured(capsys, "verify", str(ct_out), "--ref", str(nano_path), "--client", "vllm", "--json")
    assert code == 3
    assert json.loads(out.out)["client"]["status"] == "not_run"
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "vllm client did not run" in errors[0] and "scripts/build_vllm.sh" in errors[0]
    code, out = run_captured(capsys, "verify", str(ct_out), "--ref", str(nano_path), "--client", "vllm", "--no-client")
    assert code == 0 and "SKIPPED" in out.out


def test_verify_json_stdout_is_json_only(ct_out, nano_path, capfd, monkeypatch):
    """Clients that print banners (gptqmodel) to stdout, from Python or from C / child processes: with --json,
    stdout holds only the JSON document; the noise goes to stderr."""
    import os

    from quantkit.formats.dequantized import dequantized_model

    def noisy(path, exact=True):
        print("GPTQModel banner (python print)")
        os.write(1, b"banner written to fd 1\n")
        model = dequantized_model(path)
        return lambda tokens: model(tokens)

    monkeypatch.setattr("quantkit.formats.clients.missing_client", lambda fmt: None)
    monkeypatch.setattr("quantkit.formats.clients.transformers_logits_fn", noisy)
    code = exit_code("verify", ct_out, "--ref", nano_path, "--json")
    out, err = capfd.readouterr()
    assert code == 0, err
    assert json.loads(out)["client"]["status"] == "pass"  # the same weights: identical logits
    assert "banner" in err and "banner" not in out


def test_verify_text_windows(ct_out, nano_path, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The river flows past the mill and under the old stone bridge. " * 40)
    code, out = run_captured(capsys, "verify", str(ct_out), "--ref", str(nano_path), "--no-client", "--text", str(text),
                    "--ctx", "64", "--max-windows", "3", "--json")
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["prompts"] == 3 and result["tokens"] == 192
