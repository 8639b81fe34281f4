"""A model's own chat template, rendered as transformers renders it; Mistral's `[INST]` encoder when it has none.

Where the template comes from, first found wins:
  - GGUF metadata `tokenizer.chat_template` (the loader passes it in: `source="gguf metadata"`);
  - `chat_template.jinja` beside the tokenizer (transformers >= 4.43 writes it there);
  - `tokenizer_config.json`'s `chat_template`: a string, or a list of named templates (the one named "default");
  - `chat_template.json`'s `chat_template`.

The template is compiled in `jinja2.sandbox.ImmutableSandboxedEnvironment` (a template is untrusted input: it
cannot reach Python attributes or mutate its arguments) with transformers' settings: `trim_blocks`,
`lstrip_blocks`, the `loopcontrols` extension, the `tojson` filter and the globals `raise_exception` and
`strftime_now`; it sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `unk_token`, `pad_token`
(and any other special token string of tokenizer_config.json). A template that does not compile, raises, or
fails while rendering is a TokenizerError naming where it came from; quantkit never falls back silently.

The rendered text is tokenized with special-token strings (`<s>`, `</s>`, a v3 tokenizer's `[INST]`) standing for
their ids, every other piece encoded on its own (`Tokenizer.encode_special`), as llama.cpp's `parse_special` and
transformers' `apply_chat_template(tokenize=True)` do. Without a template, `Tokenizer.apply_chat_template`
(Mistral v0.2's `[INST]` format, as mistral_common encodes it) is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from quantkit.errors import TokenizerError
from quantkit.io import read_json_or_empty

FALLBACK = "built-in Mistral [INST] template"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass
class ChatTemplate:
    """A Jinja chat template and where it came from (`source`, used in error messages and by `inspect`)."""

    template: str
    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ... (from the config)
    _compiled: Any = field(default=None, init=False, repr=False, compare=False)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The conversation as the template writes it (a string with special-token strings in it)."""
        from jinja2.exceptions import TemplateError

        compiled = self._compile()
        context = {"bos_token": "", "eos_token": "", **self.special_tokens, **variables}
        try:
            return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                   **context)
        except _TemplateRaised as e:
            raise TokenizerError(f"the chat template from {self.source} refused the conversation: {e}") from None
        except TemplateError as e:  # undefined variables, sandbox violations, ...
            raise TokenizerError(f"the chat template from {self.source} failed to render "
                                 f"({type(e).__name__}: {e})") from None
        except Exception as e:  # a template is code: TypeError, KeyError, ... from its expressions
            raise TokenizerError(f"the chat template from {self.source} failed to render "
                                 f"({type(e).__name__}: {e})") from None

    def encode(self, tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
               ) -> list[int]:
        """Token ids of the rendered conversation (special-token strings become their ids)."""
        specials = {key: tokenizer.id_to_piece(i) for key, i in (("bos_token", tokenizer.bos_id),
                                                                  ("eos_token", tokenizer.eos_id))
                    if key not in self.special_tokens and i is not None and i >= 0}
        text = self.render(messages, add_generation_prompt, **specials)
        return tokenizer.encode_special(text)

    def _compile(self):
        if self._compiled is None:
            from jinja2 import TemplateSyntaxError

            try:
                self._compiled = _environment().from_string(self.template)
            except TemplateSyntaxError as e:
                raise TokenizerError(f"the chat template from {self.source} is not valid Jinja (line {e.lineno}: "
                                     f"{e.message})") from None
        return self._compiled


class _TemplateRaised(Exception):
    """What a template's `raise_exception(message)` raises."""


def _environment():
    """transformers' template environment (`_compile_jinja_template`), sandboxed and immutable."""
    from datetime import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _TemplateRaised(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# ---- finding a model's template ----

def _template_text(value: Any) -> str | None:
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def special_token_strings(config: Mapping[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... of a tokenizer_config.json (strings or {"content": ...} objects)."""
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def find_chat_template(directory: str | Path, metadata_template: str | None = None,
                       metadata_source: str = "gguf metadata") -> ChatTemplate | None:
    """The chat template of the model whose tokenizer is in `directory` (see the module docstring for the
    order), or None when it has none. `metadata_template`: a template the format's metadata carries (GGUF)."""
    directory = Path(directory)
    config = read_json_or_empty(directory / "tokenizer_config.json")
    specials = special_token_strings(config)
    if _template_text(metadata_template):
        return ChatTemplate(metadata_template, metadata_source, specials)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            text = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: cannot read the chat template ({e})") from None
        if text.strip():
            return ChatTemplate(text, str(jinja_file.name), specials)
    text = _template_text(config.get("chat_template"))
    if text is not None:
        return ChatTemplate(text, "tokenizer_config.json", specials)
    text = _template_text(read_json_or_empty(directory / "chat_template.json").get("chat_template"))
    if text is not None:
        return ChatTemplate(text, "chat_template.json", specials)
    return None
