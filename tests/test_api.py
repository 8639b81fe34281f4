"""The public Python API: the README example runs as written, `help(quantkit)` shows the API, results are honest."""

import contextlib
import io
import json
import pydoc
import re
from pathlib import Path

import pytest

import quantkit
from quantkit.testing import make_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
API = ("plan", "quantize", "convert", "evaluate", "inspect", "load", "generate", "report", "verify")


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no api-example block"
    return m.group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, nano_path):
    for name in ("models", "calib", "evaltext"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), {})
    printed = out.getvalue()
    assert "[gptq]" in printed and "[compressed-tensors]" in printed
    ppl, kld = re.search(r"PPL ([\d.]+) ± [\d.]+, KLD ([\d.]+)", printed).groups()
    assert 1 < float(ppl) < 1000 and 0 < float(kld) < 1
    assert (tmp_path / "out" / "api-w4" / "gptq" / "config.json").exists()


def test_help_shows_the_api():
    text = pydoc.render_doc(quantkit, renderer=pydoc.plaintext)
    for name in API:
        assert re.search(rf"^\s+{name}\(", text, re.M), name
    assert set(API) <= set(dir(quantkit)) and set(API) <= set(quantkit.__all__)


def test_api_functions_have_documented_signatures():
    for name in API:
        fn = getattr(quantkit, name)
        assert fn.__doc__ and fn.__annotations__.get("return"), name


def test_quantize_result_matches_cli_json(tmp_path, capsys):
    """The API and `quantkit quantize --json` report the same run in the same shape."""
    from quantkit.cli import main

    src = make_random_checkpoint(tmp_path / "src")
    result = quantkit.quantize(src, tmp_path / "api", preset="w4a16-g32", formats=["gptq", "compressed-tensors"])
    capsys.readouterr()
    main(["quantize", str(src), "--preset", "w4a16-g32", "--format", "gptq,compressed-tensors",
          "-o", str(tmp_path / "cli"), "--json"])  # returns normally on success
    cli = json.loads(capsys.readouterr().out)
    api = result.to_dict()
    assert set(cli) == set(api)
    for a, c in zip(api["outputs"], cli["outputs"]):
        assert (a["format"], a["bytes"], a["planned_bytes"]) == (c["format"], c["bytes"], c["planned_bytes"])
    assert set(result.paths) == {"gptq", "compressed-tensors"}
    for path in result.paths.values():
        assert (path / "config.json").exists()


def test_plan_reports_each_format_and_bad_input_raises(tmp_path):
    src = make_random_checkpoint(tmp_path / "src")
    plan = quantkit.plan(src, preset="w4a16-g32", formats="gptq,compressed-tensors")
    assert plan.formats == ["gptq", "compressed-tensors"]
    assert plan.bytes_out("gptq") > plan.bytes_out("compressed-tensors")  # packed zeros + g_idx
    with pytest.raises(quantkit.QuantkitError, match="unknown preset"):
        quantkit.plan(src, preset="w5a16")
    with pytest.raises(quantkit.QuantkitError):
        quantkit.quantize(src, tmp_path / "x", formats="nosuchformat")
    assert not (tmp_path / "x").exists()


def test_verify_api_checks_quantkits_reader(tmp_path, nano_path):
    """quantkit.verify mirrors `quantkit verify`: one result per output; without a client only quantkit's reader."""
    out = quantkit.quantize(nano_path, tmp_path / "w4", preset="w4a16-g128", formats="gptq").paths["gptq"]
    results = quantkit.verify(out, nano_path, use_client=False)
    assert len(results) == 1 and not results[0].failed
    data = results[0].to_dict()
    assert data["client"] == {"status": "skipped", "reason": "disabled (--no-client)"}
    assert data["format"] == "gptq" and data["quantkit_vs_source"]
