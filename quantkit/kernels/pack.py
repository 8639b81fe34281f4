"""The one packed layout the integer kernels consume, and its plain torch reference.

`PackedInt` (built from a `QuantTensor` by `pack_quant_tensor`):
  - `qweight` int32 [ceil(K/pf), N]: pf = 32 // container_bits codes per word, packed ALONG THE INPUT dimension
    (word r, bits [c*b, c*b+b) hold the code of input row r*pf + c), output columns contiguous — GPTQ's qweight
    orientation, so a [BK, BN] tile is a coalesced load along N. 2/4/8-bit codes use their own width; other
    widths (3, 5, 6, 7) live in an 8-bit container.
  - `scales` [G, N] (the stored scale dtype), `zeros` uint8 [G, N] (None when symmetric: zero = 2^(bits-1)).
  - act-order: the input rows are sorted by group (`perm`, applied to x as `x[:, perm]`); afterwards the groups
    are contiguous, so the kernels index groups as k // group_size. If the sorted groups are not exactly
    `group_size` long (unusual g_idx), `g_idx` (int32 [K], sorted order) is kept and the kernels gather by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.tensors import QuantTensor


@dataclass
class PackedInt:
    qweight: torch.Tensor  # int32 [ceil(K/pf), N]
    scales: torch.Tensor  # [G, N]
    zeros: torch.Tensor | None  # uint8 [G, N], None for symmetric
    bits: int  # true code width (for the zero point of symmetric schemes)
    container_bits: int  # 2, 4 or 8: width of a code inside qweight
    group_size: int
    in_features: int
    out_features: int
    perm: torch.Tensor | None = None  # int64 [K]: x[:, perm] is the row order of qweight
    g_idx: torch.Tensor | None = None  # int32 [K] in qweight row order, only when groups are not contiguous

    @property
    def pack_factor(self) -> int:
        return 32 // self.container_bits

    @property
    def symmetric_zero(self) -> int:
        return 1 << (self.bits - 1)

    def to(self, device) -> "PackedInt":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedInt(move(self.qweight), move(self.scales), move(self.zeros), self.bits, self.container_bits,
                         self.group_size, self.in_features, self.out_features, move(self.perm), move(self.g_idx))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.perm, self.g_idx)
                   if t is not None)


def container_bits(bits: int) -> int:
    return bits if bits in (2, 4, 8) else 8


def pack_codes(codes_kn: torch.Tensor, cbits: int) -> torch.Tensor:
    """uint8 codes [K, N] -> int32 [ceil(K/pf), N], pf codes per word along K (low bits = lower k)."""
    pf = 32 // cbits
    k, n = codes_kn.shape
    kp = -(-k // pf) * pf
    c = torch.zeros((kp, n), dtype=torch.int64, device=codes_kn.device)
    c[:k] = codes_kn.to(torch.int64)
    c = c.reshape(kp // pf, pf, n) << (torch.arange(pf, device=c.device) * cbits)[None, :, None]
    word = c.sum(dim=1)  # < 2^32, no overlap between fields
    return (word - ((word >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def unpack_codes(qweight: torch.Tensor, cbits: int, k: int) -> torch.Tensor:
    """int32 [ceil(K/pf), N] -> int32 codes [K, N] (inverse of pack_codes)."""
    pf = 32 // cbits
    shifts = (torch.arange(pf, device=qweight.device, dtype=torch.int32) * cbits)[None, :, None]
    codes = (qweight[:, None, :] >> shifts) & ((1 << cbits) - 1)
    return codes.reshape(-1, qweight.shape[1])[:k]


def pack_quant_tensor(qt: QuantTensor) -> PackedInt:
    """QuantTensor (codes [N, K], scales/zeros [N, G], optional g_idx) -> PackedInt."""
    n, k = qt.codes.shape
    cbits = container_bits(qt.bits)
    g = qt.group_index()
    perm = None
    if qt.has_act_order:
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    codes_kn = qt.codes.t() if perm is None else qt.codes[:, perm].t()
    contiguous = torch.equal(g, torch.arange(k, device=g.device) // qt.group_size)
    zeros = None
    if not qt.symmetric or not bool((qt.zeros == (1 << (qt.bits - 1))).all()):
        zeros = qt.zeros.t().contiguous().to(torch.uint8)
    return PackedInt(
        qweight=pack_codes(codes_kn, cbits).contiguous(),
        scales=qt.scales.t().contiguous(),
        zeros=zeros,
        bits=qt.bits,
        container_bits=cbits,
        group_size=qt.group_size,
        in_features=k,
        out_features=n,
        perm=perm,
        g_idx=None if contiguous else g.to(torch.int32).contiguous(),
    )


def group_of_rows(p: PackedInt, rows: torch.Tensor) -> torch.Tensor:
    return p.g_idx[rows].long() if p.g_idx is not None else rows // p.group_size


def dequant_packed(p: PackedInt, rows: slice | None = None, dtype=torch.float32) -> torch.Tensor:
    """Reference dequantization of qweight rows (in packed/permuted order) -> W^T [k_rows, N]."""
    rows = rows or slice(0, p.in_features)
    start, stop = rows.start, rows.stop
    pf = p.pack_factor
    w0, w1 = start // pf, -(-stop // pf)
    codes = unpack_codes(p.qweight[w0:w1], p.container_bits, (w1 - w0) * pf)[start - w0 * pf: stop - w0 * pf]
    g = group_of_rows(p, torch.arange(start, stop, device=codes.device))
    zeros = p.symmetric_zero if p.zeros is None else p.zeros[g].to(torch.float32)
    return ((codes.to(torch.float32) - zeros) * p.scales[g].to(torch.float32)).to(dtype)


def int_matmul_ref(x: torch.Tensor, p: PackedInt) -> torch.Tensor:
    """Torch reference: x [M, K] @ dequant(W)^T -> [M, N] (fp32 math, output in x.dtype)."""
    xp = x if p.perm is None else x[:, p.perm]
    return (xp.float() @ dequant_packed(p)).to(x.dtype)
