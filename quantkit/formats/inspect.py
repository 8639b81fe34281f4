"""What a checkpoint is, without loading its weights (the library behind `quantkit inspect`).

Full-precision sources (HF sharded/single, consolidated, hub id) are opened lazily: only safetensors headers are
read, so memory stays far below the checkpoint size. Quantized checkpoints (GGUF, GPTQ, AWQ, compressed-tensors)
are shown through their format reader (`quantkit.formats.base.detect_format`).

`inspect_path(spec)` returns an `Inspection`: `.to_dict()` is the JSON document, `.render()` the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.io import read_json_or_empty

# registry formats that are plain full-precision layouts: shown through open_checkpoint (shards, dtypes, checks)
FULL_PRECISION_FORMATS = ("hf", "consolidated")


def human_bytes(n: float) -> str:
    """1536 -> "1.50 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: int) -> str:
    """1234567 -> "1.23M"."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


# ---- facts ----

def tokenizer_facts(tokenizer_path: Path | None, config) -> tuple[dict | None, list[dict]]:
    """Facts about the tokenizer and the checks that compare it with the config."""
    from quantkit.model.tokenizer import load_tokenizer

    if tokenizer_path is None:
        return None, [{"name": "tokenizer", "status": "warn", "detail": "no tokenizer file next to the weights"}]
    try:
        tok = load_tokenizer(tokenizer_path)
    except QuantkitError as e:
        return None, [{"name": "tokenizer", "status": "fail", "detail": str(e)}]
    facts = tok.facts()
    chat = _chat_template(Path(tokenizer_path).parent)
    facts["chat_template"] = chat
    checks = []
    ok = tok.vocab_size == config.vocab_size
    checks.append({"name": "tokenizer_vocab", "status": "pass" if ok else "fail",
                   "detail": f"tokenizer vocab {tok.vocab_size}, config vocab_size {config.vocab_size}"})
    ok = (tok.bos_id, tok.eos_id) == (config.bos_token_id, config.eos_token_id)
    checks.append({"name": "special_tokens", "status": "pass" if ok else "warn",
                   "detail": f"tokenizer BOS/EOS {tok.bos_id}/{tok.eos_id}, "
                             f"config {config.bos_token_id}/{config.eos_token_id}"})
    return facts, checks


def _chat_template(directory: Path) -> str | None:
    cfg = directory / "tokenizer_config.json"
    if (directory / "chat_template.jinja").exists():
        return "chat_template.jinja"
    if read_json_or_empty(cfg).get("chat_template"):
        return "tokenizer_config.json"
    return None


def config_checks(config) -> list[dict]:
    """Checks on the config alone: head_dim consistency, k-quant friendly row sizes, sliding window."""
    checks = []
    hd_ok = config.head_dim * config.num_attention_heads == config.hidden_size
    checks.append({"name": "head_dim", "status": "pass" if hd_ok else "info",
                   "detail": f"head_dim {config.head_dim} x {config.num_attention_heads} heads "
                             f"{'=' if hd_ok else '!='} hidden {config.hidden_size}"})
    kq = all(n % 256 == 0 for n in (config.hidden_size, config.intermediate_size))
    checks.append({"name": "kquant_rows", "status": "pass" if kq else "info",
                   "detail": "hidden and intermediate are multiples of 256 (llama.cpp k-quants apply to every linear)"
                   if kq else ("hidden or intermediate is not a multiple of 256: "
                               "llama.cpp k-quants fall back on some linears")})
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        checks.append({"name": "sliding_window", "status": "info",
                       "detail": f"sliding window {config.sliding_window} (v0.1-style); "
                                 "contexts beyond it are windowed"})
    return checks


def describe_checkpoint(ckpt) -> dict[str, Any]:
    """The inspection dict of a full-precision `Checkpoint` (kind "full-precision")."""
    cfg = ckpt.config
    files = []
    for f in ckpt.files:
        tensors = [i for i in list(ckpt.tensors.values()) + list(ckpt.extra.values()) if i.file == f]
        files.append({"name": f.name, "bytes": f.stat().st_size, "tensors": len(tensors)})
    checks = [{"name": "tensors", "status": "pass",
               "detail": f"{len(ckpt.tensors)} tensors: names, shapes and dtypes match the config"}]
    if ckpt.layout == "hf-sharded":
        checks.append({"name": "index", "status": "pass",
                       "detail": f"model.safetensors.index.json maps every tensor to one of {len(files)} shards"})
    if ckpt.extra:
        names = sorted(ckpt.extra)
        checks.append({"name": "extra_tensors", "status": "warn",
                       "detail": f"{len(names)} tensors not used by {cfg.architecture}: {', '.join(names[:3])}"
                                 + (" ..." if len(names) > 3 else "")})
    checks += config_checks(cfg)
    tok, tok_checks = tokenizer_facts(ckpt.tokenizer_path, cfg)
    checks += tok_checks
    return {
        "path": str(ckpt.path),
        "kind": "full-precision",
        "layout": ckpt.layout,
        "architecture": cfg.architecture,
        "model_type": cfg.arch.model_type,
        "gguf_architecture": cfg.arch.gguf_arch,
        "parameters": ckpt.num_parameters,
        "config": cfg.summary(),
        "dtypes": ckpt.dtypes(),
        "tensor_bytes": ckpt.total_bytes,
        "files": files,
        "total_file_bytes": sum(f["bytes"] for f in files),
        "tokenizer": tok,
        "checks": checks,
    }


def describe_quantized(qckpt) -> dict[str, Any]:
    """The inspection dict of a quantized checkpoint read by a format (kind "quantized")."""
    from quantkit.tensors import GGMLTensor, QuantTensor

    cfg = qckpt.config
    path = Path(qckpt.path)
    file_paths = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in file_paths
             if p.suffix in (".gguf", ".safetensors", ".json", ".model")]
    types: dict[str, int] = {}
    params = 0
    for name in qckpt.names:
        t = qckpt.get(name)
        if isinstance(t, QuantTensor):
            kind = f"int{t.bits}" + (f"-g{t.group_size}" if getattr(t, "group_size", None) else "")
            shape = tuple(t.shape)
        elif isinstance(t, GGMLTensor):
            kind, shape = t.type_name, tuple(t.shape)
        else:
            kind, shape = str(t.dtype).replace("torch.", ""), tuple(t.shape)
        types[kind] = types.get(kind, 0) + 1
        n = 1
        for d in shape:
            n *= int(d)
        params += n
    weight_bytes = sum(f["bytes"] for f in files if f["name"].endswith((".gguf", ".safetensors")))
    meta = {k: v for k, v in qckpt.metadata.items() if isinstance(v, (str, int, float, bool, dict, list))}
    tok, tok_checks = tokenizer_facts(qckpt.tokenizer_path, cfg) if qckpt.tokenizer_path else (None, [])
    if tok is not None and not tok.get("chat_template") and qckpt.metadata.get("chat_template"):
        tok["chat_template"] = f"{qckpt.format} metadata"
    return {
        "path": str(path),
        "kind": "quantized",
        "format": qckpt.format,
        "architecture": cfg.architecture,
        "parameters": params,
        "config": cfg.summary(),
        "tensor_types": types,
        "files": files,
        "total_file_bytes": weight_bytes,
        "bits_per_weight": 8 * weight_bytes / params if params else None,
        "metadata": {k: meta[k] for k in list(meta)[:40]},
        "tokenizer": tok,
        "checks": config_checks(cfg) + tok_checks,
    }


def inspect_path(spec: str | Path) -> Inspection:
    """What the checkpoint at `spec` (directory, .gguf file or hub id) is, without loading its weights.

    Quantized formats (GGUF, GPTQ, AWQ, compressed-tensors) are read through `detect_format`; full-precision
    sources through `open_checkpoint` (safetensors headers only). A hub id is read without downloading weights:
    its config, tokenizer and index files, and only the header of each safetensors file (HTTP range reads,
    `quantkit.formats.hub`); offline, a cached copy is used as `open_checkpoint` finds it."""
    from quantkit.model.checkpoint import _hub_offline, _is_hub_id, open_checkpoint

    path = Path(spec).expanduser()
    if path.exists():
        return Inspection(_describe_local(path))
    if _is_hub_id(str(spec)) and not _hub_offline():
        import tempfile

        from quantkit.formats.hub import hub_snapshot

        with tempfile.TemporaryDirectory(prefix="quantkit-inspect-") as tmp:
            info = _describe_local(hub_snapshot(str(spec), Path(tmp) / "snapshot"))
        info["path"] = str(spec)
        info["fetched"] = "config, tokenizer and safetensors headers only (HTTP range reads); no weights"
        return Inspection(info)
    return Inspection(describe_checkpoint(open_checkpoint(spec)))


def _describe_local(path: Path) -> dict[str, Any]:
    from quantkit.formats.base import detect_format
    from quantkit.model.checkpoint import open_checkpoint

    try:
        fmt = detect_format(path)  # quantized formats (GGUF file, quantization_config / quantize_config.json)
    except QuantkitError:
        fmt = None
    if fmt is not None and fmt.name not in FULL_PRECISION_FORMATS:
        return describe_quantized(fmt.read(path))
    return describe_checkpoint(open_checkpoint(path))


# ---- rendering ----

def render(info: dict[str, Any]) -> str:
    """The text `quantkit inspect` prints for an inspection dict."""
    cfg = info["config"]
    lines = [f"{info['path']}"]
    if info["kind"] == "quantized":
        lines.append(f"  format        {info['format']}")
    else:
        lines.append(f"  layout        {info['layout']}")
    lines += [
        f"  architecture  {info['architecture']}",
        f"  parameters    {human_count(info['parameters'])} ({info['parameters']:,})",
        (f"  layers        {cfg['num_hidden_layers']} x (hidden {cfg['hidden_size']}, intermediate "
         f"{cfg['intermediate_size']}, heads {cfg['num_attention_heads']} / kv {cfg['num_key_value_heads']}, "
         f"head_dim {cfg['head_dim']})"),
        f"  vocab         {cfg['vocab_size']}   tied embeddings: {'yes' if cfg['tie_word_embeddings'] else 'no'}",
        (f"  rope_theta    {cfg['rope_theta']:g}   sliding_window: {cfg['sliding_window']}   "
         f"max positions: {cfg['max_position_embeddings']}   rms_norm_eps: {cfg['rms_norm_eps']:g}"),
    ]
    if info["kind"] == "quantized":
        types = ", ".join(f"{k} x{v}" for k, v in sorted(info["tensor_types"].items()))
        lines.append(f"  tensor types  {types}")
        if info.get("bits_per_weight"):
            lines.append(f"  size          {human_bytes(info['total_file_bytes'])} ({info['bits_per_weight']:.2f} BPW)")
    else:
        dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items()))
        lines.append(f"  dtypes        {dtypes}   (config torch_dtype: {cfg['torch_dtype']})")
        lines.append(f"  size          {human_bytes(info['total_file_bytes'])} in {len(info['files'])} file(s)")
    for f in info["files"]:
        extra = f"  {f['tensors']} tensors" if "tensors" in f else ""
        lines.append(f"    {f['name']:<40} {human_bytes(f['bytes']):>12}{extra}")
    tok = info.get("tokenizer")
    if tok:
        lines.append(f"  tokenizer     {tok['file']} ({tok['backend']}): vocab {tok['vocab_size']}, "
                     f"BOS {tok['bos_id']}, EOS {tok['eos_id']}, UNK {tok['unk_id']}, "
                     f"byte fallback {'yes' if tok['byte_fallback'] else 'no'}, "
                     f"chat template {tok['chat_template'] or 'none'}")
    lines.append("  checks")
    for c in info["checks"]:
        lines.append(f"    {c['status']:<5} {c['name']}: {c['detail']}")
    return "\n".join(lines)


@dataclass
class Inspection:
    """The facts `inspect_path` gathered; `info` is the JSON document (see describe_checkpoint/describe_quantized)."""

    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.info

    def render(self) -> str:
        return render(self.info)
