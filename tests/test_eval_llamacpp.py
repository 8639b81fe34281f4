"""The `llamacpp` perplexity convention reproduces llama-perplexity itself (same model converted to GGUF F32)."""

import json
import re
import subprocess
import sys

import pytest

from quantkit.cli import main
from quantkit.testing import llamacpp_convert_script
from tests.conftest import require_llamacpp


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llamacpp_convention_matches_llama_perplexity(capsys, nano_path, tmp_path):
    tools = require_llamacpp("llama-perplexity")
    script = llamacpp_convert_script()
    if script is None:
        pytest.skip("llama.cpp convert_hf_to_gguf.py not available")
    gguf_path = tmp_path / "nano-f32.gguf"
    proc = subprocess.run([sys.executable, str(script), str(nano_path), "--outfile", str(gguf_path),
                           "--outtype", "f32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(
        f"Chapter {i}. It was the best of times, it was the worst of times; the old captain walked slowly "
        f"down to the harbour, where {i * 7} ships lay at anchor, and he thought of his daughter and of the sea."
        for i in range(60)))
    proc = subprocess.run([str(tools["llama-perplexity"]), "-m", str(gguf_path), "-f", str(text), "-c", "128",
                           "--chunks", "6", "-t", "2"], capture_output=True, text=True, timeout=600)
    match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout + proc.stderr)
    assert match, (proc.stdout + proc.stderr)[-3000:]
    ppl_llama, err_llama = float(match.group(1)), float(match.group(2))
    try:
        main(["eval", str(nano_path), "--text", str(text), "--convention", "llamacpp", "--ctx", "128",
              "--max-windows", "6", "--json", "--no-progress"])
    except SystemExit as e:
        assert not e.code
    ours = json.loads(capsys.readouterr().out)["ppl"]
    assert ours["n_windows"] == 6
    assert ours["ppl"] == pytest.approx(ppl_llama, rel=2e-3)
    assert ours["ppl_stderr"] == pytest.approx(err_llama, rel=2e-2)
