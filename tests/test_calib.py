"""Calibration data: the built-in set (size, hash, regeneration), local loaders, sampling, bad input."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from quantkit.calib import BUILTIN_DIR, load_calibration, open_source, sample_windows, tokens_sha256
from quantkit.errors import CalibrationError
from quantkit.model.tokenizer import load_tokenizer
from quantkit.testing import REPO_ROOT, reference_tokenizer_model


@pytest.fixture(scope="module")
def tok():
    path = reference_tokenizer_model()
    if path is None:
        pytest.skip("no Mistral tokenizer.model available")
    return load_tokenizer(path)


def test_builtin_manifest_hashes_match_files():
    manifest = json.loads((BUILTIN_DIR / "manifest.json").read_text())
    assert {e["kind"] for e in manifest["files"]} == {"prose", "chat", "code", "lists"}
    for e in manifest["files"]:
        data = (BUILTIN_DIR / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"]
    assert manifest["sha256"] == hashlib.sha256("".join(e["sha256"] for e in manifest["files"]).encode()).hexdigest()


def test_builtin_set_is_regenerated_byte_identically(tmp_path):
    """scripts/make_calib.py is the source of the set: running it again gives the same files."""
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_calib.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    ours = json.loads((tmp_path / "manifest.json").read_text())
    stored = json.loads((BUILTIN_DIR / "manifest.json").read_text())
    assert ours["sha256"] == stored["sha256"]


def test_evaluation_text_is_regenerated_and_never_calibration_text(tmp_path):
    """evaltext/prose.txt comes from scripts/make_calib.py too, and no paragraph of it is in the calibration set."""
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_calib.py"), "--out", str(tmp_path / "c"),
                    "--eval-out", str(tmp_path / "e")], check=True, capture_output=True)
    stored = REPO_ROOT / "evaltext" / "prose.txt"
    assert (tmp_path / "e" / "prose.txt").read_bytes() == stored.read_bytes()
    manifest = json.loads((REPO_ROOT / "evaltext" / "manifest.json").read_text())
    assert manifest["files"][0]["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    calibration = "\n\n".join((BUILTIN_DIR / f).read_text() for f in ("prose.txt", "chat.jsonl", "code.txt",
                                                                        "lists.txt"))
    paragraphs = stored.read_text().rstrip("\n").split("\n\n")
    assert len(paragraphs) > 200
    assert not [p for p in paragraphs if p in calibration]


def test_builtin_set_gives_128_distinct_512_token_samples(tok):
    calib = load_calibration("builtin", tok, n_samples=128, seqlen=512, seed=0)
    assert calib.tokens.shape == (128, 512)
    assert calib.identity["available_tokens"] >= 128 * 512  # enough for non-overlapping windows
    assert bool((calib.tokens[:, 0] == tok.bos_id).all())
    assert calib.identity["source"] == "builtin"
    assert calib.identity["tokens_sha256"] == tokens_sha256(calib.tokens)
    # conversations are rendered with the chat template
    text = tok.decode(torch.cat(list(calib.tokens[:, 1:])).tolist())
    assert "[INST]" in text and "def " in text
    again = load_calibration("builtin", tok, n_samples=128, seqlen=512, seed=0)
    assert again.sha256 == calib.sha256
    other = load_calibration("builtin", tok, n_samples=128, seqlen=512, seed=1)
    assert other.sha256 != calib.sha256


def test_local_txt_jsonl_parquet_and_directory(tmp_path, tok):
    prose = "The quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "a.txt").write_text(prose)
    rows = [{"text": "Numbers: " + ", ".join(str(i) for i in range(200))},
            {"messages": [{"role": "user", "content": "Hi there, how are you?"},
                          {"role": "assistant", "content": "Fine, thanks for asking."}]},
            "a bare string record with a few words in it"]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row one " * 30, "parquet row two " * 30]}), tmp_path / "c.parquet")

    assert open_source(tmp_path / "a.txt").documents == [prose]
    docs = open_source(tmp_path / "b.jsonl").documents
    assert docs[0].startswith("Numbers") and isinstance(docs[1], list) and docs[2].startswith("a bare")
    assert len(open_source(tmp_path / "c.parquet").documents) == 2
    src = open_source(tmp_path)
    assert len(src.documents) == 1 + 3 + 2 and src.details["files"] == 3

    calib = load_calibration(str(tmp_path / "b.jsonl"), tok, n_samples=4, seqlen=32, seed=0)
    assert calib.tokens.shape == (4, 32)
    stream_text = tok.decode(calib.tokens[0, 1:].tolist())
    assert stream_text  # decodes
    calib_dir = load_calibration(str(tmp_path), tok, n_samples=3, seqlen=64, seed=5)
    assert calib_dir.identity["source_sha256"] == open_source(tmp_path).sha256


def test_pg_english_directory(pg_calib_dir, tok):
    calib = load_calibration(str(pg_calib_dir), tok, n_samples=8, seqlen=512, seed=0)
    assert calib.tokens.shape == (8, 512)
    assert calib.identity["available_tokens"] > 100_000


def test_empty_and_too_short_data(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(CalibrationError, match="no text"):
        load_calibration(str(tmp_path / "empty.txt"), tok, n_samples=2, seqlen=16)
    (tmp_path / "short.txt").write_text("Only a few words here.")
    with pytest.raises(CalibrationError, match=r"too short: \d+ tokens.*--calib-seqlen 512"):
        load_calibration(str(tmp_path / "short.txt"), tok, n_samples=2, seqlen=512)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: not valid JSON"):
        open_source(tmp_path / "bad.jsonl")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CalibrationError, match="no calibration files"):
        open_source(tmp_path / "nothing")
    with pytest.raises(CalibrationError, match="not a file, a directory, or a known dataset"):
        open_source("no-such-dataset-or-file")
    with pytest.raises(CalibrationError, match="at least 1"):
        sample_windows([1, 2, 3], 0, 2, 0, None)


def test_hf_dataset_offline_is_a_clear_error():
    pytest.importorskip("datasets")
    code = ("from quantkit.calib import open_source\n"
            "from quantkit.errors import CalibrationError\n"
            "try:\n    open_source('wikitext2')\nexcept CalibrationError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=os.devnull + "-missing")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR calibration dataset 'wikitext2'" in out.stdout, out.stdout + out.stderr
    assert "--calib builtin" in out.stdout
