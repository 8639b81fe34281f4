"""What an output weighs: the one bits-per-weight definition and the tensor bytes an output holds."""

from __future__ import annotations

from pathlib import Path


def bits_per_weight(tensor_bytes: int, parameters: int) -> float:
    """THE bits-per-weight of quantkit (`plan`, `quantize`, `--list-types`, `--list-presets`):

        BPW = 8 x stored bytes of all tensors / number of parameters of the model

    The numerator is the tensor data the output holds for every weight of the model: packed codes, scales, zero
    points and g_idx of the quantized linears, and the tensors kept in floating point (embeddings, norms, lm_head),
    without file headers, metadata, the tokenizer or alignment padding (a safetensors header or a GGUF vocabulary is
    not a weight). The denominator counts every parameter of the source model (all tensors, not only the quantized
    linears). It is the figure llama.cpp's loader prints as "(x.xx BPW)", so a plan's BPW equals the BPW of the
    output it describes, and both compare with llama.cpp's numbers."""
    return 8 * tensor_bytes / max(parameters, 1)


def stored_tensor_bytes(path: Path) -> int:
    """Bytes of tensor data an output holds (what `bits_per_weight` counts): the tensors of a GGUF file, or of the
    .safetensors files of a directory, read from their headers; file headers, metadata and padding excluded."""
    if path.is_file():
        from quantkit.gguf.reader import parse_gguf

        return sum(info.nbytes for info in parse_gguf(path).tensors.values())
    from quantkit.model.checkpoint import read_safetensors_header

    total = 0
    for p in sorted(path.rglob("*.safetensors")):
        for name, meta in read_safetensors_header(p).items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                total += end - start
    for p in sorted(path.rglob("*.gguf")):
        total += stored_tensor_bytes(p)
    return total


def file_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a directory."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
