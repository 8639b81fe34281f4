"""Bit packing of integer codes into int32 words, as the GPTQ, AWQ and compressed-tensors formats store them.

All three formats use one primitive: a dense LSB-first bit stream along one axis. Value k of a run of 32 sits
at bit position k*bits of a 32*bits-bit stream that is cut into `bits` int32 words (for 2/4/8 bits this is
simply "value j of a word at bits*j"; for 3 bits it is GPTQ's 10+split+10+split+10 layout). What differs:

- GPTQ `qweight`: codes transposed to [in, out], packed along dim 0 (input);  `qzeros`: [groups, out] along dim 1.
  v1 (`checkpoint_format: gptq`) stores "zero minus one": each int32 word minus 0x11111111 (4-bit; GPTQModel's
  `convert_gptq_v2_to_v1_format`, a word-level subtraction with borrows), v2 stores true zeros.
- AWQ GEMM: [in, out] packed along dim 1 (output), 8 nibbles per word in the order [0, 2, 4, 6, 1, 3, 5, 7].
- compressed-tensors pack-quantized: codes [out, in] packed along dim 1 (input), zero points [out, groups]
  along dim 0; the stored unsigned value is the signed value + 2^(bits-1), which equals quantkit's unsigned code.

Every vectorised function has a plain loop reference (`*_reference`) beside it; tests compare the two.
"""

from __future__ import annotations

import torch

from quantkit.errors import FormatError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output channel 8*col + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output channel k (0..7) sits at nibble AWQ_REVERSE_ORDER[k]

_MASK32 = (1 << 32) - 1


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> the same bits as int32."""
    words = words & _MASK32
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def _to_uint(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> int64 with the unsigned value."""
    return words.to(torch.int64) & _MASK32


def packed_length(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack_bits(values: torch.Tensor, bits: int, dim: int = 0, pad: bool = False) -> torch.Tensor:
    """Pack unsigned integers (< 2^bits) along `dim` of a 2-D tensor into int32 words, LSB first, densely.

    The packed axis must hold a multiple of 32/gcd(32, bits) values unless `pad` (zero padding, as
    compressed-tensors does); the result has ceil(n*bits/32) words along `dim`.
    """
    if values.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D tensor, got shape {list(values.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} not in 1..8")
    v = values.to(torch.int64)
    if dim == 1:
        v = v.t()
    n, m = v.shape
    run = 32  # values per `bits` words
    if n % run:
        words_needed = packed_length(n, bits)
        if not pad and (n * bits) % 32:
            raise FormatError(f"cannot pack {n} values of {bits} bits into whole int32 words")
        v = torch.cat([v, v.new_zeros(run - n % run, m)])
    else:
        words_needed = n * bits // 32
    v = v.reshape(-1, run, m)  # [runs, 32, m]
    out = torch.zeros(v.shape[0], bits, m, dtype=torch.int64)
    for k in range(run):
        start = k * bits
        word, offset = divmod(start, 32)
        out[:, word] |= (v[:, k] << offset) & _MASK32
        if offset + bits > 32:
            out[:, word + 1] |= v[:, k] >> (32 - offset)
    out = _to_int32(out.reshape(-1, m)[:words_needed])
    return out.t().contiguous() if dim == 1 else out.contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of pack_bits: `n` values along `dim` -> uint8 (or int64 for bits > 8, unused)."""
    w = _to_uint(packed)
    if dim == 1:
        w = w.t()
    words, m = w.shape
    run_words = bits  # 32 values per `bits` words
    runs = -(-words // run_words)
    if words % run_words:
        w = torch.cat([w, w.new_zeros(runs * run_words - words, m)])
    w = w.reshape(runs, run_words, m)
    out = torch.empty(runs, 32, m, dtype=torch.int64)
    mask = (1 << bits) - 1
    for k in range(32):
        start = k * bits
        word, offset = divmod(start, 32)
        val = w[:, word] >> offset
        if offset + bits > 32:
            val = val | (w[:, word + 1] << (32 - offset))
        out[:, k] = val & mask
    out = out.reshape(-1, m)[:n].to(torch.uint8)
    return out.t().contiguous() if dim == 1 else out.contiguous()


def pack_bits_reference(values: torch.Tensor, bits: int, dim: int = 0, pad: bool = False) -> torch.Tensor:
    """Plain loop version of pack_bits: one Python integer bit stream per column."""
    v = values.tolist() if dim == 0 else values.t().tolist()
    n, m = len(v), len(v[0])
    words = packed_length(n, bits)
    if not pad and (n * bits) % 32:
        raise FormatError(f"cannot pack {n} values of {bits} bits into whole int32 words")
    out = [[0] * m for _ in range(words)]
    for c in range(m):
        stream = 0
        for r in range(n):
            stream |= (int(v[r][c]) & ((1 << bits) - 1)) << (r * bits)
        for wi in range(words):
            u = (stream >> (32 * wi)) & _MASK32
            out[wi][c] = u - (1 << 32) if u >= (1 << 31) else u
    t = torch.tensor(out, dtype=torch.int32)
    return t.t().contiguous() if dim == 1 else t


def unpack_bits_reference(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    p = packed.tolist() if dim == 0 else packed.t().tolist()
    words, m = len(p), len(p[0])
    out = [[0] * m for _ in range(n)]
    for c in range(m):
        stream = 0
        for wi in range(words):
            stream |= (p[wi][c] & _MASK32) << (32 * wi)
        for r in range(n):
            out[r][c] = (stream >> (r * bits)) & ((1 << bits) - 1)
    t = torch.tensor(out, dtype=torch.uint8)
    return t.t().contiguous() if dim == 1 else t


# ---- GPTQ ----

def gptq_v1_offset(bits: int) -> int:
    """The per-word constant GPTQModel subtracts for v1 ("zero minus one"): one 1 in every value slot."""
    if 32 % bits:
        raise ValueError(f"v1 word offset is defined for 2/4/8 bits, not {bits}")
    return sum(1 << (bits * j) for j in range(32 // bits))


def gptq_pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] (unsigned) -> qweight int32 [in*bits/32, out] (packed along the input dim)."""
    return pack_bits(codes.t(), bits, dim=0)


def gptq_unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [in*bits/32, out] -> codes uint8 [out, in]."""
    return unpack_bits(qweight, bits, in_features, dim=0).t().contiguous()


def gptq_pack_qzeros(zeros: torch.Tensor, bits: int, v1: bool) -> torch.Tensor:
    """zeros [out, groups] (true zero points) -> qzeros int32 [groups, out*bits/32].

    v1 subtracts one from every zero: word-wise for 2/4/8 bits (GPTQModel's convention, exact inverse of the
    loader's `+= 0x11111111`), value-wise for 3 bits (AutoGPTQ's `zeros -= 1` before packing).
    """
    z = zeros.t().to(torch.int64)
    maxq = (1 << bits) - 1
    if v1 and 32 % bits:
        return pack_bits((z - 1) & maxq, bits, dim=1)
    packed = pack_bits(z, bits, dim=1)
    if v1:
        packed = _to_int32(_to_uint(packed) - gptq_v1_offset(bits))
    return packed


def gptq_unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, v1: bool) -> torch.Tensor:
    """qzeros int32 [groups, out*bits/32] -> true zero points uint8 [out, groups]."""
    maxq = (1 << bits) - 1
    if v1 and 32 % bits:
        z = unpack_bits(qzeros, bits, out_features, dim=1).to(torch.int64)
        return ((z + 1) & maxq).to(torch.uint8).t().contiguous()
    if v1:
        qzeros = _to_int32(_to_uint(qzeros) + gptq_v1_offset(bits))
    return unpack_bits(qzeros, bits, out_features, dim=1).t().contiguous()


# ---- AWQ (GEMM) ----

def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """values [rows, out] 4-bit -> int32 [rows, out/8], nibble i of word c = channel 8c + AWQ_ORDER[i]."""
    rows, out = values.shape
    if out % 8:
        raise FormatError(f"AWQ packing needs the output dimension to be a multiple of 8, got {out}")
    v = values.to(torch.int64).reshape(rows, out // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    return _to_int32((v << shifts).sum(dim=-1))


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, out/8] -> uint8 [rows, out]."""
    rows, cols = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nib = (_to_uint(packed)[:, :, None] >> shifts) & 0xF  # [rows, cols, 8] in stored (nibble) order
    return nib[:, :, list(AWQ_REVERSE_ORDER)].reshape(rows, cols * 8).to(torch.uint8)


def awq_pack_reference(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's `WQLinear_GEMM.from_linear` packing loop, verbatim in structure."""
    rows, out = values.shape
    v = values.to(torch.int64)
    packed = torch.zeros(rows, out // 8, dtype=torch.int64)
    for col in range(out // 8):
        for i in range(8):
            packed[:, col] |= v[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return _to_int32(packed)


# ---- compressed-tensors pack-quantized ----

def ct_pack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] unsigned (= signed + 2^(bits-1)) -> weight_packed int32 [out, ceil(in*bits/32)]."""
    return pack_bits(codes, bits, dim=1, pad=True)


def ct_unpack_weight(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return unpack_bits(packed, bits, in_features, dim=1)


def ct_pack_zero_point(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros [out, groups] unsigned -> weight_zero_point int32 [ceil(out*bits/32), groups] (packed along dim 0)."""
    return pack_bits(zeros, bits, dim=0, pad=True)


def ct_unpack_zero_point(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return unpack_bits(packed, bits, out_features, dim=0)
