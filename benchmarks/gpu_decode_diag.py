#!/usr/bin/env python
"""GPU decode diagnosis (about 90 s on an H100), for the two questions benchmarks/gpu.py raised:

  1. correctness of the fused decode path on real hardware: logits of the fused-kernel generator (CUDA graph and
     eager) against the plain torch path, next to how much the plain path itself moves when the embeddings change
     by one bf16 step (a random 32-layer bf16 model amplifies rounding; the W4 one much less);
  2. eager (no CUDA graph) decode: per-step milliseconds and the top CPU/CUDA ops from torch.profiler.

    python benchmarks/gpu_decode_diag.py OUT_DIR        # writes OUT_DIR/diag.json
Results of 2026-11-27: benchmarks/results/gpu_h100_run5_decode_diag.json (see RESULTS.md).
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import gpu  # noqa: E402
from quantkit.runtime.generate import Generator  # noqa: E402

out = {}
dev = torch.device("cuda")
torch.manual_seed(0)

def agree(model, tag, steps=3, prompt_len=16):
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=dev)
    gens = {"fused_graph": Generator(model, max_len=40, cuda_graph=True, fused_kernels=True),
            "fused_eager": Generator(model, max_len=40, cuda_graph=False, fused_kernels=True),
            "plain": Generator(model, max_len=40, cuda_graph=False, fused_kernels=False)}
    logits = {k: [g.forward(prompt, 0)] for k, g in gens.items()}
    tok = logits["plain"][0].argmax(-1)
    for i in range(steps):
        for k, g in gens.items():
            logits[k].append(g.decode_step(tok, prompt_len + i).clone())
        tok = logits["plain"][-1].argmax(-1)
    res = {}
    for k in ("fused_graph", "fused_eager"):
        res[k + "_vs_plain"] = [round(gpu.rel_err(a, b), 5) for a, b in zip(logits[k], logits["plain"])]
    res["graph_vs_eager_fused"] = [round(gpu.rel_err(a, b), 5)
                                   for a, b in zip(logits["fused_graph"], logits["fused_eager"])]
    # sensitivity of the plain path itself: embeddings scaled by (1 + 2^-8), same tokens
    emb = model.model.embed_tokens.weight
    saved = emb.data.clone()
    emb.data = (emb.float() * (1 + 2 ** -8)).to(emb.dtype)
    g = Generator(model, max_len=40, cuda_graph=False, fused_kernels=False)
    res["plain_vs_plain_perturbed_prefill"] = round(gpu.rel_err(g.forward(prompt, 0), logits["plain"][0]), 5)
    emb.data = saved
    print(tag, json.dumps(res), flush=True)
    out[tag] = res

def eager_profile(model, tag):
    g = Generator(model, max_len=64, cuda_graph=False, fused_kernels=True)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=dev)
    tok = g.forward(prompt, 0).argmax(-1)
    times = []
    for i in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        tok = g.decode_step(tok, 16 + i).argmax(-1)
        torch.cuda.synchronize()
        times.append(round((time.perf_counter() - t) * 1e3, 2))
    print(tag, "eager step ms", times, flush=True)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(2):
            tok = g.decode_step(tok, 30 + i).argmax(-1)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60)
    print(table, flush=True)
    out[tag + "_eager_ms"] = times

cfg = gpu.mistral7b_config(32, False)
for kind in ("w4_g128", "bf16"):
    m = gpu.build_model(cfg, dev, kind == "w4_g128", "triton")
    agree(m, kind)
    eager_profile(m, kind)
    del m
    torch.cuda.empty_cache()
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
(Path(sys.argv[1]) / "diag.json").write_text(json.dumps(out, indent=1))
