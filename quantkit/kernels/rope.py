"""Fused RoPE + KV-cache write for the GPU decode path: one kernel replaces ~12 small torch ops per layer.

Input: the fused q|k|v projection output [rows = b*t, (H + 2*KVH) * D]. Each program handles one (row, head):
q heads are rotated and written to q_out [b, H, t, D]; k heads are rotated and written into the key cache
[b, KVH, max_len, D] at their position; v heads are copied into the value cache.
Reference (`rope_cache_ref`, the runtime's unfused path): `apply_rope` (rotate-half) + `index_copy_`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, T, stride_row, NH, NKV, max_len,
                       HALF: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    b = row // T
    t = row % T
    p = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    hd = 2 * HALF
    src = qkv_ptr + row * stride_row + head * hd
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    c1 = tl.load(cos_ptr + p * hd + d).to(tl.float32)
    c2 = tl.load(cos_ptr + p * hd + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + p * hd + d).to(tl.float32)
    s2 = tl.load(sin_ptr + p * hd + HALF + d).to(tl.float32)
    hv = d * 0 + head  # the head index as a vector (masks must be tensors of the block's shape)
    rotate = hv < NH + NKV
    y1 = tl.where(rotate, x1 * c1 - x2 * s1, x1)
    y2 = tl.where(rotate, x2 * c2 + x1 * s2, x2)
    is_q = hv < NH
    is_k = (hv >= NH) & rotate
    is_v = hv >= NH + NKV
    q_dst = q_ptr + ((b * NH + head) * T + t) * hd
    k_dst = kc_ptr + ((b * NKV + (head - NH)) * max_len + p) * hd
    v_dst = vc_ptr + ((b * NKV + (head - NH - NKV)) * max_len + p) * hd
    tl.store(q_dst + d, y1.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(q_dst + HALF + d, y2.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(k_dst + d, y1.to(kc_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_dst + HALF + d, y2.to(kc_ptr.dtype.element_ty), mask=is_k)
    tl.store(v_dst + d, y1.to(vc_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_dst + HALF + d, y2.to(vc_ptr.dtype.element_ty), mask=is_v)


def rope_qkv_into_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, n_heads: int,
                        n_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """qkv [b, t, (H+2KVH)*D]; cos/sin [max_len, D] tables; pos [t] -> q [b, H, t, D] (k, v written to caches)."""
    b, t, _ = qkv.shape
    d = k_cache.shape[-1]
    rows = qkv.reshape(b * t, -1)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = torch.empty((b, n_heads, t, d), device=qkv.device, dtype=k_cache.dtype)
    _rope_cache_kernel[(b * t, n_heads + 2 * n_kv_heads)](rows, cos, sin, pos, q, k_cache, v_cache, t, rows.stride(0),
                                                           n_heads, n_kv_heads, k_cache.shape[2], HALF=d // 2)
    return q


def rope_cache_ref(qkv, cos, sin, pos, n_heads, n_kv_heads, k_cache, v_cache):
    from quantkit.model.reference import apply_rope

    b, t, _ = qkv.shape
    d = k_cache.shape[-1]
    q, k, v = qkv.split([n_heads * d, n_kv_heads * d, n_kv_heads * d], dim=-1)
    q = q.reshape(b, t, n_heads, d).transpose(1, 2)
    k = k.reshape(b, t, n_kv_heads, d).transpose(1, 2)
    v = v.reshape(b, t, n_kv_heads, d).transpose(1, 2)
    c, s = cos[pos], sin[pos]
    q, k = apply_rope(q, c, s), apply_rope(k, c, s)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    return q
