"""A block-encoding worker process: `python -m quantkit.gguf.encode_worker` (started by `quantkit.gguf.parallel`).

Reads one JSON task per line on stdin and answers one JSON line on stdout. A task names a float32 row-major file
(`src`, rows x cols), an output file (`dst`, rows x out_cols bytes), the rows r0..r1 to encode in chunks of `step`
rows, the ggml type, the tensor name (for error messages) and optionally an importance file (float32 [cols]).
Reply: {"ok": true} or {"ok": false, "error": "SchemeError" | ..., "message": "..."}. Exits when stdin closes.
Ignores SIGINT: the parent owns the interrupt and closes the pipes.
"""

from __future__ import annotations

import json
import signal
import sys

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.gguf.blocks import encode_checked_rows


def run(task: dict) -> None:
    rows, cols, out_cols = task["rows"], task["cols"], task["out_cols"]
    x = np.memmap(task["src"], dtype=np.float32, mode="r", shape=(rows, cols))
    out = np.memmap(task["dst"], dtype=np.uint8, mode="r+", shape=(rows, out_cols))
    qw = np.fromfile(task["importance"], dtype=np.float32) if task.get("importance") else None
    r1 = task["r1"]
    for r0 in range(task["r0"], r1, task["step"]):
        r = min(r1, r0 + task["step"])
        out[r0:r] = encode_checked_rows(np.asarray(x[r0:r]), task["type"], qw, task["name"], r0)
    del x, out


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin:
        try:
            run(json.loads(line))
            reply = {"ok": True}
        except QuantkitError as e:
            reply = {"ok": False, "error": type(e).__name__, "message": str(e)}
        except Exception as e:  # reported to the parent, which raises it
            reply = {"ok": False, "error": "Exception", "message": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
