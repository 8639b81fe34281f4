"""The `gguf` format: llama.cpp's single-file container (writer/reader in quantkit/gguf/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.errors import SchemeError
from quantkit.formats.base import QuantizedCheckpoint, WriteOptions, register
from quantkit.model.config import ModelConfig
from quantkit.quant.scheme import Scheme


class GGUFFormat:
    name = "gguf"

    def check_scheme(self, scheme: Scheme) -> None:
        """GGUF stores ggml block types, not arbitrary group-affine integer schemes."""
        nearest = "Q8_0" if scheme.bits == 8 else "Q4_0 (or Q4_K_M)" if scheme.bits == 4 else "Q3_K_M" if scheme.bits == 3 else "Q2_K"
        raise SchemeError(f"GGUF cannot hold the integer scheme {scheme.describe()} exactly; use a GGUF type such "
                          f"as --type {nearest}")

    def open_writer(self, out: Path, source_dir: Path, config: ModelConfig, schemes: dict[str, Any],
                    options: WriteOptions):
        """`schemes`: canonical name -> ggml type name (or None: the mix's choice for `options.extra['ftype']`)."""
        from quantkit.gguf.mixes import tensor_types
        from quantkit.gguf.tokenizer_export import vocab_from_sentencepiece
        from quantkit.gguf.writer import GGUFFileWriter, display_name
        from quantkit.gguf.convert import imatrix_kvs

        ftype = options.extra.get("ftype", "F16")
        types = tensor_types(config, ftype, has_imatrix=bool(options.extra.get("importance")))
        for name, target in schemes.items():
            if isinstance(target, str):
                types[name] = target
        vocab = None
        tok = Path(source_dir) / "tokenizer.model"
        if tok.exists():
            vocab = vocab_from_sentencepiece(tok, config.vocab_size)
        extra = imatrix_kvs(options.extra.get("importance_meta"))
        extra += [(f"quantkit.{k}", "STRING", str(v)) for k, v in options.provenance.items()]
        return GGUFFileWriter(out, config, types, ftype=ftype, vocab=vocab, name=display_name(Path(source_dir).name),
                              extra_kvs=extra, importance=options.extra.get("importance"), force=options.force,
                              model_dir=source_dir)

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_file():
            return False
        if path.suffix == ".gguf":
            return True
        try:
            with open(path, "rb") as f:
                return f.read(4) == b"GGUF"
        except OSError:
            return False

    def read(self, path: Path) -> QuantizedCheckpoint:
        from quantkit.gguf.reader import read_gguf

        return read_gguf(path)


register(GGUFFormat())
