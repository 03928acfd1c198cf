"""
Kernel 4: quantize and pack in one pass. Must match nanokv.quant.quantize_packed bit for bit:
asymmetric min-max round-to-nearest in groups of GROUP consecutive values of a row,

    zero  = fp16(min(x)),  scale = fp16((max(x) - min(x)) / (2^b - 1))
    code  = clamp(round_half_even((x - zero) / scale), 0, 2^b - 1)     (0 where scale == 0)

then PER = 8 / gcd(8, b) consecutive codes packed little-endian into NBYTES = PER * b / 8 bytes
(4 codes per byte at 2 bits, 2 at 4, 1 at 8, 8 codes in 3 bytes at 3 bits).

One program quantizes one group of one row: it loads the group as a (GROUP / PER, PER) tile,
so each tile row is one packing chunk, reduces min and max, computes the codes, forms each
chunk's integer word = sum_i code_i << (i * b) and writes its NBYTES bytes. The group size must
be a multiple of PER (true for every group size the methods use); the torch path handles others.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def chunk_of(bits: int) -> tuple[int, int]:
    """(codes, bytes) in one packing chunk (as nanokv.quant)."""
    per = 8 // math.gcd(8, bits)
    return per, per * bits // 8


@triton.jit
def quantize_pack_kernel(X, PACKED, SCALE, ZERO, n, sx, sp, ss,
                         BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, NBYTES: tl.constexpr):
    row = tl.program_id(0)
    g = tl.program_id(1)  # which group of the row
    CH: tl.constexpr = GROUP // PER  # packing chunks in a group
    offs_c = tl.arange(0, CH)
    offs_i = tl.arange(0, PER)
    idx = g * GROUP + offs_c[:, None] * PER + offs_i[None, :]  # (CH, PER)
    x = tl.load(X + row * sx + idx).to(tl.float32)
    lo = tl.min(tl.min(x, axis=1), axis=0)
    hi = tl.max(tl.max(x, axis=1), axis=0)
    zero = lo.to(tl.float16)
    scale = ((hi - lo) / (2**BITS - 1)).to(tl.float16)
    z = zero.to(tl.float32)
    s = scale.to(tl.float32)
    safe = tl.where(s > 0, s, 1.0)
    y = (x - z) / safe
    r = tl.floor(y + 0.5)  # round half to even, as torch.round
    r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
    r = tl.minimum(tl.maximum(r, 0.0), 2**BITS - 1)
    code = tl.where(s > 0, r, 0.0).to(tl.int32)  # (CH, PER)
    word = tl.sum(code << (offs_i[None, :] * BITS), axis=1)  # (CH,) one chunk each
    base = PACKED + row * sp + (g * CH + offs_c) * NBYTES
    for j in tl.static_range(NBYTES):
        tl.store(base + j, ((word >> (8 * j)) & 0xFF).to(tl.uint8))
    tl.store(SCALE + row * ss + g, scale)
    tl.store(ZERO + row * ss + g, zero)


def quantize_pack(x: torch.Tensor, bits: int, group: int):
    """x (..., n) -> (packed uint8 (..., n * bits / 8), scale fp16 (..., n / group), zero fp16 (...))."""
    if bits not in (2, 3, 4, 8):  # fast/ stands alone: nanokv.quant validates the same way for users
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
    if group < 1 or x.shape[-1] % group:
        raise ValueError(f"group ({group}) must divide the quantized dimension ({x.shape[-1]})")
    per, nbytes = chunk_of(bits)
    if group % per:
        raise ValueError(f"the Triton quantizer needs group ({group}) to be a multiple of {per} at {bits} bits")
    if group & (group - 1):
        raise ValueError(f"the Triton quantizer needs a power-of-two group, got {group}")
    shape, n = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n).contiguous()
    R = rows.size(0)
    packed = torch.empty(R, n // per * nbytes, dtype=torch.uint8, device=x.device)
    scale = torch.empty(R, n // group, dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    if R:
        quantize_pack_kernel[(R, n // group)](rows, packed, scale, zero, n, rows.stride(0), packed.stride(0),
                                              scale.stride(0), BITS=bits, GROUP=group, PER=per, NBYTES=nbytes)
    return packed.reshape(*shape, -1), scale.reshape(*shape, -1), zero.reshape(*shape, -1)


def applies(bits: int, group: int) -> bool:
    """Whether quantize_pack takes this shape: a power-of-two group that is a multiple of the
    packing chunk at this width."""
    per, _ = chunk_of(bits)
    return group % per == 0 and group & (group - 1) == 0
