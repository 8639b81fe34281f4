"""Rotate-half RoPE: the plain-torch reference (used by the model, `quantkit.model.reference`) and the fused
RoPE + KV-cache write kernel of the GPU decode path (one kernel replaces ~12 small torch ops per layer).

Kernel input: the fused q|k|v projection output [rows = b*t, (H + 2*KVH) * D]. Each program handles one
(row, head): q heads are rotated and written to q_out [b, H, t, D]; k heads are rotated and written into the key
cache [b, KVH, max_len, D] at their position; v heads are copied into the value cache.
Reference (`rope_cache_ref`, the model's unfused path): `apply_rope` + `index_copy_`.

The plain-torch functions need no Triton (the model imports them on every install); the kernel needs Triton
(a GPU, or TRITON_INTERPRET=1) and imports it on first use.
"""

from __future__ import annotations

import torch

tl = None  # triton.language, imported with the kernel on first use (_rope_cache_kernel)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [len(positions), head_dim] for rotate-half RoPE, computed in fp32 as transformers does."""
    even = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (even / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., t, D] rotated by the cos/sin rows [t, D] of its positions: x * cos + rotate_half(x) * sin, computed
    half by half into the product's buffer (rotate_half negates the second half, and a + (-(b * s)) == a - b * s
    exactly in IEEE arithmetic, so the result is bitwise the same with two fewer full-size temporaries)."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].sub_(x[..., half:] * sin[..., :half])
    out[..., half:].add_(x[..., :half] * sin[..., half:])
    return out


# The Triton kernel, jitted on first use: importing triton here would already fix the interpreter mode
# (TRITON_INTERPRET) and cost every importer of the model, which needs only the plain-torch functions above.
def _rope_cache_source(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, T, stride_row, NH, NKV, max_len,
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
    c1 = tl.load(cos_ptr + t * hd + d).to(tl.float32)
    c2 = tl.load(cos_ptr + t * hd + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + t * hd + d).to(tl.float32)
    s2 = tl.load(sin_ptr + t * hd + HALF + d).to(tl.float32)
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


_jitted = None


def _rope_cache_kernel():
    global _jitted, tl
    if _jitted is None:
        import triton
        import triton.language

        tl = triton.language
        _jitted = triton.jit(_rope_cache_source)
    return _jitted


def rope_qkv_into_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, n_heads: int,
                        n_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """qkv [b, t, (H+2KVH)*D]; pos [t]; cos/sin [t, D]: the RoPE rows of `pos` -> q [b, H, t, D] (rotated);
    the rotated keys and the values are written into the caches [b, KVH, max_len, D] at `pos`."""
    b, t, _ = qkv.shape
    d = k_cache.shape[-1]
    rows = qkv.reshape(b * t, -1)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty((b, n_heads, t, d), device=qkv.device, dtype=k_cache.dtype)
    kernel = _rope_cache_kernel()
    kernel[(b * t, n_heads + 2 * n_kv_heads)](rows, cos, sin, pos, q, k_cache, v_cache, t, rows.stride(0), n_heads,
                                              n_kv_heads, k_cache.shape[2], HALF=d // 2)
    return q


def rope_cache_ref(qkv, cos, sin, pos, n_heads, n_kv_heads, k_cache, v_cache):
    """Plain torch, what the model computes without the kernel (same arguments as `rope_qkv_into_cache`)."""
    b, t, _ = qkv.shape
    d = k_cache.shape[-1]
    q, k, v = qkv.split([n_heads * d, n_kv_heads * d, n_kv_heads * d], dim=-1)
    q = q.reshape(b, t, n_heads, d).transpose(1, 2)
    k = k.reshape(b, t, n_kv_heads, d).transpose(1, 2)
    v = v.reshape(b, t, n_kv_heads, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    return q
