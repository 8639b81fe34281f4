"""Coordination: plans, the layer-wise pipeline, the resume work directory, writer fan-out and output placement.

The algorithms it runs live in `quantkit.quant` (rtn, gptq, awq, schemes, grids) and `quantkit.gguf` (block
encoders); the formats it writes in `quantkit.formats`. Nothing below this package imports it.
"""
