"""Decode attention (one query per sequence) over the static KV cache, in one Triton kernel.

The GPU decode step otherwise spends ~8 small kernels per layer on attention (casts, two matmuls, scale, mask,
softmax) and reads the whole cache. Here each program takes one (sequence, kv head) pair and the GQA group of
query heads that share it, walks the cache positions that the query may see (0..pos, or the sliding window) in
blocks with an online softmax in fp32, and writes the group's outputs. Long caches are cut into position chunks
walked in parallel (flash-decoding: one program per chunk, then a small kernel merges the partial softmaxes).
The position is read from a device tensor, so a CUDA graph captured once serves every step.

Reference: `decode_attention_ref` — the model's unfused decode path (`quantkit.model.reference`, one query per
sequence: fp32 scores, masked softmax, probabilities rounded to the cache dtype before the value product; the
kernel keeps them in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, part_ptr, KVH, max_len, window, scale, chunk,
                             GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BL: tl.constexpr,
                             SPLIT: tl.constexpr):
    pid = tl.program_id(0)  # b * KVH + kv head
    split = tl.program_id(1)
    b = pid // KVH
    kvh = pid % KVH
    pos = tl.load(pos_ptr)
    lo = tl.maximum(tl.maximum(pos - window + 1, 0), split * chunk)
    hi = tl.minimum(pos + 1, split * chunk + chunk)  # this program's positions: lo .. hi - 1 (maybe none)
    g = tl.arange(0, GP)
    g_ok = g < GROUP
    d = tl.arange(0, D)
    head0 = kvh * GROUP  # first query head of the group (heads of one kv head are consecutive)
    rows = b * KVH * GROUP + head0 + g
    q = tl.load(q_ptr + (rows * D)[:, None] + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)  # [GP, D]
    cache = (b * KVH + kvh) * max_len * D
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for start in range(lo, hi, BL):
        offs = start + tl.arange(0, BL)
        ok = offs < hi
        kt = tl.load(k_ptr + cache + offs[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * kt[None, :, :], axis=2) * scale  # [GP, BL]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_ptr + cache + offs[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        m_i = m_new
    if SPLIT == 1:
        tl.store(out_ptr + (rows * D)[:, None] + d[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None])
    else:  # partials [heads_total, SPLIT, D + 2]: unnormalised acc, then the running max and the sum
        base = part_ptr + (rows * SPLIT + split) * (D + 2)
        tl.store(base[:, None] + d[None, :], acc, mask=g_ok[:, None])
        tl.store(base + D, m_i, mask=g_ok)
        tl.store(base + D + 1, l_i, mask=g_ok)


@triton.jit
def _combine_splits_kernel(part_ptr, out_ptr, D: tl.constexpr, SPLIT: tl.constexpr):
    row = tl.program_id(0)  # b * H + head
    d = tl.arange(0, D)
    sp = tl.arange(0, SPLIT)
    base = part_ptr + (row * SPLIT + sp) * (D + 2)
    m = tl.load(base + D)  # [SPLIT]; -inf for a split that saw no position
    l = tl.load(base + D + 1)
    m_all = tl.max(m, axis=0)
    wgt = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)
    acc = tl.load(base[:, None] + d[None, :])  # [SPLIT, D]
    out = tl.sum(acc * wgt[:, None], axis=0) / tl.sum(l * wgt, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def split_count(max_len: int, per_split: int = 256, most: int = 32) -> int:
    """Position splits for a cache of `max_len` (a power of two; 1 = one program per kv head walks them all).
    Fixed per cache, so a captured CUDA graph stays valid for every position."""
    splits = 1
    while splits < most and splits * per_split < max_len:
        splits *= 2
    return splits


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     sliding_window: int | None = None, out: torch.Tensor | None = None,
                     splits: int | None = None) -> torch.Tensor:
    """q [b, H, 1, D] (contiguous); caches [b, KVH, max_len, D] holding positions 0..pos; pos: int64 tensor [1]
    -> [b, H, 1, D]: softmax(q k^T / sqrt(D)) v over positions max(0, pos - window + 1)..pos.
    `splits` (power of two; default `split_count(max_len)`): the positions are cut into that many chunks, each
    walked by its own program (flash-decoding), and a second kernel merges the partial softmaxes."""
    b, heads, t, d = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if t != 1 or heads % kv_heads or d & (d - 1) or not q.is_contiguous() or not k_cache.is_contiguous():
        raise ValueError(f"decode_attention: needs one contiguous query per sequence and a power-of-two head dim, "
                         f"got q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    group = heads // kv_heads
    splits = splits or split_count(max_len)
    if splits & (splits - 1):
        raise ValueError(f"decode_attention: splits must be a power of two, got {splits}")
    if out is None:
        out = torch.empty_like(q)
    window = sliding_window if sliding_window is not None else max_len + 1
    bl = 32 if d >= 128 else 64
    chunk = -(-max_len // (splits * bl)) * bl
    parts = out if splits == 1 else torch.empty((b * heads, splits, d + 2), device=q.device, dtype=torch.float32)
    _decode_attention_kernel[(b * kv_heads, splits)](q, k_cache, v_cache, pos, out, parts, kv_heads, max_len, window,
                                                     d ** -0.5, chunk, GROUP=group,
                                                     GP=max(triton.next_power_of_2(group), 2), D=d, BL=bl,
                                                     SPLIT=splits, num_warps=4)
    if splits > 1:
        _combine_splits_kernel[(b * heads,)](parts, out, D=d, SPLIT=splits)
    return out


def decode_attention_ref(q, k_cache, v_cache, pos, sliding_window=None):
    """Plain torch, the model's unfused decode attention over the whole cache."""
    b, heads, _, d = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    p = int(pos.reshape(-1)[0])
    k_pos = torch.arange(max_len, device=q.device)
    allowed = k_pos <= p
    if sliding_window is not None:
        allowed &= k_pos > p - sliding_window
    qg = q.reshape(b, kv_heads, heads // kv_heads, d)
    scores = (qg.float() @ k_cache.float().transpose(-1, -2)) * (d ** -0.5)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(v_cache.dtype)
    return (probs @ v_cache).reshape(b, heads, 1, d)
