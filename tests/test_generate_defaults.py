"""`generate` / `chat` defaults: the model's sampling (generation_config.json) else llama.cpp's, a seed that repeats
a sampled run, --temperature 0 greedy, and piped chat turns marked `user:` / `assistant:` on stdout."""

import io
import json
import re
from collections import Counter

import pytest

from quantkit.cli import main
from quantkit.errors import GenerationError
from quantkit.runtime.generate import DEFAULT_SAMPLING, model_sampling, resolve_sampling
from quantkit.testing import make_random_checkpoint


def test_model_sampling_reads_generation_config_as_transformers_does():
    assert model_sampling(None) == {**DEFAULT_SAMPLING, "source": "quantkit default"}
    assert model_sampling({"bos_token_id": 1, "eos_token_id": 2})["source"] == "quantkit default"
    assert model_sampling({"do_sample": False, "temperature": 0.7})["temperature"] == 0.0
    got = model_sampling({"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    assert (got["temperature"], got["top_k"], got["top_p"]) == (0.6, 50, 0.9)  # transformers' top_k default
    got = model_sampling({"top_k": 20})
    assert (got["temperature"], got["top_k"], got["top_p"]) == (1.0, 20, 1.0)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": 2.5}, {"temperature": "hot"}, {"top_p": float("nan")}):
        with pytest.raises(GenerationError, match="generation_config.json: "):
            model_sampling(bad)


def test_resolve_sampling_options_first_then_the_model():
    p = resolve_sampling(None, None, None, None, {"temperature": 0.6, "top_k": 50, "top_p": 0.9})
    assert (p.temperature, p.top_k, p.top_p) == (0.6, 50, 0.9) and p.seed is not None  # a drawn, reported seed
    p = resolve_sampling(0.0, None, None, None, None)
    assert (p.temperature, p.seed) == (0.0, None)
    p = resolve_sampling(1.2, 5, None, 7, None)
    assert (p.temperature, p.top_k, p.top_p, p.seed) == (1.2, 5, DEFAULT_SAMPLING["top_p"], 7)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = make_random_checkpoint(tmp_path_factory.mktemp("g") / "src", layers=1, hidden=64, intermediate=256,
                                  heads=4, kv_heads=2)
    if not (path / "tokenizer.model").exists():
        pytest.skip("no Mistral tokenizer.model available")
    return path


def _generate(capsys, *args):
    main(["generate", *args])
    out, err = capsys.readouterr()
    return out, err.strip().splitlines()[-1]


def test_generate_samples_by_default_and_the_seed_repeats_it(src, capsys):
    out, speed = _generate(capsys, str(src), "Once upon a time", "--max-tokens", "12")
    seed = re.search(r"\| temperature 0.8, top-k 40, top-p 0.95, seed (\d+)$", speed)
    assert seed, speed
    again, speed2 = _generate(capsys, str(src), "Once upon a time", "--max-tokens", "12", "--seed", seed.group(1))
    assert again == out and speed2.endswith(f"seed {seed.group(1)}")
    greedy, speed = _generate(capsys, str(src), "Once upon a time", "--max-tokens", "12", "--temperature", "0")
    assert speed.endswith("| greedy")
    assert _generate(capsys, str(src), "Once upon a time", "--max-tokens", "12", "--temperature", "0")[0] == greedy


def test_generate_follows_the_models_generation_config(src, tmp_path, capsys):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(src, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    _, speed = _generate(capsys, str(model), "Hi", "--max-tokens", "2")
    assert "| temperature 0.6, top-k 50, top-p 0.9, seed " in speed
    _, speed = _generate(capsys, str(model), "Hi", "--max-tokens", "2", "--top-k", "3", "--seed", "5")
    assert speed.endswith("| temperature 0.6, top-k 3, top-p 0.9, seed 5")
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert _generate(capsys, str(model), "Hi", "--max-tokens", "2")[1].endswith("| greedy")
    (model / "generation_config.json").write_text(json.dumps({"temperature": -3}))
    with pytest.raises(SystemExit) as e:
        main(["generate", str(model), "Hi", "--max-tokens", "2"])
    assert e.value.code != 0 and "temperature = -3 is not a valid sampling setting" in capsys.readouterr().err


def test_piped_chat_marks_the_turns(src, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n\nTell me a story\n/exit\n"))
    main(["chat", str(src), "--max-tokens", "4", "--seed", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "user: Hello there" and lines[1].startswith("assistant: ")
    assert lines[2] == "user: Tell me a story" and lines[3].startswith("assistant: ")
    assert len(lines) == 4


@pytest.mark.slow
def test_the_nano_demo_does_not_loop_by_default(nano_path, capsys):
    """Greedy decoding of the built-in model repeats a phrase; the default (sampled) generation does not."""
    def worst_repeat(text):
        words = text.split()
        return max(Counter(zip(words, words[1:], words[2:])).values())

    greedy, _ = _generate(capsys, str(nano_path), "Once upon a time", "--max-tokens", "48", "--temperature", "0")
    sampled, _ = _generate(capsys, str(nano_path), "Once upon a time", "--max-tokens", "48", "--seed", "1")
    assert worst_repeat(greedy) >= 4, greedy  # "and the door opened, and the door opened, ..."
    assert worst_repeat(sampled) <= 2, sampled
