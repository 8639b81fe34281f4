"""Packing: vectorised functions against plain loop references, and against the real libraries when installed."""

import pytest
import torch

from quantkit.formats import packing as P


def _codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_bits_matches_reference_and_round_trips(bits, dim):
    shape = (64, 24) if dim == 0 else (24, 64)
    v = _codes(shape, bits)
    packed = P.pack_bits(v, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == 64 * bits // 32
    assert torch.equal(packed, P.pack_bits_reference(v, bits, dim=dim))
    assert torch.equal(P.unpack_bits(packed, bits, 64, dim=dim), v)
    assert torch.equal(P.unpack_bits_reference(packed, bits, 64, dim=dim), v)


def test_pack_bits_padding_and_refusal():
    v = _codes((5, 20), 4)
    packed = P.pack_bits(v, 4, dim=1, pad=True)
    assert packed.shape == (5, 3)
    assert torch.equal(packed, P.pack_bits_reference(v, 4, dim=1, pad=True))
    assert torch.equal(P.unpack_bits(packed, 4, 20, dim=1), v)
    from quantkit.errors import FormatError
    with pytest.raises(FormatError):
        P.pack_bits(v, 3, dim=1)


def test_gptq_4bit_layout_by_hand():
    # in=8, out=1: qweight is one word holding input channels 0..7 at nibbles 0..7
    codes = torch.arange(8, dtype=torch.uint8)[None, :]
    qw = P.gptq_pack_qweight(codes, 4)
    assert qw.shape == (1, 1) and int(qw) == 0x76543210


@pytest.mark.parametrize("bits,expect", [(4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555)])
def test_gptq_v1_symmetric_zero_words(bits, expect):
    zeros = torch.full((32, 3), 1 << (bits - 1), dtype=torch.uint8)  # 2-bit: zero 2 -> stored 1 in every slot
    qz = P.gptq_pack_qzeros(zeros, bits, v1=True)
    assert torch.all((qz.to(torch.int64) & 0xFFFFFFFF) == expect)
    assert torch.equal(P.gptq_unpack_qzeros(qz, bits, 32, v1=True), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("v1", [False, True])
def test_gptq_round_trip_including_zero_underflow(bits, v1):
    codes = _codes((16, 64), bits, 1)
    zeros = _codes((32, 2), bits, 2)
    zeros[0, 0] = 0  # v1 underflow case
    assert torch.equal(P.gptq_unpack_qweight(P.gptq_pack_qweight(codes, bits), bits, 64), codes)
    assert torch.equal(P.gptq_unpack_qzeros(P.gptq_pack_qzeros(zeros, bits, v1), bits, 32, v1), zeros)


def test_gptq_v1_matches_gptqmodel_conversion():
    """v1 words = v2 words - 0x11111111, exactly what GPTQModel's convert_gptq_v2_to_v1_format does."""
    zeros = _codes((16, 4), 4, 3)
    v2 = P.gptq_pack_qzeros(zeros, 4, v1=False)
    v1 = P.gptq_pack_qzeros(zeros, 4, v1=True)
    assert torch.equal(v1, (v2.to(torch.int64) - 0x11111111).to(torch.int32))  # int32 wrap-around


def test_awq_pack_matches_autoawq_loop_and_round_trips():
    v = _codes((12, 32), 4, 4)
    packed = P.awq_pack(v)
    assert packed.shape == (12, 4)
    assert torch.equal(packed, P.awq_pack_reference(v))
    assert torch.equal(P.awq_unpack(packed), v)
    one = torch.arange(8, dtype=torch.uint8)[None, :]
    assert int(P.awq_pack(one)) == 0x75316420  # channels 0,2,4,6,1,3,5,7 at nibbles 0..7


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_packing_matches_library(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = _codes((24, 40), bits, 5)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(P.ct_pack_weight(codes, bits), ct.pack_to_int32(signed, bits))
    assert torch.equal(P.ct_pack_zero_point(codes, bits), ct.pack_to_int32(signed, bits, packed_dim=0))
    assert torch.equal(P.ct_unpack_weight(P.ct_pack_weight(codes, bits), bits, 40), codes)
    assert torch.equal(P.ct_unpack_zero_point(P.ct_pack_zero_point(codes, bits), bits, 24), codes)
