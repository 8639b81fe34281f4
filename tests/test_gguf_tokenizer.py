"""llama.cpp's tokenizer on a quantkit GGUF gives the same ids as quantkit's (sentencepiece) tokenizer."""

import ast
import re
import subprocess

import pytest
from sentencepiece import SentencePieceProcessor

from quantkit.formats.base import read_checkpoint
from quantkit.gguf.convert import write_gguf
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.tokenizer import load_tokenizer
from tests.conftest import require_llamacpp

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,   runs of    spaces,\ttabs\t\tand\n\nnewlines\n   indented\n",
    "trailing spaces   ",
    "Café naïve façade — “curly quotes” and ‘single’ … ellipsis",
    "日本語のテキスト、中文文本，한국어 텍스트, Ελληνικά, русский текст, עברית, العربية",
    "emoji 😀🎉👍🏽 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 zero\u200bwidth \u00a0nbsp",
    "digits 3.14159 1234567890 1,000,000 0x1F 2024-01-31 12:30:45 -42 +7e-3",
    "[INST] Write a haiku about the sea. [/INST]",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass",
    "<s> not special here </s> [/INST] <unk>",
    "a" * 300 + " " + "ab" * 50,
]


@pytest.fixture(scope="module")
def gguf_path(nano_path, tmp_path_factory):
    return write_gguf(open_checkpoint(nano_path), tmp_path_factory.mktemp("tok") / "nano.gguf", "Q8_0",
                      progress=False)


def _llama_tokenize(tool, gguf, text, tmp_path, parse_special=False, bos=True):
    f = tmp_path / "prompt.txt"
    f.write_bytes(text.encode("utf-8"))
    args = [str(tool), "-m", str(gguf), "-f", str(f), "--ids", "--log-disable"]
    if not parse_special:
        args.append("--no-parse-special")
    if not bos:
        args.append("--no-bos")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


def test_llama_tokenize_matches_quantkit(nano_path, gguf_path, tmp_path):
    tool = require_llamacpp("llama-tokenize")["llama-tokenize"]
    tok = load_tokenizer(nano_path)
    for text in SAMPLES:
        assert _llama_tokenize(tool, gguf_path, text, tmp_path) == tok.encode(text, bos=True), text


def test_llama_tokenize_matches_quantkit_on_chats(nano_path, gguf_path, tmp_path):
    """The GGUF's chat template rendered by jinja, tokenized by llama.cpp (special tokens parsed) and by quantkit.

    A rendered chat is a string with special tokens inside; both sides split it at the special tokens and
    tokenize each text fragment with the sentencepiece dummy prefix (HF `legacy=True`, llama.cpp SPM).
    """
    import jinja2

    tool = require_llamacpp("llama-tokenize")["llama-tokenize"]
    tok = load_tokenizer(nano_path)
    ckpt = read_checkpoint(gguf_path)
    template = jinja2.Environment().from_string(ckpt.metadata["chat_template"])
    chats = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
         {"role": "user", "content": "Count:  1, 2,   3 — ünïcödé 😀"}],
    ]
    for messages in chats:
        rendered = template.render(messages=messages, bos_token="<s>", eos_token="</s>")
        assert rendered.startswith("<s>[INST] ")
        expected = []
        for part in re.split(r"(<s>|</s>)", rendered):
            if part in ("<s>", "</s>"):
                expected.append(tok.bos_id if part == "<s>" else tok.eos_id)
            elif part:
                expected += tok.encode(part, bos=False)
        got = _llama_tokenize(tool, gguf_path, rendered, tmp_path, parse_special=True, bos=False)
        assert got == expected, rendered
    # a single user turn: quantkit's chat encoder (mistral_common convention) agrees with the template string
    rendered = template.render(messages=chats[0], bos_token="<s>", eos_token="</s>")
    got = _llama_tokenize(tool, gguf_path, rendered, tmp_path, parse_special=True, bos=False)
    assert got == tok.apply_chat_template(chats[0])


def test_tokenizer_rebuilt_from_gguf_matches_the_original(nano_path, gguf_path):
    ckpt = read_checkpoint(gguf_path)
    assert ckpt.tokenizer_path is not None
    rebuilt, original = SentencePieceProcessor(), SentencePieceProcessor()
    rebuilt.LoadFromFile(str(ckpt.tokenizer_path))
    original.LoadFromFile(str(nano_path / "tokenizer.model"))
    assert rebuilt.vocab_size() == original.vocab_size()
    for text in SAMPLES:
        assert rebuilt.encode(text) == original.encode(text), text
        ids = original.encode(text)
        assert rebuilt.decode(ids) == original.decode(ids)
    assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.unk_id()) == (1, 2, 0)


def test_tokenizer_of_a_llamacpp_gguf(tmp_path, nano_path):
    """llama.cpp's converter output (scores -1000 / CONTROL for <unk>) also rebuilds a working tokenizer."""
    import sys

    from quantkit.testing import llamacpp_convert_script

    script = llamacpp_convert_script()
    if script is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is absent")
    out = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, str(script), str(nano_path), "--outtype", "bf16", "--outfile", str(out)],
                   check=True, capture_output=True)
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(read_checkpoint(out).tokenizer_path))
    original = load_tokenizer(nano_path)
    for text in SAMPLES:
        assert sp.encode(text) == original.encode(text, bos=False), text
