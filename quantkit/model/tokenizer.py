"""Tokenizers: sentencepiece `tokenizer.model` as ground truth, `tokenizer.json` (HF `tokenizers`) as fallback.

Both backends offer the same small interface: `encode(text, bos=True)`, `decode(ids)`, `encode_chat(messages)`,
`bos_id`, `eos_id`, `unk_id`, `vocab_size`. `encode_chat` uses the model's own chat template when it has one
(`chat_template`, found beside the tokenizer file by `load_tokenizer`: quantkit/model/chat_template.py), else
`apply_chat_template`: Mistral-7B-Instruct-v0.2's
`<s>[INST] user [/INST] assistant</s>[INST] user [/INST]`, encoded piece by piece exactly as mistral_common's
v1 instruct encoder does it (each user turn is the string "[INST] {content} [/INST]" tokenized on its own, each
assistant turn its content followed by EOS; a system prompt is prepended to the first user turn with "\n\n").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from quantkit.errors import TokenizerError

if TYPE_CHECKING:
    from quantkit.model.chat_template import ChatTemplate

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3", "tokenizer.json")


class Tokenizer:
    """Common logic; subclasses implement `_encode_plain(text) -> list[int]` and `decode`."""

    path: Path
    backend: str
    bos_id: int
    eos_id: int
    unk_id: int
    vocab_size: int

    chat_template: ChatTemplate | None = None  # the model's own template (None: the built-in [INST] encoder)

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_special(self, text: str) -> list[int]:
        """Ids of `text` in which special-token strings (`<s>`, `</s>`, control pieces such as a v3 tokenizer's
        `[INST]`) stand for their ids; the text between them is encoded piece by piece (no BOS added)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._encode_plain(text)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the model's own chat template (`chat_template`), or, when it has none, in
        the built-in v0.2 `[INST]` format (`apply_chat_template`). Raises TokenizerError when the template refuses
        the conversation or fails to render."""
        if self.chat_template is not None:
            return self.chat_template.encode(self, messages, add_generation_prompt)
        return self.apply_chat_template(list(messages))

    @property
    def chat_template_source(self) -> str:
        from quantkit.model.chat_template import FALLBACK

        return self.chat_template.source if self.chat_template is not None else FALLBACK

    def apply_chat_template(self, messages: list[Mapping[str, str]], bos: bool = True) -> list[int]:
        """Token ids of a conversation in the v0.2 `[INST] … [/INST]` template.

        Messages are dicts with `role` ("system", "user", "assistant") and `content`. System messages may only
        come first (they are joined and prepended to the first user turn); after them roles must alternate
        user/assistant starting with user. A final user turn leaves the prompt open for the model's answer.
        """
        system: list[str] = []
        turns: list[tuple[str, str]] = []
        for i, message in enumerate(messages):
            try:
                role, content = message["role"], message["content"]
            except (KeyError, TypeError):
                raise TokenizerError(f"chat message {i}: expected a dict with 'role' and 'content'") from None
            if not isinstance(content, str):
                raise TokenizerError(f"chat message {i}: content must be a string")
            if role == "system":
                if turns:
                    raise TokenizerError(f"chat message {i}: a system message may only come before the first "
                                         "user message")
                system.append(content)
                continue
            if role not in ("user", "assistant"):
                raise TokenizerError(f"chat message {i}: unknown role {role!r}; expected system, user or assistant")
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise TokenizerError(
                    f"chat message {i}: role {role!r} where {expected!r} was expected; conversation roles must "
                    "alternate user/assistant/user/assistant/..."
                )
            turns.append((role, content))
        if not turns:
            raise TokenizerError("chat conversation has no user message")
        ids = [self.bos_id] if bos else []
        for k, (role, content) in enumerate(turns):
            if role == "user":
                if k == 0 and system:
                    content = "\n\n".join(system) + "\n\n" + content
                ids += self._encode_plain(f"[INST] {content} [/INST]")
            else:
                if not content:
                    raise TokenizerError(f"chat turn {k}: empty assistant message")
                ids += self._encode_plain(content) + [self.eos_id]
        return ids

    def facts(self) -> dict:
        """What `quantkit inspect` shows about the tokenizer."""
        return {
            "file": self.path.name,
            "backend": self.backend,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
            "byte_fallback": self.byte_fallback,
        }

    byte_fallback: bool = False


class SentencePieceTokenizer(Tokenizer):
    backend = "sentencepiece"

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a readable sentencepiece model ({str(e).splitlines()[0]})"
                                 ) from None
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.vocab_size = self.sp.vocab_size()
        self.byte_fallback = self.sp.piece_to_id("<0x41>") != self.unk_id

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode_special(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(self._special_pattern().split(text)):
            if k % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids += self._encode_plain(part)
        return ids

    def _special_pattern(self) -> re.Pattern:
        if getattr(self, "_special_re", None) is None:
            sp = self.sp
            self._special_ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
            self._special_ids.pop("", None)
            names = sorted(self._special_ids, key=len, reverse=True)
            self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")" if names else "(?!x)x")
        return self._special_re

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


class HFTokenizersTokenizer(Tokenizer):
    """A `tokenizer.json` read with the `tokenizers` library (used only when no sentencepiece model exists)."""

    backend = "tokenizers"

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(f"{path}: reading tokenizer.json needs the 'tokenizers' package "
                                 "(pip install tokenizers)") from None
        self.path = Path(path)
        try:
            self.tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a plain Exception for malformed files
            raise TokenizerError(f"{self.path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
        special = _special_tokens(self.path.parent)
        self.bos_id = self._id(special.get("bos_token", "<s>"), 1)
        self.eos_id = self._id(special.get("eos_token", "</s>"), 2)
        self.unk_id = self._id(special.get("unk_token", "<unk>"), 0)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.byte_fallback = self.tok.token_to_id("<0x41>") is not None

    def _id(self, token: str, default: int) -> int:
        i = self.tok.token_to_id(token)
        return default if i is None else i

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_special(self, text: str) -> list[int]:
        return self._encode_plain(text)  # `tokenizers` matches its added special tokens in the text itself

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i))


def _special_tokens(directory: Path) -> dict[str, str]:
    """bos/eos/unk token strings from tokenizer_config.json, if present (strings or {"content": ...} dicts)."""
    from quantkit.io import read_json_or_empty
    from quantkit.model.chat_template import special_token_strings

    found = special_token_strings(read_json_or_empty(directory / "tokenizer_config.json"))
    return {k: v for k, v in found.items() if k in ("bos_token", "eos_token", "unk_token")}


def find_tokenizer_file(directory: str | Path) -> Path | None:
    directory = Path(directory)
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def load_tokenizer(path_or_dir: str | Path) -> Tokenizer:
    """A tokenizer from a file (`*.model*` sentencepiece or `tokenizer.json`) or a model directory."""
    path = Path(path_or_dir)
    if path.is_dir():
        found = find_tokenizer_file(path)
        if found is None:
            raise TokenizerError(f"{path}: no tokenizer file (expected one of {', '.join(TOKENIZER_FILES)})")
        path = found
    elif not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    tok: Tokenizer = HFTokenizersTokenizer(path) if path.name.endswith(".json") else SentencePieceTokenizer(path)
    from quantkit.model.chat_template import find_chat_template

    tok.chat_template = find_chat_template(path.parent)
    return tok
