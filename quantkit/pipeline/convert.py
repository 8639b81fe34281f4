"""Unquantized conversion (the library behind `quantkit convert`).

Re-shard and re-type safetensors, switch between the Hugging Face and mistral-inference (consolidated) layouts, or
write one GGUF file. Each target format maps to a converter function in `CONVERTERS`; a new target adds one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from quantkit.errors import FormatError, QuantkitError
from quantkit.io import parse_size
from quantkit.progress import progress as progress_bar


def convert_float(fmt: str, src: str | Path, out: str | Path, dtype: str | None, shard_size: str | int, force: bool,
                  progress: bool, command_line: str | None = None, **_) -> Path:
    """Float source -> float output in layout `fmt` ("hf" or "consolidated"), tensor by tensor.
    `command_line` is recorded as the output's provenance command."""
    from quantkit.formats.base import WriteOptions, get_format
    from quantkit.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    options = WriteOptions(force=force, max_shard_bytes=parse_size(shard_size), extra={"dtype": dtype},
                           provenance={"command": command_line,
                                       "source": {"fingerprint": ckpt.fingerprint(), "layout": ckpt.layout}})
    writer = get_format(fmt).open_writer(Path(out), ckpt.path, ckpt.config, {}, options)
    try:
        names = ckpt.tensor_names()
        for name in progress_bar(names, desc=f"convert -> {fmt}", unit="tensor", enabled=progress):
            writer.add(name, ckpt.get_tensor(name))
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def convert_gguf(fmt: str, src: str | Path, out: str | Path, dtype: str | None, shard_size: str | int, force: bool,
                 progress: bool, gguf_type: str | None = None, imatrix: str | Path | None = None, **_) -> Path:
    """Float source -> one GGUF file (type F32/F16/BF16/Q8_0, or any llama-quantize mix), streamed per tensor.
    Without `gguf_type`, the float type named by `dtype` (default BF16)."""
    from quantkit.gguf.convert import convert_to_gguf

    type_name = gguf_type or {"f32": "F32", "f16": "F16", "bf16": "BF16"}.get(dtype or "", "BF16")
    return Path(convert_to_gguf(src, out, type_name, imatrix=imatrix, force=force, progress=progress)["output"])


# target format -> converter(fmt, src, out, dtype, shard_size, force, progress, **options) -> output path
CONVERTERS: dict[str, Callable[..., Path]] = {
    "hf": convert_float,
    "consolidated": convert_float,
    "gguf": convert_gguf,
}


def convert(src: str | Path, out: str | Path, fmt: str, *, dtype: str | None = None, shard_size: str | int = "5GB",
            gguf_type: str | None = None, imatrix: str | Path | None = None, force: bool = False,
            progress: bool = False, command_line: str | None = None) -> Path:
    """Convert the full-precision checkpoint `src` to `out` in format `fmt` (a key of CONVERTERS: hf,
    consolidated, gguf). `dtype`: bf16, f16 or f32 (default: the source's); `shard_size`: largest shard of the hf
    layout ("5GB", "500MB" or bytes); `gguf_type` / `imatrix`: gguf only. `progress`: progress on stderr.
    `command_line`: recorded as provenance by the float converters. Returns the written path."""
    if fmt not in CONVERTERS:
        raise FormatError(f"unknown conversion target {fmt!r}; expected one of {', '.join(sorted(CONVERTERS))}")
    if fmt != "gguf" and (gguf_type or imatrix):
        raise QuantkitError("gguf_type and imatrix apply to the gguf format only")
    from quantkit.io import check_disjoint, check_free_space, check_output_path, describe_needs, write_error

    check_disjoint({"output": out}, {"source": src, "--imatrix": imatrix})
    check_output_path(out, force)
    needs = [("the output", Path(out), planned_bytes(src, fmt, dtype, gguf_type, imatrix is not None))]
    check_free_space(needs)  # refuse before any work
    try:
        return CONVERTERS[fmt](fmt, src, out, dtype=dtype, shard_size=shard_size, force=force, progress=progress,
                               gguf_type=gguf_type, imatrix=imatrix, command_line=command_line)
    except Exception as e:
        fault = write_error(e, output=out, needs=describe_needs([(what, n) for what, _, n in needs]))
        if fault is None:
            raise
        raise fault from None


def planned_bytes(src: str | Path, fmt: str, dtype: str | None, gguf_type: str | None, has_imatrix: bool) -> int:
    """The weight bytes a conversion writes (headers, config and tokenizer files aside)."""
    from quantkit.model.checkpoint import SAFETENSORS_ITEM_BYTES, open_checkpoint

    ckpt = open_checkpoint(src)
    shapes = {name: info.shape for name, info in ckpt.tensors.items()}
    if fmt == "gguf":
        from quantkit.ggml_types import tensor_nbytes
        from quantkit.gguf.mixes import tensor_types

        type_name = gguf_type or {"f32": "F32", "f16": "F16", "bf16": "BF16"}.get(dtype or "", "BF16")
        try:
            types = tensor_types(ckpt.config, type_name.upper(), has_imatrix=has_imatrix)
        except QuantkitError:
            return 0  # the converter names the problem
        return sum(tensor_nbytes(tuple(shapes[n]), t) for n, t in types.items() if n in shapes)
    item = {"f32": 4, "f16": 2, "bf16": 2}.get(dtype or "")
    total = 0
    for info in ckpt.tensors.values():
        numel = 1
        for d in info.shape:
            numel *= d
        total += numel * (item or SAFETENSORS_ITEM_BYTES.get(info.dtype, 2))
    return total
