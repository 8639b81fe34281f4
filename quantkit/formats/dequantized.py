"""Any checkpoint `read_checkpoint` knows, seen as plain float weights: the oracle for readers and `verify`.

`DequantizedCheckpoint` quacks like model.checkpoint.Checkpoint (`config`, `get_tensor`), so
`Transformer.from_checkpoint` builds the reference model with every QuantTensor / GGMLTensor dequantized.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantkit.formats.base import QuantizedCheckpoint, read_checkpoint


class DequantizedCheckpoint:
    def __init__(self, ckpt: QuantizedCheckpoint):
        self.ckpt = ckpt
        self.config = ckpt.config
        self.path = ckpt.path

    def tensor_names(self) -> list[str]:
        return list(self.ckpt.names)

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self.ckpt.get(name)
        return t if isinstance(t, torch.Tensor) else t.dequantize(torch.float32)


def dequantized_model(source: str | Path | QuantizedCheckpoint, dtype: torch.dtype = torch.float32):
    """The reference Transformer with the checkpoint's weights dequantized (fp32 by default)."""
    from quantkit.model.reference import Transformer

    ckpt = source if isinstance(source, QuantizedCheckpoint) else read_checkpoint(source)
    return Transformer.from_checkpoint(DequantizedCheckpoint(ckpt), dtype=dtype)
