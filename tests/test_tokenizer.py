"""Tokenizer: sentencepiece ground truth, v0.2 chat template vs mistral_common's v1 encoder, tokenizer.json fallback."""

import pytest

from quantkit.errors import TokenizerError
from quantkit.model.tokenizer import HFTokenizersTokenizer, SentencePieceTokenizer, load_tokenizer
from quantkit.testing import reference_tokenizer_model

TEXTS = [
    "Hello world",
    "It was a dark and stormy night; the rain fell in torrents.",
    "  two leading spaces and trailing  ",
    "é 你好 🙂 \u2603 and a rare glyph \U0001f9ec",
    "lines\n\nwith\tbreaks\n",
    "[INST] literal markers [/INST]",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a story about a dragon."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Rayleigh scattering."}, {"role": "user", "content": "And sunsets?\n\nBriefly."}],
    [{"role": "user", "content": "Unicode: naïve café 日本語 🙂"}],
]


@pytest.fixture(scope="module")
def sp_tok():
    path = reference_tokenizer_model()
    if path is None:
        pytest.skip("no Mistral tokenizer.model available")
    return load_tokenizer(path)


def test_special_ids_and_vocab(sp_tok):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.unk_id, sp_tok.vocab_size) == (1, 2, 0, 32000)
    assert sp_tok.byte_fallback
    assert sp_tok.encode("Hello")[0] == 1
    assert sp_tok.encode("Hello", bos=False)[0] != 1
    assert sp_tok.encode("Hello", bos=False, eos=True)[-1] == 2


def test_byte_fallback_round_trip(sp_tok):
    text = "a rare glyph \U0001f9ec"
    ids = sp_tok.encode(text, bos=False)
    assert 0 not in ids  # no <unk>: unseen characters become byte pieces
    assert any(sp_tok.id_to_piece(i).startswith("<0x") for i in ids)
    assert sp_tok.decode(ids) == text


def test_encode_matches_mistral_common(sp_tok):
    mc = pytest.importorskip("mistral_common.tokens.tokenizers.mistral")
    raw = mc.MistralTokenizer.v1().instruct_tokenizer.tokenizer
    for text in TEXTS:
        assert sp_tok.encode(text, bos=True) == raw.encode(text, bos=True, eos=False), text
        assert sp_tok.decode(sp_tok.encode(text)) == raw.decode(raw.encode(text, bos=True, eos=False))


def _mistral_common_chat(messages):
    mc = pytest.importorskip("mistral_common.tokens.tokenizers.mistral")
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from mistral_common.protocol.instruct.validator import ValidationMode

    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    # the v1 tokenizer the wheel ships, in "agnostic" mode so that a conversation may end with either role
    path = mc.MistralTokenizer.v1().instruct_tokenizer.tokenizer.file_path
    reference = mc.MistralTokenizer.from_file(str(path), mode=ValidationMode.agnostic)
    return reference.encode_chat_completion(request).tokens


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=lambda c: f"{len(c)}-messages")
def test_chat_template_matches_mistral_common_v1(sp_tok, conversation):
    assert sp_tok.apply_chat_template(conversation) == _mistral_common_chat(conversation)


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "system"),
    ([{"role": "tool", "content": "x"}], "unknown role"),
    ([], "no user message"),
    ([{"content": "no role"}], "role"),
])
def test_chat_template_rejects_bad_conversations(sp_tok, messages, needle):
    with pytest.raises(TokenizerError, match=needle):
        sp_tok.apply_chat_template(messages)


def test_tokenizer_json_fallback_matches_sentencepiece(sp_tok, tmp_path, nano_path):
    """A directory with only tokenizer.json (converted by transformers) uses `tokenizers`, same ids."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    transformers.AutoTokenizer.from_pretrained(str(nano_path)).save_pretrained(str(tmp_path))
    assert not (tmp_path / "tokenizer.model").exists()
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizersTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (1, 2, 0, 32000)
    for text in TEXTS:
        assert tok.encode(text) == sp_tok.encode(text), text
    for conversation in CONVERSATIONS:
        assert tok.apply_chat_template(conversation) == sp_tok.apply_chat_template(conversation)


def test_directory_preference_and_missing(tmp_path, nano_path):
    assert load_tokenizer(nano_path).path.name == "tokenizer.model"
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="sentencepiece"):
        load_tokenizer(tmp_path)
