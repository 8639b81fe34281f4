#!/usr/bin/env python3
"""Train mistral-nano: a small Mistral-architecture model on ../shared/data/pg-english/train only.

Two steps, deterministic for a given seed and device:

  python scripts/train_nano.py prepare --data ../shared/data/pg-english/train --work .nano-work
  python scripts/train_nano.py train --work .nano-work --out models/mistral-nano [--device cuda] [--steps 1500]

`prepare` tokenizes every book with the Mistral v1 sentencepiece model (BOS + book + EOS) and holds two whole
books out as the validation set. `train` runs AdamW with warm-up and cosine decay, logs train/validation loss to
`<work>/train_log.jsonl`, saves a resumable checkpoint to `<work>/ckpt.pt` every `--save-every` steps (re-run
the same command to resume), and at the end writes the best-validation weights as a BF16 HF checkpoint.
Architecture and hyper-parameters are the constants below; changing them is a deliberate retraining.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantkit.io import save_sharded, write_json  # noqa: E402
from quantkit.model.config import ModelConfig  # noqa: E402
from quantkit.model.reference import Transformer  # noqa: E402

NANO_CONFIG = dict(
    architecture="MistralForCausalLM", vocab_size=32000, hidden_size=256, intermediate_size=768,
    num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
    rope_theta=1e6, max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
VALIDATION_BOOKS = 2


def v1_tokenizer_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def prepare(args) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(v1_tokenizer_path()))
    books = sorted(Path(args.data).glob("*.txt"))
    if len(books) <= VALIDATION_BOOKS:
        sys.exit(f"need more than {VALIDATION_BOOKS} books in {args.data}")
    rng = np.random.default_rng(args.seed)
    val_idx = set(rng.choice(len(books), VALIDATION_BOOKS, replace=False).tolist())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "val": []}
    for i, book in enumerate(books):
        ids = [1] + sp.encode(book.read_text(encoding="utf-8")) + [2]
        splits["val" if i in val_idx else "train"].append(np.asarray(ids, dtype=np.uint16))
    for split, arrays in splits.items():
        np.concatenate(arrays).tofile(work / f"{split}.bin")
    meta = {"train_tokens": int(sum(a.size for a in splits["train"])),
            "val_tokens": int(sum(a.size for a in splits["val"])),
            "val_books": [books[i].name for i in sorted(val_idx)], "train_books": len(books) - VALIDATION_BOOKS}
    write_json(work / "data.json", meta)
    shutil.copy(v1_tokenizer_path(), work / "tokenizer.model")
    print(json.dumps(meta))


def init_weights(model: Transformer, n_layers: int) -> None:
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(p, std=0.02)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def batches(tokens: np.ndarray, batch: int, seq: int, gen: torch.Generator):
    starts = torch.randint(0, tokens.size - seq - 1, (batch,), generator=gen).numpy()
    rows = np.stack([tokens[s: s + seq + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(rows)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, seq: int, device, amp, max_windows: int) -> float:
    model.eval()
    n = min(max_windows, (tokens.size - 1) // seq)
    losses = []
    for w in range(0, n, 16):
        rows = np.stack([tokens[i * seq: i * seq + seq + 1] for i in range(w, min(n, w + 16))]).astype(np.int64)
        x = torch.from_numpy(rows).to(device)
        with amp():
            logits = model(x[:, :-1])
        losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                      reduction="sum").item())
    model.train()
    return sum(losses) / (n * seq)


def train(args) -> None:
    work = Path(args.work)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(**NANO_CONFIG)
    model = Transformer(cfg)
    init_weights(model, cfg.num_hidden_layers)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)
    train_tokens = np.fromfile(work / "train.bin", dtype=np.uint16)
    val_tokens = np.fromfile(work / "val.bin", dtype=np.uint16)
    step, best = 0, {"val_loss": float("inf"), "step": -1}
    ckpt_path = work / "ckpt.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        step, best = ckpt["step"], ckpt["best"]
        print(f"resumed from step {step}", flush=True)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    log = open(work / "train_log.jsonl", "a")
    t0 = time.time()
    tokens_per_step = args.batch * args.seq
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x = batches(train_tokens, args.batch, args.seq, gen).to(device, non_blocking=True)
        with amp():
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        record = {"step": step, "tokens": step * tokens_per_step, "train_loss": round(loss.item(), 4), "lr": g["lr"],
                  "elapsed_s": round(time.time() - t0, 1)}
        out_of_time = args.time_limit and time.time() - t0 > args.time_limit
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            record["val_loss"] = round(evaluate(model, val_tokens, args.seq, device, amp, args.val_windows), 4)
            if record["val_loss"] < best["val_loss"]:
                best = {"val_loss": record["val_loss"], "step": step, "train_loss": record["train_loss"]}
                torch.save({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()},
                           work / "best.pt")
        if step % args.log_every == 0 or "val_loss" in record:
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        if step % args.save_every == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                        "best": best}, ckpt_path)
        if out_of_time:
            print(f"time limit {args.time_limit}s reached at step {step}", flush=True)
            break
    export(args, cfg, best)


def export(args, cfg: ModelConfig, best: dict) -> None:
    """Write the best-validation weights as the HF folder layout of Mistral-7B-Instruct-v0.2 (BF16 shards)."""
    work, out = Path(args.work), Path(args.out)
    state = torch.load(work / "best.pt", weights_only=True)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: state[name].to(torch.bfloat16) for name in sorted(state, key=_file_order)}
    save_sharded(tensors, out, max_shard_bytes=args.shard_bytes)
    write_json(out / "config.json", cfg.to_hf_dict())
    data = json.loads((work / "data.json").read_text())
    write_json(out / "training.json", {"best": best, "data": data, "config": NANO_CONFIG, "args": vars(args)})
    print(json.dumps({"exported": str(out), "best": best}), flush=True)


def _file_order(name: str):
    if name == "model.embed_tokens.weight":
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (2 if name == "model.norm.weight" else 3, 0, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--data", default="../shared/data/pg-english/train")
    pp.add_argument("--work", default=".nano-work")
    pp.add_argument("--seed", type=int, default=0)
    pt = sub.add_parser("train")
    pt.add_argument("--work", default=".nano-work")
    pt.add_argument("--out", default="models/mistral-nano")
    pt.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--steps", type=int, default=1500)
    pt.add_argument("--batch", type=int, default=64)
    pt.add_argument("--seq", type=int, default=512)
    pt.add_argument("--lr", type=float, default=2e-3)
    pt.add_argument("--min-lr", type=float, default=1e-4)
    pt.add_argument("--warmup", type=int, default=100)
    pt.add_argument("--weight-decay", type=float, default=0.1)
    pt.add_argument("--eval-every", type=int, default=100)
    pt.add_argument("--val-windows", type=int, default=256)
    pt.add_argument("--log-every", type=int, default=25)
    pt.add_argument("--save-every", type=int, default=250)
    pt.add_argument("--time-limit", type=float, default=0,
                    help="stop (and export the best so far) after this many seconds")
    pt.add_argument("--shard-bytes", type=int, default=16_000_000)
    args = p.parse_args()
    prepare(args) if args.cmd == "prepare" else train(args)


if __name__ == "__main__":
    main()
