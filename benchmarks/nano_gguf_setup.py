"""What the GGUF quality benchmarks share: the texts, llama.cpp's tools, the F32 reference GGUF with its logits, and
one importance matrix from each tool, all on the same calibration text (cached in the work directory).

  calibration: `calib_chunks` windows of 512 tokens of one of
    "hound"  *The Hound of the Baskervilles* (pg-english calib)
    "mix"    the five pg-english calib books other than the evaluation book, interleaved piece by piece (about 4,000
             characters each, cut at paragraph ends) until the shortest ends, so that any prefix of it, which is
             what llama-imatrix reads, is as mixed as the random windows quantkit draws
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
EVAL_BOOK = "pride-and-prejudice.txt"
CALIB_TEXTS = ("hound", "mix")


def calibration_text(pg: Path, kind: str, piece: int = 4000) -> str:
    """The calibration text called `kind` (see the module's docstring) from the pg-english calib folder `pg`."""
    if kind == "hound":
        return (pg / "the-hound-of-the-baskervilles.txt").read_text()
    if kind != "mix":
        raise SystemExit(f"error: calibration text {kind!r}: expected one of {', '.join(CALIB_TEXTS)}")
    books = [(pg / name).read_text() for name in sorted(f.name for f in pg.glob("*.txt")) if name != EVAL_BOOK]
    cut = [_pieces(text, piece) for text in books]
    rounds = min(len(c) for c in cut)
    return "".join(c[i] for i in range(rounds) for c in cut)


def _pieces(text: str, size: int) -> list[str]:
    """`text` in consecutive pieces of `size` to `2 * size` characters, each ending after a blank line where one
    is that near, else cut at `2 * size` (the last piece may be shorter)."""
    out, start = [], 0
    while start < len(text):
        blank = text.find("\n\n", start + size, start + 2 * size)
        end = blank + 2 if blank >= 0 else start + 2 * size
        out.append(text[start:end])
        start = end
    return out


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


def prepare(work: Path, chunks: int, calib_chunks: int, calib_text: str = "hound") -> NanoSetup:
    """Everything in `work`; a work directory made with another calibration text is refused, not mixed."""
    work.mkdir(parents=True, exist_ok=True)
    pg = shared_data("pg-english", "calib")
    if pg is None:
        raise SystemExit("needs ../shared/data/pg-english/calib")
    calib_txt, eval_txt = work / "calib.txt", work / "eval.txt"
    text = calibration_text(pg, calib_text)
    if calib_txt.exists() and calib_txt.read_text() != text:
        raise SystemExit(f"error: {work} holds results calibrated on other text than {calib_text!r}; "
                         f"give another --work")
    calib_txt.write_text(text)
    eval_txt.write_text((pg / EVAL_BOOK).read_text()[:200_000])
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


def nano_windows(n: int = 16, seqlen: int = 256, calib_text: str = "hound", calib_chunks: int = 0):
    """mistral-nano (opened, and as a float32 model) with `n` x `seqlen` token windows of the same texts as
    `prepare`: "calib" (the allocation's default windows, seed 0), "calib-other" (other windows of it, seed 1) and
    "held-out" (the evaluation text, seed 0); with `calib_chunks`, also "GPTQ calibration": that many windows of
    CTX tokens of the calibration text (a run's calibration, seed 0)."""
    import torch

    from quantkit.calib.sampling import sample_windows, tokenize_documents
    from quantkit.model.reference import Transformer
    from quantkit.model.tokenizer import load_tokenizer

    pg = shared_data("pg-english", "calib")
    if pg is None:
        raise SystemExit("needs ../shared/data/pg-english/calib")
    ckpt = open_checkpoint(str(NANO_PATH))
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    # each text tokenized once (as `--calib FILE` tokenizes it), its windows drawn as `load_calibration` draws them
    held = tokenize_documents([(pg / EVAL_BOOK).read_text()[:200_000]], tokenizer)
    calib = tokenize_documents([calibration_text(pg, calib_text)], tokenizer)
    windows = {"held-out": sample_windows(held, n, seqlen, 0, tokenizer.bos_id),
               "calib": sample_windows(calib, n, seqlen, 0, tokenizer.bos_id),
               "calib-other": sample_windows(calib, n, seqlen, 1, tokenizer.bos_id)}
    if calib_chunks:
        windows["GPTQ calibration"] = sample_windows(calib, calib_chunks, CTX, 0, tokenizer.bos_id)
    return ckpt, Transformer.from_checkpoint(ckpt, torch.float32), windows
