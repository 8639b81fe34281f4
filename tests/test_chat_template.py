"""The model's own chat template (quantkit/model/chat_template.py): found beside the tokenizer or in GGUF metadata,
rendered in a sandboxed Jinja environment exactly as transformers renders it, tokenized with special-token strings
as ids; Mistral's [INST] encoder when there is none; a template that fails is a clear error."""

import json
import shutil

import pytest

from quantkit.cli import main
from quantkit.errors import TokenizerError
from quantkit.model.chat_template import FALLBACK, ChatTemplate, find_chat_template
from quantkit.model.tokenizer import load_tokenizer
from quantkit.testing import make_random_checkpoint, reference_tokenizer_model

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Count:  1, 2,   3 — ünïcödé 😀"}],
]
CUSTOM = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer_model():
    path = reference_tokenizer_model()
    if path is None:
        pytest.skip("no Mistral tokenizer.model available")
    return path


def _model_dir(tmp_path, tokenizer_model, template=None, **config):
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    shutil.copyfile(tokenizer_model, d / "tokenizer.model")
    cfg = {"bos_token": "<s>", "eos_token": "</s>", **config}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_nano_template_gives_transformers_ids(nano_path):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(nano_path)
    assert tok.chat_template is not None and tok.chat_template_source == "tokenizer_config.json"
    hf = transformers.AutoTokenizer.from_pretrained(str(nano_path))
    for messages in CHATS:
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert tok.encode_chat(messages) == list(expected), messages
    # one user turn: the template and the built-in [INST] encoder (mistral_common's) agree
    assert tok.encode_chat(CHATS[0]) == tok.apply_chat_template(CHATS[0])


def test_a_custom_template_is_used_and_specials_become_ids(tmp_path, tokenizer_model):
    tok = load_tokenizer(_model_dir(tmp_path, tokenizer_model, CUSTOM))
    ids = tok.encode_chat(CHATS[1])
    text = "<s><|user|>\nHi!\n<|assistant|>\nHello. How can I help?\n<|user|>\n" + CHATS[1][2]["content"] + \
        "\n<|assistant|>\n"
    assert tok.chat_template.render(CHATS[1], bos_token="<s>") == text
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids == [tok.bos_id] + tok.encode(text[len("<s>"):], bos=False)
    assert ids != tok.apply_chat_template(CHATS[1])
    # an eos_token string in the rendered text is the EOS id, not the characters "</s>"
    eos = load_tokenizer(_model_dir(tmp_path, tokenizer_model, "{{ messages[0]['content'] }}{{ eos_token }}"))
    assert eos.encode_chat(CHATS[0])[-1] == eos.eos_id


def test_no_template_falls_back_to_mistral_inst(tmp_path, tokenizer_model):
    tok = load_tokenizer(_model_dir(tmp_path, tokenizer_model))
    assert tok.chat_template is None and tok.chat_template_source == FALLBACK
    for messages in CHATS:
        assert tok.encode_chat(messages) == tok.apply_chat_template(messages)


def test_where_templates_are_found(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert find_chat_template(d) is None
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "json {{ messages }}"}))
    assert find_chat_template(d).source == "chat_template.json"
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "named"}],
         "bos_token": {"content": "<s>"}}))
    found = find_chat_template(d)
    assert (found.template, found.source) == ("named", "tokenizer_config.json")
    assert found.special_tokens == {"bos_token": "<s>"}
    (d / "chat_template.jinja").write_text("jinja file")
    assert find_chat_template(d).template == "jinja file"
    assert find_chat_template(d, "from gguf").source == "gguf metadata"  # the format's metadata comes first


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('Only user and assistant roles are supported!') }}",
     "refused the conversation: Only user and assistant roles are supported!"),
    ("{% for m in messages %}{{ m['content'] }", "is not valid Jinja"),
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "failed to render (SecurityError"),
    ("{{ messages.append({'role': 'user', 'content': 'x'}) }}", "failed to render (SecurityError"),
    ("{{ messages[0]['content'] + 1 }}", "failed to render (TypeError"),
])
def test_a_template_that_fails_is_a_clear_error(template, message):
    t = ChatTemplate(template, "tokenizer_config.json")
    with pytest.raises(TokenizerError, match="chat template from tokenizer_config.json") as e:
        t.render(CHATS[0])
    assert message in str(e.value)


def test_template_sees_the_usual_globals():
    t = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ messages | length }}|"
                     "{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}", "x",
                     {"bos_token": "<s>", "eos_token": "</s>"})
    assert t.render(CHATS[0]) == '<s>|</s>|True|1|{"role": "user", "content": "Hi"}|4'


def test_generate_chat_and_gguf_use_the_models_template(tmp_path, capsys, tokenizer_model):
    src = make_random_checkpoint(tmp_path / "src", layers=1, hidden=64, intermediate=256, heads=4, kv_heads=2)
    shutil.copyfile(tokenizer_model, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "chat_template": CUSTOM}))
    expected = len(load_tokenizer(src).encode_chat([{"role": "user", "content": "Hello"}]))
    assert expected != len(load_tokenizer(src).apply_chat_template([{"role": "user", "content": "Hello"}]))
    main(["generate", str(src), "Hello", "--chat", "--max-tokens", "1", "--temperature", "0"])
    assert f"prefill {expected} tok" in capsys.readouterr().err
    gguf = tmp_path / "m.gguf"
    main(["convert", str(src), "--format", "gguf", "--type", "F32", "-o", str(gguf), "--no-progress"])
    capsys.readouterr()
    from quantkit.runtime.loading import load_with_tokenizer

    net, tok = load_with_tokenizer(gguf)
    assert tok.chat_template.source == "gguf metadata" and tok.chat_template.template == CUSTOM
    assert net.runtime_info["chat_template_source"] == "gguf metadata"
    main(["generate", str(gguf), "Hello", "--chat", "--max-tokens", "1", "--temperature", "0"])
    assert f"prefill {expected} tok" in capsys.readouterr().err


def test_a_refused_conversation_is_one_error_line(tmp_path, capsys, monkeypatch, nano_path):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    with pytest.raises(SystemExit) as e:
        main(["chat", str(nano_path), "--system", "Be terse.", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.strip() == ("error: the chat template from tokenizer_config.json refused the conversation: "
                           "Conversation roles must alternate user/assistant/user/assistant/...")
