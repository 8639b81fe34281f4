"""Tokenizers: sentencepiece `tokenizer.model` as ground truth, `tokenizer.json` (HF `tokenizers`) as fallback.

Both backends offer the same small interface: `encode(text, bos=True)`, `decode(ids)`, `apply_chat_template(messages)`,
`bos_id`, `eos_id`, `unk_id`, `vocab_size`. The chat template is Mistral-7B-Instruct-v0.2's
`<s>[INST] user [/INST] assistant</s>[INST] user [/INST]`, encoded piece by piece exactly as mistral_common's
v1 instruct encoder does it (each user turn is the string "[INST] {content} [/INST]" tokenized on its own, each
assistant turn its content followed by EOS; a system prompt is prepended to the first user turn with "\n\n").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

from quantkit.errors import TokenizerError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3", "tokenizer.json")


class Tokenizer:
    """Common logic; subclasses implement `_encode_plain(text) -> list[int]` and `decode`."""

    path: Path
    backend: str
    bos_id: int
    eos_id: int
    unk_id: int
    vocab_size: int

    def _encode_plain(self, text: str) -> list[int]:
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

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i))


def _special_tokens(directory: Path) -> dict[str, str]:
    """bos/eos/unk token strings from tokenizer_config.json, if present (strings or {"content": ...} dicts)."""
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    out = {}
    for key in ("bos_token", "eos_token", "unk_token"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


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
    if path.name.endswith(".json"):
        return HFTokenizersTokenizer(path)
    return SentencePieceTokenizer(path)
