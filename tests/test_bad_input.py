"""Bad input through the CLI: one line `error: ...` naming the problem, exit code != 0, no traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.cli import main
from quantkit.testing import make_random_checkpoint


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def ckpt(tmp_path):
    return make_random_checkpoint(tmp_path / "m", layout="hf-sharded", shards=2, seed=0)


@pytest.mark.parametrize("cmd", ["inspect", "eval"])
def test_missing_shard(capsys, ckpt, tmp_path, cmd):
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    extra = ["--text", str(_text(tmp_path))] if cmd == "eval" else []
    code, _, err = run_cli(capsys, cmd, str(ckpt), *extra)
    assert_one_line_error(code, err, "model-00002-of-00002.safetensors", "missing")


def test_index_names_tensor_no_shard_has(capsys, ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = "model-00001-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_line_error(code, err, "model.layers.0.self_attn.q_norm.weight", "no shard contains it")


def test_truncated_safetensors(capsys, ckpt):
    shard = ckpt / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_line_error(code, err, "model-00001-of-00002.safetensors", "truncated")


def test_truncated_header(capsys, ckpt):
    shard = ckpt / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_line_error(code, err, "model-00002-of-00002.safetensors")


def test_wrong_dtype_int8_weight(capsys, ckpt):
    shard = ckpt / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.int8)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_line_error(code, err, name, "I8", "expected a float type")


def test_unknown_architecture(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_line_error(code, err, "GPT2LMHeadModel", "MistralForCausalLM", "LlamaForCausalLM")


def test_wrong_shape(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_line_error(code, err, "shape", "expected [256, 64]")


@pytest.mark.parametrize("cmd", ["inspect", "eval"])
def test_nonexistent_path(capsys, tmp_path, cmd):
    extra = ["--text", str(_text(tmp_path))] if cmd == "eval" else []
    code, _, err = run_cli(capsys, cmd, str(tmp_path / "no" / "such" / "model"), *extra)
    assert_one_line_error(code, err, "no such file or directory")


def test_not_a_model_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert_one_line_error(code, err, "not a model directory", "config.json")


def test_eval_missing_text_and_short_text(capsys, ckpt, tmp_path):
    code, _, err = run_cli(capsys, "eval", str(ckpt), "--text", str(tmp_path / "nope.txt"))
    assert_one_line_error(code, err, "nope.txt", "no such text file")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    code, _, err = run_cli(capsys, "eval", str(ckpt), "--text", str(short), "--no-progress")
    assert_one_line_error(code, err, "too short")


def test_offline_hub_id_subprocess(tmp_path):
    """Real console entry point, fresh interpreter so HF_HUB_OFFLINE is read by huggingface_hub at import."""
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "quantkit", "inspect", "quantkit-test/no-such-model"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "quantkit-test/no-such-model", "offline", "HF_HUB_OFFLINE")
    assert proc.stdout == ""


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    return path
