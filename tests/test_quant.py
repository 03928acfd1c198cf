"""The quantizer: error bound, exact pack/unpack round-trips, constant groups."""

import pytest
import torch

from nanokv.quant import (dequantize, dequantize_packed, pack, packed_bytes, quantize,
                          quantize_packed, unpack, unpack_rows)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [4, 16, 32])
def test_error_within_half_a_step(bits, group):
    g = torch.Generator().manual_seed(bits * 100 + group)
    x = torch.randn(3, 5, 64, generator=g) * torch.rand(3, 5, 1, generator=g) * 10
    codes, scale, zero = quantize(x, bits, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.dtype == zero.dtype == torch.float16
    x_hat = dequantize(codes, scale, zero)
    err = (x - x_hat).abs().view(3, 5, 64 // group, group)
    # scale/2, plus fp16 rounding of the zero point and fp32 arithmetic
    bound = scale.float()[..., None] / 2 + zero.float().abs()[..., None] * 2**-10 + 1e-5
    print(f"bits={bits} group={group}: max err {err.max():.4g}, max (err - scale/2) "
          f"{(err - scale.float()[..., None] / 2).max():.3g}")
    assert (err <= bound).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 31, 64, 65])
def test_pack_unpack_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (2, 3, n), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_bytes(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_takes_any_strides_and_rows(bits):
    """unpack of a strided view (a store's padded slice, a transposed layout) and unpack_rows
    (codes packed along the second-to-last dim, KIVI's keys) give the codes pack was given."""
    codes = torch.randint(0, 2**bits, (2, 3, 5, 32), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack(codes, bits)  # (2, 3, 5, bytes)
    strided = torch.stack([packed, packed], dim=-1)[..., 0]  # last-dim stride 2
    assert torch.equal(unpack(strided, bits, 32), codes)
    dense = packed.transpose(-1, -2).contiguous().transpose(-1, -2)  # dense, but the last dim is not the innermost
    assert torch.equal(unpack(dense, bits, 32), codes)
    assert torch.equal(unpack(packed.transpose(0, 2), bits, 32), codes.transpose(0, 2))
    assert torch.equal(unpack_rows(packed.transpose(-1, -2), bits, 32), codes.transpose(-1, -2))  # (.., 32, 5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_without_the_little_endian_shortcut(monkeypatch, bits):
    import sys

    codes = torch.randint(0, 2**bits, (2, 3, 32), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    monkeypatch.setattr(sys, "byteorder", "big")  # the path a big-endian machine takes
    assert torch.equal(unpack(pack(codes, bits), bits, 32), codes)


def test_dequantize_into_a_view_is_the_same():
    x = torch.randn(2, 3, 7, 64, generator=torch.Generator().manual_seed(1))
    packed, scale, zero = quantize_packed(x, 4, 32)
    buf = torch.full((2, 3, 9, 64), float("nan"))
    dequantize_packed(packed, scale, zero, 4, 64, out=buf[:, :, 1:8])  # a slice of a larger buffer
    assert torch.equal(buf[:, :, 1:8], dequantize_packed(packed, scale, zero, 4, 64))
    assert buf[:, :, 0].isnan().all() and buf[:, :, 8].isnan().all()  # nothing written outside


def test_packed_sizes_are_dense():
    assert [packed_bytes(64, b) for b in (2, 3, 4, 8)] == [16, 24, 32, 64]
    assert packed_bytes(9, 3) == 6 and packed_bytes(1, 2) == 1


def test_constant_and_extreme_groups_give_no_nan():
    x = torch.tensor([[5.0] * 8 + [0.0] * 8, [-1e4] * 4 + [1e4] * 4 + [0.0] * 8])
    for bits in (2, 3, 4, 8):
        packed, scale, zero = quantize_packed(x, bits, 8)
        x_hat = dequantize_packed(packed, scale, zero, bits, 16)
        assert torch.isfinite(x_hat).all()
        assert torch.equal(x_hat[0], x[0])  # constant groups come back exactly
        assert x_hat[1, :4].max() <= -1e4 + scale[1, 0].float() / 2 + 1 and x_hat[1, 4:8].min() > 9e3
