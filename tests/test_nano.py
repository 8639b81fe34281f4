"""models/mistral-nano: architecture as specified (issue 3), transformers agrees with the reference model, it has
learned English (perplexity far below a random model's ~32000, readable greedy text)."""

import json

import pytest
import torch

from quantkit.cli import main
from quantkit.io import sha256_file
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.reference import Transformer
from quantkit.model.tokenizer import load_tokenizer

MISTRAL_V1_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
COMMON_WORDS = {"the", "and", "a", "to", "of", "i", "was", "he", "she", "it", "in", "that", "said", "his", "her"}


def cli_json(capsys, *args) -> dict:
    try:
        main(list(args))
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_inspect_shows_the_specified_architecture(capsys, nano_path):
    info = cli_json(capsys, "inspect", str(nano_path), "--json")
    cfg = info["config"]
    assert info["architecture"] == "MistralForCausalLM" and info["layout"] == "hf-sharded"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (32000, 256, 768)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 2, 32)
    assert cfg["num_hidden_layers"] >= 4 and cfg["intermediate_size"] % 256 == 0
    assert (cfg["rope_theta"], cfg["sliding_window"], cfg["max_position_embeddings"]) == (1e6, None, 32768)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["tie_word_embeddings"] is False
    assert info["dtypes"] == {"BF16": len(open_checkpoint(nano_path).tensor_names())}
    assert len(info["files"]) >= 2 and all(f["name"].startswith("model-0000") for f in info["files"])
    assert info["tokenizer"]["vocab_size"] == 32000 and info["tokenizer"]["chat_template"]
    assert all(c["status"] == "pass" for c in info["checks"])
    total = sum(p.stat().st_size for p in nano_path.iterdir() if p.is_file())
    assert total < 45 * 1000**2
    assert sha256_file(nano_path / "tokenizer.model") == MISTRAL_V1_TOKENIZER_SHA256
    raw = json.loads((nano_path / "config.json").read_text())
    assert "rope_theta" in raw and "torch_dtype" in raw  # Mistral-7B-Instruct-v0.2 spelling


def test_transformers_loads_folder_and_matches_reference(nano_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MistralForCausalLM.from_pretrained(str(nano_path), dtype=torch.float32)
    ours = Transformer.from_checkpoint(open_checkpoint(nano_path), torch.float32)
    tok = load_tokenizer(nano_path)
    for text in ["It was a dark and stormy night",
                 "The old man looked at the sea, and he said nothing for a long while. " * 6]:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            a, b = ours(ids).double(), hf(ids).logits.double()
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4
    # the chat template in tokenizer_config.json renders the v0.2 format
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(nano_path))
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered == "<s>[INST] Hi [/INST]"


def test_greedy_generation_is_english(nano_path):
    model = Transformer.from_checkpoint(open_checkpoint(nano_path), torch.float32)
    tok = load_tokenizer(nano_path)
    ids = tok.encode("It was a dark and stormy night")
    model.setup_caches(1, len(ids) + 40)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
        pos = len(ids)
        for _ in range(40):
            nxt = int(logits[0, -1].argmax())
            ids.append(nxt)
            logits = model(torch.tensor([[nxt]]), start_pos=pos)
            pos += 1
    words = [w.strip(".,;:!?\"'()").lower() for w in tok.decode(ids).split()]
    assert len(set(words) & COMMON_WORDS) >= 3, words


@pytest.mark.slow
def test_perplexity_far_below_random(capsys, nano_path, wikitext_path, pg_calib_dir):
    wiki = cli_json(capsys, "eval", str(nano_path), "--text", str(wikitext_path), "--convention", "llamacpp",
                    "--max-windows", "3", "--json", "--no-progress")
    assert wiki["ppl"]["n_windows"] == 3 and wiki["ppl"]["ppl"] < 32000 / 4
    calib = cli_json(capsys, "eval", str(nano_path), "--text", str(pg_calib_dir), "--convention", "gptq",
                     "--ctx", "512", "--max-windows", "3", "--json", "--no-progress")
    assert calib["ppl"]["ppl"] < 300
