"""Tokenizer → GGUF KVs (and back): the sentencepiece vocabulary as llama.cpp's converter writes it.

ref: ggml-org/llama.cpp:conversion/base.py `_create_vocab_sentencepiece` + gguf-py `SpecialVocab` (formats/gguf.md,
metadata). Pieces, scores and token types (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6 — the same
numbering as sentencepiece's own `ModelProto.SentencePiece.Type`), special ids, add_bos/add_eos, chat template.

`sentencepiece_from_vocab` rebuilds a `tokenizer.model` from those KVs, so a GGUF read back by quantkit has a
tokenizer quantkit's runtime can load (Mistral/Llama SPM-BPE models with byte fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import CheckpointError, FormatError
from quantkit.io import read_json_object

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def kvs(self) -> list[tuple[str, str, Any]]:
        """(key, gguf value type name, value) in the order llama.cpp's converter writes them."""
        out: list[tuple[str, str, Any]] = [
            ("tokenizer.ggml.model", "STRING", "llama"),
            ("tokenizer.ggml.pre", "STRING", "default"),
            ("tokenizer.ggml.tokens", "ARRAY:STRING", self.tokens),
            ("tokenizer.ggml.scores", "ARRAY:FLOAT32", self.scores),
            ("tokenizer.ggml.token_type", "ARRAY:INT32", self.token_types),
        ]
        for key, value in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id),
                           ("unknown_token_id", self.unk_id), ("padding_token_id", self.pad_id)):
            if value is not None:
                out.append((f"tokenizer.ggml.{key}", "UINT32", int(value)))
        out.append(("tokenizer.ggml.add_bos_token", "BOOL", bool(self.add_bos)))
        out.append(("tokenizer.ggml.add_eos_token", "BOOL", bool(self.add_eos)))
        if self.add_space_prefix is not None:
            out.append(("tokenizer.ggml.add_space_prefix", "BOOL", bool(self.add_space_prefix)))
        if self.chat_template:
            out.append(("tokenizer.chat_template", "STRING", self.chat_template))
        return out


def _load_tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    return read_json_object(path, CheckpointError) if path.exists() else {}


def _chat_template(model_dir: Path, tok_cfg: dict) -> str | None:
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text()
    return template if isinstance(template, str) else None


def vocab_from_sentencepiece(model_path: Path, vocab_size: int | None = None) -> GGUFVocab:
    """The GGUF vocabulary of a sentencepiece `tokenizer.model` (+ tokenizer_config.json beside it)."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(model_path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{model_path}: not a sentencepiece model ({e})") from None
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        if sp.IsUnknown(i):
            types[i] = UNKNOWN
        elif sp.IsControl(i):
            types[i] = CONTROL
        elif sp.IsUnused(i):
            types[i] = UNUSED
        elif sp.IsByte(i):
            types[i] = BYTE
        else:
            types[i] = NORMAL
        tokens[i] = sp.IdToPiece(i)
        scores[i] = float(sp.GetScore(i))

    model_dir = model_path.parent
    tok_cfg = _load_tokenizer_config(model_dir)
    added = model_dir / "added_tokens.json"
    if added.exists():
        for piece, idx in read_json_object(added, CheckpointError).items():
            if isinstance(idx, int) and 0 <= idx < n:
                tokens[idx], scores[idx], types[idx] = piece, -1000.0, USER_DEFINED
    decoder = tok_cfg.get("added_tokens_decoder") or {}
    for idx, entry in (decoder.items() if isinstance(decoder, dict) else ()):
        idx = int(idx) if str(idx).isdigit() else -1
        if not 0 <= idx < n or not isinstance(entry, dict) or not isinstance(entry.get("content", ""), str):
            continue
        content = entry.get("content", tokens[idx])
        special = entry.get("special") or (content.startswith("<") and content.endswith(">"))
        types[idx] = CONTROL if special else USER_DEFINED
        scores[idx] = -1000.0
        tokens[idx] = content if special else content.replace("\u2581", " ")

    def special_id(cfg_key: str, sp_id: int) -> int | None:
        piece = tok_cfg.get(cfg_key)
        if isinstance(piece, dict):
            piece = piece.get("content")
        if isinstance(piece, str) and piece in tokens:
            return tokens.index(piece)
        return sp_id if sp_id >= 0 else None

    add_space_prefix = tok_cfg.get("add_prefix_space")
    return GGUFVocab(
        tokens=tokens,
        scores=scores,
        token_types=types,
        bos_id=special_id("bos_token", sp.bos_id()),
        eos_id=special_id("eos_token", sp.eos_id()),
        unk_id=special_id("unk_token", sp.unk_id()),
        pad_id=special_id("pad_token", sp.pad_id()) if tok_cfg.get("pad_token") else None,
        add_bos=bool(tok_cfg.get("add_bos_token", True)),
        add_eos=bool(tok_cfg.get("add_eos_token", False)),
        add_space_prefix=None if add_space_prefix is None else bool(add_space_prefix),
        chat_template=_chat_template(model_dir, tok_cfg),
    )


def vocab_from_kvs(kv: dict[str, Any], source: str) -> GGUFVocab | None:
    """The vocabulary stored in a GGUF's KVs (None when the file has none), every field checked for type and
    range: a FormatError names the key."""
    tokens = kv.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None

    def bad(key: str, expected: str):
        value = kv.get(key)
        shown = f"an array of {len(value)}" if isinstance(value, list) else repr(value)
        raise FormatError(f"{source}: {key} = {shown}: expected {expected}")

    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        bad("tokenizer.ggml.tokens", "a non-empty array of strings")
    n = len(tokens)
    model = kv.get("tokenizer.ggml.model", "llama")
    if not isinstance(model, str):
        bad("tokenizer.ggml.model", "a string such as 'llama'")
    scores = kv.get("tokenizer.ggml.scores", [0.0] * n)
    types = kv.get("tokenizer.ggml.token_type", [NORMAL] * n)
    number = (int, float)
    if not isinstance(scores, list) or len(scores) != n or not all(isinstance(v, number) for v in scores):
        bad("tokenizer.ggml.scores", f"an array of {n} numbers (one per token)")
    if not isinstance(types, list) or len(types) != n or not all(isinstance(v, int) for v in types):
        bad("tokenizer.ggml.token_type", f"an array of {n} integers (one per token)")
    ids = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        value = kv.get(f"tokenizer.ggml.{key}")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n):
            bad(f"tokenizer.ggml.{key}", f"a token id in [0, {n})")
        ids[name] = value
    add_space_prefix = kv.get("tokenizer.ggml.add_space_prefix")
    chat_template = kv.get("tokenizer.chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        bad("tokenizer.chat_template", "a string")
    return GGUFVocab(
        tokens=list(tokens), scores=[float(v) for v in scores], token_types=[int(t) for t in types],
        bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unk"], pad_id=ids["pad"],
        add_bos=bool(kv.get("tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(kv.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=None if add_space_prefix is None else bool(add_space_prefix),
        chat_template=chat_template,
        extra={"model": model},
    )


def sentencepiece_from_vocab(vocab: GGUFVocab) -> bytes:
    """A serialized sentencepiece ModelProto (BPE, byte fallback, identity normalizer) with this vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    if vocab.extra.get("model", "llama") != "llama":
        raise FormatError(f"tokenizer model {vocab.extra['model']!r} is not sentencepiece (llama); "
                          "only SPM vocabularies can be rebuilt as tokenizer.model")
    m = pb.ModelProto()
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(vocab.tokens)
    ts.byte_fallback = any(t == BYTE for t in vocab.token_types)
    ts.unk_id = vocab.unk_id if vocab.unk_id is not None else 0
    ts.bos_id = vocab.bos_id if vocab.bos_id is not None else -1
    ts.eos_id = vocab.eos_id if vocab.eos_id is not None else -1
    ts.pad_id = vocab.pad_id if vocab.pad_id is not None else -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece = (
        vocab.tokens[ts.unk_id] if ts.unk_id >= 0 else "<unk>",
        vocab.tokens[ts.bos_id] if ts.bos_id >= 0 else "<s>",
        vocab.tokens[ts.eos_id] if ts.eos_id >= 0 else "</s>",
    )
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True if vocab.add_space_prefix is None else bool(vocab.add_space_prefix)
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    for i, (piece, score, ttype) in enumerate(zip(vocab.tokens, vocab.scores, vocab.token_types)):
        p = m.pieces.add()
        p.piece = piece
        p.score = score
        # llama.cpp's converter marks special entries of added_tokens_decoder CONTROL and scores them -1000;
        # sentencepiece needs exactly one UNKNOWN piece at unk_id
        if i == ts.unk_id:
            p.type = UNKNOWN
        else:
            p.type = CONTROL if ttype == UNKNOWN else (ttype if ttype in (1, 3, 4, 5, 6) else NORMAL)
    return m.SerializeToString()
