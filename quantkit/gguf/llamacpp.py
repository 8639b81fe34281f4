"""llama.cpp as the reference client: run its tools on a GGUF and read back what they computed.

`llama-perplexity --kl-divergence-base FILE` stores, for every evaluated position, llama.cpp's log-softmax of the
logits quantized to uint16 over the top 16 nats (per row: f32 scale, f32 min log-prob, n_vocab uint16; ref:
ggml-org/llama.cpp:tools/perplexity/perplexity.cpp `log_softmax(..., uint16_t * log_prob, ...)`). Decoding it
gives llama.cpp's log-probabilities to within half a step (16/65535/2 ≈ 1.2e-4 nats) for every token within 16
nats of the top one — enough to compare a quantkit model with llama.cpp position by position.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit.errors import QuantkitError


@dataclass
class LlamaCppLogprobs:
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # int32 [n_chunk, n_ctx] (original tokens; llama.cpp evaluates with BOS at position 0)
    scale: np.ndarray  # float32 [n_chunk, n_eval]
    min_logprob: np.ndarray  # float32 [n_chunk, n_eval]
    q: np.ndarray  # uint16 [n_chunk, n_eval, n_vocab]
    ppl: float | None = None

    @property
    def first(self) -> int:
        """Evaluated positions of each chunk: first .. n_ctx-2 (predicting tokens first+1 .. n_ctx-1)."""
        return self.n_ctx // 2

    def logprobs(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(log-probs [n_eval, n_vocab] float64, valid mask: entries within 16 nats of the top token)."""
        q = self.q[chunk].astype(np.float64)
        lp = self.min_logprob[chunk, :, None].astype(np.float64) + self.scale[chunk, :, None].astype(np.float64) * q
        return lp, self.q[chunk] > 0


def read_kld_base(path: str | Path) -> LlamaCppLogprobs:
    path = Path(path)
    data = path.read_bytes()
    if data[:8] != b"_logits_":
        raise QuantkitError(f"{path}: not a llama-perplexity logits file")
    n_ctx, n_vocab, n_chunk = np.frombuffer(data, dtype="<i4", count=3, offset=8)
    pos = 20
    tokens = np.frombuffer(data, dtype="<i4", count=n_chunk * n_ctx, offset=pos).reshape(n_chunk, n_ctx)
    pos += 4 * n_chunk * n_ctx
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_eval = n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(data, dtype="<u2", count=n_chunk * n_eval * nv, offset=pos).reshape(n_chunk, n_eval, nv)
    head = np.ascontiguousarray(rows[:, :, :4]).view("<f4")
    return LlamaCppLogprobs(int(n_ctx), int(n_vocab), tokens.copy(), head[..., 0].copy(), head[..., 1].copy(),
                            np.ascontiguousarray(rows[:, :, 4:4 + n_vocab]))


def parse_final_ppl(output: str) -> float | None:
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if m:
        return float(m.group(1))
    chunks = re.findall(r"\[\d+\]([0-9.]+),", output)  # the running estimate after every chunk
    return float(chunks[-1]) if chunks else None


def parse_kld_summary(output: str) -> dict[str, float]:
    """The summary `llama-perplexity --kl-divergence` prints (Mean KLD, Same top p, PPL ratios, ...)."""
    out: dict[str, float] = {}
    patterns = {
        "ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)",
        "ppl_base": r"Mean PPL\(base\)\s*:\s*([0-9.]+)",
        "kld_mean": r"Mean\s+KLD:\s*([-0-9.]+)",
        "kld_max": r"Maximum KLD:\s*([-0-9.]+)",
        "kld_p99": r"99\.0%\s+KLD:\s*([-0-9.]+)",
        "kld_median": r"Median\s+KLD:\s*([-0-9.]+)",
        "same_top_pct": r"Same top p:\s*([0-9.]+)",
        "rms_dp_pct": r"RMS Δp\s*:\s*([0-9.]+)",
    }
    for key, pat in patterns.items():
        m = re.search(pat, output)
        if m:
            out[key] = float(m.group(1))
    return out


def run_perplexity(tool: Path, model: Path, text_file: Path, *, ctx: int, chunks: int, threads: int = 2,
                   kld_base_out: Path | None = None, kld_base_in: Path | None = None, timeout: int = 1800,
                   extra: tuple[str, ...] | list[str] = ()) -> str:
    """Run llama-perplexity; returns its combined output (raises with the tail of the log on failure)."""
    args = [str(tool), "-m", str(model), "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads),
            *extra]
    if kld_base_out is not None:
        args += ["-f", str(text_file), "--kl-divergence-base", str(kld_base_out)]
    elif kld_base_in is not None:
        args += ["--kl-divergence-base", str(kld_base_in), "--kl-divergence"]
    else:
        args += ["-f", str(text_file)]
    for _ in range(3):
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        output = proc.stdout
        if proc.returncode != 0:
            raise QuantkitError(f"llama-perplexity failed on {model} (exit {proc.returncode}): {output[-2000:]}")
        # llama.cpp's asynchronous logger can lose its last lines at exit: run again until the summary is there
        if "Final estimate" in output or ("Mean    KLD" in output or "Mean KLD" in output):
            break
    return output
