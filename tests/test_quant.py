"""The quantizer: error bound, exact pack/unpack round-trips, constant groups."""

import pytest
import torch

from nanokv.quant import (dequantize, dequantize_packed, pack, packed_bytes, quantize,
                          quantize_packed, unpack)


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
