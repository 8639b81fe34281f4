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
        nearest = ("Q8_0" if scheme.bits == 8 else "Q4_0 (or Q4_K_M)" if scheme.bits == 4
                   else "Q3_K_M" if scheme.bits == 3 else "Q2_K")
        raise SchemeError(f"GGUF cannot hold the integer scheme {scheme.describe()} exactly; use a GGUF type such "
                          f"as --type {nearest}")

    def stored_nbytes(self, target: Any, shape: tuple[int, ...], float_bytes: int) -> int:
        from quantkit.ggml_types import tensor_nbytes

        return tensor_nbytes(shape, target)

    def open_writer(self, out: Path, source_dir: Path, config: ModelConfig, schemes: dict[str, Any],
                    options: WriteOptions):
        """`schemes`: canonical name -> ggml type name; names not given take the mix of `options.file_type`."""
        import json

        from quantkit.gguf.convert import imatrix_kvs
        from quantkit.gguf.mixes import tensor_types
        from quantkit.gguf.tokenizer_export import vocab_from_sentencepiece
        from quantkit.gguf.writer import GGUFFileWriter, display_name

        ftype = options.file_type or "F16"
        types = tensor_types(config, ftype)
        for name, target in schemes.items():
            if isinstance(target, str):
                types[name] = target
        vocab = None
        tok = Path(source_dir) / "tokenizer.model"
        if tok.exists():
            vocab = vocab_from_sentencepiece(tok, config.vocab_size)
        extra = imatrix_kvs(options.importance_meta)
        extra += [(f"quantkit.{k}", "STRING", json.dumps(v) if isinstance(v, (dict, list)) else str(v))
                  for k, v in options.provenance.items()]
        return GGUFFileWriter(out, config, types, ftype=ftype, vocab=vocab, name=display_name(Path(source_dir).name),
                              extra_kvs=extra, force=options.force, model_dir=source_dir)

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
        from quantkit.gguf.reader import GGUFModel, tokenizer_model_path

        model = GGUFModel(path)
        kv = model.file.kv
        small_kv = {k: v for k, v in kv.items() if not (isinstance(v, list) and len(v) > 64)}
        return QuantizedCheckpoint(path=model.path, format="gguf", config=model.config, names=list(model.names),
                                   loader=model.load, tokenizer_path=tokenizer_model_path(kv),
                                   metadata={"gguf": small_kv,
                                             "tensor_types": {n: i.type_name for n, i in model.names.items()},
                                             "chat_template": kv.get("tokenizer.chat_template")})


register(GGUFFormat())
