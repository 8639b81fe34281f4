"""What the GGUF quality benchmarks share: the texts, llama.cpp's tools, the F32 reference GGUF with its logits, and
one importance matrix from each tool, all on the same calibration text (cached in the work directory).

  calibration: *The Hound of the Baskervilles* (pg-english calib), `calib_chunks` windows of 512 tokens
  evaluation:  *Pride and Prejudice*, first 200k characters (held out)
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from quantkit.gguf.convert import write_gguf
from quantkit.gguf.llamacpp import run_perplexity
from quantkit.model.checkpoint import open_checkpoint
from quantkit.testing import NANO_PATH, llamacpp_bin, shared_data

CTX = 512
QUANTKIT = [sys.executable, "-m", "quantkit"]


@dataclass
class NanoSetup:
    work: Path
    calib_txt: Path
    eval_txt: Path
    f32: Path  # the model as an F32 GGUF
    base_kld: Path  # llama-perplexity's saved logits of f32 on eval_txt
    llamacpp_imatrix: Path
    quantkit_imatrix: Path
    quantize: Path  # llama.cpp tools
    perplexity: Path


def run(cmd: list[str], log: Path) -> str:
    """Run a tool, keep its output in `log`, stop the benchmark with the log's tail if it fails."""
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    print(f"  {Path(cmd[0]).name} {' '.join(cmd[1:4])} ... {time.time() - t0:.0f}s", file=sys.stderr)
    return proc.stdout


def prepare(work: Path, chunks: int, calib_chunks: int) -> NanoSetup:
    work.mkdir(parents=True, exist_ok=True)
    pg = shared_data("pg-english", "calib")
    if pg is None:
        raise SystemExit("needs ../shared/data/pg-english/calib")
    calib_txt, eval_txt = work / "calib.txt", work / "eval.txt"
    calib_txt.write_text((pg / "the-hound-of-the-baskervilles.txt").read_text())
    eval_txt.write_text((pg / "pride-and-prejudice.txt").read_text()[:200_000])
    quantize, imatrix_tool, perplexity = (llamacpp_bin(t)
                                          for t in ("llama-quantize", "llama-imatrix", "llama-perplexity"))
    if None in (quantize, imatrix_tool, perplexity):
        raise SystemExit("needs llama.cpp's tools (bash scripts/build_llamacpp.sh)")
    f32 = work / "nano-F32.gguf"
    if not f32.exists():
        write_gguf(open_checkpoint(NANO_PATH), f32, "F32", progress=False)
    base = work / "base.kld"
    if not base.exists():
        run_perplexity(perplexity, f32, eval_txt, ctx=CTX, chunks=chunks, kld_base_out=base)
    lc_imx, qk_imx = work / "llamacpp.imatrix.gguf", work / "quantkit.imatrix.gguf"
    if not lc_imx.exists():
        run([str(imatrix_tool), "-m", str(f32), "-f", str(calib_txt), "-o", str(lc_imx), "-c", str(CTX),
             "--chunks", str(calib_chunks), "-t", "2"], work / "llama-imatrix.log")
    if not qk_imx.exists():
        run(QUANTKIT + ["imatrix", str(NANO_PATH), "--calib", str(calib_txt), "--calib-samples", str(calib_chunks),
                        "--calib-seqlen", str(CTX), "-o", str(qk_imx), "--no-progress"], work / "quantkit-imatrix.log")
    return NanoSetup(work, calib_txt, eval_txt, f32, base, lc_imx, qk_imx, quantize, perplexity)


def nano_windows(n: int = 16, seqlen: int = 256):
    """mistral-nano (opened, and as a float32 model) with `n` x `seqlen` token windows of the same texts as
    `prepare`: "calib" (the allocation's default windows, seed 0), "calib-other" (other windows of it, seed 1) and
    "held-out" (the evaluation text, seed 0)."""
    import tempfile

    import torch

    from quantkit.calib import load_calibration
    from quantkit.model.reference import Transformer
    from quantkit.model.tokenizer import load_tokenizer

    pg = shared_data("pg-english", "calib")
    if pg is None:
        raise SystemExit("needs ../shared/data/pg-english/calib")
    ckpt = open_checkpoint(str(NANO_PATH))
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    calib_txt = str(pg / "the-hound-of-the-baskervilles.txt")
    with tempfile.TemporaryDirectory() as tmp:
        held_txt = Path(tmp) / "held.txt"
        held_txt.write_text((pg / "pride-and-prejudice.txt").read_text()[:200_000])
        windows = {"held-out": load_calibration(str(held_txt), tokenizer, n, seqlen, 0).tokens}
    windows["calib"] = load_calibration(calib_txt, tokenizer, n, seqlen, 0).tokens
    windows["calib-other"] = load_calibration(calib_txt, tokenizer, n, seqlen, 1).tokens
    return ckpt, Transformer.from_checkpoint(ckpt, torch.float32), windows
