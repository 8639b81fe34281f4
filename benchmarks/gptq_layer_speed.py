"""GPTQ of one Mistral-7B-shaped decoder layer on CPU: quantkit vs GPTQModel 7.6 in the same process.

Layer: hidden 4096, intermediate 14336, 32 query / 8 KV heads (q,o [4096,4096]; k,v [1024,4096];
gate,up [14336,4096]; down [4096,14336]), random BF16 weights (N(0, 0.02²)).
Calibration: `--samples` × `--seqlen` tokens (default 128 × 512) of synthetic BF16 activations with a realistic
shape: per-channel log-normal scales with a few outlier channels for the attention / MLP / o_proj inputs, and
silu(a)·b products (heavy-tailed) for the down_proj input. Each batch is generated once and fed to both tools;
activations are never all held in memory (Hessians are accumulated batch by batch).

Both sides do the same work, as in their own whole-layer pipelines:
- quantkit: one `GPTQ` per distinct input (q/k/v share one, gate/up share one; the inverse-Hessian factor is
  computed once per shared input), `add_batch` per batch, then `quantize` of the 7 linears.
- GPTQModel: its internal `gptqmodel.quantization.gptq.GPTQ` class, one per linear; the leaders of shared inputs
  (q_proj, gate_proj) accumulate the Hessian, followers `adopt_hessian_from` the leader and share a
  `SharedHessianFactorCache`, exactly as `GPTQProcessor.end_shared_input_capture` does; then `quantize()`.
Settings on both: 4-bit, group 128, symmetric, no act-order (GPTQModel: desc_act=False, act_group_aware=False),
damp 0.01, block 128. Generating the activations is not timed. Wall-clock, same process, same machine, alternating.

Usage: GPTQMODEL_CPU_WORKERS=2 nice -n 10 python benchmarks/gptq_layer_speed.py [--samples 128 --seqlen 512]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch
from torch import nn

HIDDEN, INTER, HEADS, KV_HEADS = 4096, 14336, 32, 8
HEAD_DIM = HIDDEN // HEADS
LINEARS = {  # name: (out, in, input tag)
    "self_attn.q_proj": (HIDDEN, HIDDEN, "attn_in"),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN, "attn_in"),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN, "attn_in"),
    "self_attn.o_proj": (HIDDEN, HIDDEN, "o_in"),
    "mlp.gate_proj": (INTER, HIDDEN, "mlp_in"),
    "mlp.up_proj": (INTER, HIDDEN, "mlp_in"),
    "mlp.down_proj": (HIDDEN, INTER, "down_in"),
}
INPUT_WIDTH = {"attn_in": HIDDEN, "o_in": HIDDEN, "mlp_in": HIDDEN, "down_in": INTER}


def channel_scales(n: int, gen: torch.Generator, outliers: int) -> torch.Tensor:
    s = torch.exp(torch.randn(n, generator=gen) * 0.5)
    idx = torch.randperm(n, generator=gen)[:outliers]
    s[idx] *= 20.0
    return s


def make_batch(b: int, seqlen: int, scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + b)
    acts = {}
    for tag in ("attn_in", "o_in", "mlp_in"):
        acts[tag] = (torch.randn(1, seqlen, HIDDEN, generator=gen) * scales[tag]).to(torch.bfloat16)
    a = torch.randn(1, seqlen, INTER, generator=gen) * 2.0
    c = torch.randn(1, seqlen, INTER, generator=gen) * scales["down_in"]
    acts["down_in"] = (torch.nn.functional.silu(a) * c).to(torch.bfloat16)
    return acts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--only", default=None, help="comma-separated subset of linears (debugging)")
    args = ap.parse_args()

    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ as RefGPTQ
    from gptqmodel.quantization.gptq import SharedHessianFactorCache

    from quantkit.quant.gptq import GPTQ, proxy_loss
    from quantkit.quant.scheme import Scheme

    names = list(LINEARS) if not args.only else [n for n in LINEARS if n.split(".")[-1] in args.only.split(",")]
    tags = sorted({LINEARS[n][2] for n in names})
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, "
          f"{args.samples}x{args.seqlen} tokens, linears: {', '.join(n.split('.')[-1] for n in names)}", flush=True)

    gen = torch.Generator().manual_seed(0)
    weights = {n: (torch.randn(LINEARS[n][0], LINEARS[n][1], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
    scales = {"attn_in": channel_scales(HIDDEN, gen, 8), "o_in": channel_scales(HIDDEN, gen, 0) * 0.3,
              "mlp_in": channel_scales(HIDDEN, gen, 8), "down_in": channel_scales(INTER, gen, 16) * 0.5}

    # fp32 scales as GPTQModel's GPTQ uses internally (the stored fp16 rounding happens in its packer), so the
    # dequantized results are comparable; speed does not depend on it
    scheme = Scheme(bits=4, group_size=128, symmetric=True, scale_dtype="float32")
    qcfg = dict(bits=4, group_size=128, sym=True, desc_act=False, act_group_aware=False, damp_percent=0.01,
                static_groups=False, fallback=None)

    # quantkit: one collector per distinct input
    ours = {tag: GPTQ(INPUT_WIDTH[tag], name=tag) for tag in tags}
    # GPTQModel: one task per linear; the first linear of each input is the leader
    ref_tasks, leaders = {}, {}
    for n in names:
        lin = nn.Linear(LINEARS[n][1], LINEARS[n][0], bias=False, dtype=torch.bfloat16)
        lin.weight.data = weights[n].clone()
        task = RefGPTQ(lin, QuantizeConfig(**qcfg))
        task.quantizer.configure(perchannel=True)
        ref_tasks[n] = task
        leaders.setdefault(LINEARS[n][2], n)

    t_ours = {"hessian": 0.0}
    t_ref = {"hessian": 0.0}
    t_gen = 0.0
    for b in range(args.samples):
        t = time.perf_counter()
        acts = make_batch(b, args.seqlen, scales)
        t_gen += time.perf_counter() - t
        if b % 2 == 0:
            order = ("ours", "ref")
        else:
            order = ("ref", "ours")
        for side in order:
            t = time.perf_counter()
            if side == "ours":
                for tag in tags:
                    ours[tag].add_batch(acts[tag])
                t_ours["hessian"] += time.perf_counter() - t
            else:
                for tag, leader in leaders.items():
                    ref_tasks[leader].add_batch(acts[tag], None)
                t_ref["hessian"] += time.perf_counter() - t
        del acts
        if (b + 1) % 16 == 0:
            print(f"  batch {b + 1}/{args.samples}: hessian quantkit {t_ours['hessian']:.1f}s, "
                  f"gptqmodel {t_ref['hessian']:.1f}s (activation generation {t_gen:.1f}s, untimed)", flush=True)

    # GPTQModel: followers adopt the leader's Hessian and share its factor cache (as GPTQProcessor does)
    t = time.perf_counter()
    for tag in tags:
        ours[tag].hessian()
    t_ours["hessian"] += time.perf_counter() - t
    t = time.perf_counter()
    caches = {}
    for n in names:
        leader = leaders[LINEARS[n][2]]
        if n != leader:
            ref_tasks[n].adopt_hessian_from(ref_tasks[leader])
            cache = caches.get(leader)
            if cache is None:
                cache = caches[leader] = SharedHessianFactorCache(0, leader, leader=leader)
                ref_tasks[leader].attach_shared_hessian_cache(cache)
            ref_tasks[n].attach_shared_hessian_cache(cache)
    t_ref["hessian"] += time.perf_counter() - t
    print(f"hessians: quantkit {t_ours['hessian']:.1f}s  gptqmodel {t_ref['hessian']:.1f}s  "
          f"ratio {t_ours['hessian'] / t_ref['hessian']:.3f}", flush=True)

    print(f"{'linear':<18} {'quantkit s':>10} {'gptqmodel s':>11} {'ratio':>6} "
          f"{'loss ratio q/g':>14} {'equal Q (bf16)':>14}",
          flush=True)
    for i, n in enumerate(names):
        tag = LINEARS[n][2]
        H = ours[tag].hessian()
        w = weights[n]
        order = ("ours", "ref") if i % 2 == 0 else ("ref", "ours")
        for side in order:
            gc.collect()
            t = time.perf_counter()
            if side == "ours":
                qt, info = ours[tag].quantize(w, scheme, name=n)
                t_ours[n] = time.perf_counter() - t
            else:
                Q = ref_tasks[n].quantize(blocksize=128)[0]
                t_ref[n] = time.perf_counter() - t
        wq_ours = qt.dequantize()
        wq_ref = Q.float()
        l_ours = proxy_loss(w.float(), wq_ours, H)
        l_ref = proxy_loss(w.float(), wq_ref, H)
        # GPTQModel returns Q in the module dtype (BF16): compare after the same rounding
        equal = (wq_ours.to(torch.bfloat16) == Q).float().mean().item()
        print(f"{n:<18} {t_ours[n]:>10.1f} {t_ref[n]:>11.1f} {t_ours[n] / t_ref[n]:>6.3f} {l_ours / l_ref:>14.4f} "
              f"{equal * 100:>13.2f}%", flush=True)
        del qt, Q, wq_ours, wq_ref
        ref_tasks[n].free() if hasattr(ref_tasks[n], "free") else None
        if n == names[-1] or LINEARS[names[i + 1]][2] != tag:
            del ours[tag]  # this input's Hessian is no longer needed
            gc.collect()

    total_ours = sum(t_ours.values())
    total_ref = sum(t_ref.values())
    print(f"TOTAL (hessian + quantize): quantkit {total_ours:.1f}s  gptqmodel {total_ref:.1f}s  "
          f"ratio quantkit/gptqmodel = {total_ours / total_ref:.3f}")
    q_ours = total_ours - t_ours["hessian"]
    q_ref = total_ref - t_ref["hessian"]
    print(f"quantize only: quantkit {q_ours:.1f}s  gptqmodel {q_ref:.1f}s  ratio {q_ours / q_ref:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
