"""quantkit: quantize and convert Mistral/Llama checkpoints, and prove the result still behaves like the original.

The Python API mirrors the command line (same names, same arguments):

    import quantkit

    plan = quantkit.plan("models/mistral-nano", method="gptq", preset="w4a16-g128")      # quantkit plan
    result = quantkit.quantize("models/mistral-nano", "out/nano-gptq", method="gptq")    # quantkit quantize
    report = quantkit.evaluate("out/nano-gptq", "evaltext/prose.txt", ref="models/mistral-nano")  # quantkit eval
    model = quantkit.load("out/nano-gptq")                                               # any format
    print(model.generate("Once upon a time", max_tokens=32).text)                        # quantkit generate
    quantkit.convert("models/mistral-nano", "out/nano-Q8_0.gguf", format="gguf", gguf_type="Q8_0")
    info = quantkit.inspect("out/nano-Q8_0.gguf")                                        # quantkit inspect
    card = quantkit.report(["out/nano-gptq", "out/nano-Q8_0.gguf"], "eval.txt", "out/report",
                           ref="models/mistral-nano")                                    # quantkit report

Bad input raises a `quantkit.QuantkitError` subclass whose message names the file, field or tensor.
The functions are imported on first use, so `import quantkit` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from quantkit.errors import QuantkitError

__version__ = "0.1.0"

_API = {
    "plan": "quantkit.api", "quantize": "quantkit.api", "convert": "quantkit.api", "evaluate": "quantkit.api",
    "inspect": "quantkit.api", "load": "quantkit.api", "generate": "quantkit.api", "report": "quantkit.api",
    "verify": "quantkit.api", "Model": "quantkit.api",
    "Generation": "quantkit.api", "Plan": "quantkit.pipeline.plan", "QuantizeResult": "quantkit.pipeline.quantize",
}
__all__ = ["QuantkitError", "__version__", *_API]

if TYPE_CHECKING:
    from quantkit.api import (Generation, Model, convert, evaluate, generate, inspect, load, plan,  # noqa: F401
                              quantize, report, verify)
    from quantkit.pipeline.plan import Plan  # noqa: F401
    from quantkit.pipeline.quantize import QuantizeResult  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
