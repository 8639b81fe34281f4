"""Stream a full-precision checkpoint into one or more writers: RTN for every decoder linear (a stand-in for the
calibrated pipeline, used by tests and `verify` examples), float for the rest, in file order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator


from quantkit.formats.base import StoredTensor, WriteOptions
from quantkit.pipeline.fanout import open_writers
from quantkit.model import arch
from quantkit.model.checkpoint import Checkpoint, open_checkpoint
from quantkit.quant.rtn import quantize_rtn
from quantkit.quant.scheme import Scheme, module_name, resolve_schemes


def rtn_stream(ckpt: Checkpoint, schemes: dict[str, Scheme | None],
               transform: Callable[[str, StoredTensor], StoredTensor] | None = None
               ) -> Iterator[tuple[str, StoredTensor]]:
    for name in ckpt.tensor_names():
        t = ckpt.get_tensor(name)
        scheme = schemes.get(module_name(name)) if arch.is_quantizable_linear(name) else None
        out: StoredTensor = quantize_rtn(t.float(), scheme) if scheme is not None else t
        yield name, (transform(name, out) if transform else out)


def linear_schemes(ckpt: Checkpoint, scheme: Scheme, overrides=()) -> dict[str, Scheme | None]:
    linears = [module_name(n) for n in ckpt.tensor_names() if arch.is_quantizable_linear(n)]
    return resolve_schemes(linears, scheme, list(overrides))


def export_rtn(source: str | Path, outs: dict[str, str | Path], scheme: Scheme, options: WriteOptions | None = None,
               overrides=(), transform=None, progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Path]:
    """Quantize `source` with RTN under `scheme` and write it in every format of `outs` ({format: path})."""
    ckpt = open_checkpoint(source)
    schemes = linear_schemes(ckpt, scheme, overrides)
    options = options or WriteOptions()
    options.provenance.setdefault("method", "rtn")
    options.provenance.setdefault("scheme", scheme.describe())
    writer = open_writers(list(outs), {k: Path(v) for k, v in outs.items()}, ckpt.path, ckpt.config, schemes, options)
    stream = rtn_stream(ckpt, schemes, transform)
    try:
        for name, tensor in (progress(stream) if progress else stream):
            writer.add(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()
