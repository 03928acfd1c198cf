"""
Asymmetric min-max round-to-nearest quantization in groups, with real bit packing.

For a group of values x (g consecutive channels of one token, "per-token", or g consecutive
tokens of one channel, "per-channel"):
    zero  = min(x)                          stored in fp16
    scale = (max(x) - min(x)) / (2^b - 1)   stored in fp16
    code  = clamp(round((x - zero) / scale), 0, 2^b - 1)      b in {2, 3, 4, 8}
    x_hat = code * scale + zero
Rounding rule: `torch.round`, i.e. round half to even. Codes are computed from the fp16
scale and zero that are stored, so dequantization error is at most scale/2 per element
(plus fp16 rounding of the zero point). A group whose values are all equal has scale 0:
its codes are 0 and x_hat = zero exactly (no division, no NaN).

Packing: codes of b bits are packed little-endian into bytes, several per byte: 4 per byte
at 2 bits, 2 at 4 bits, 1 at 8 bits, and 8 codes in 3 bytes at 3 bits (dense, no 4-bit
slots). A run of n codes takes ceil(n * b / 8) bytes (n is padded up to a whole chunk of
8 // gcd(8, b) codes).
"""

from __future__ import annotations

import math
import operator
import sys

import torch

BITS = (2, 3, 4, 8)


def as_int(name, value) -> int:
    """value as a Python int: ints, numpy integers and 0-d integer tensors are accepted; bools,
    floats (even 4.0), strings and anything else get a TypeError naming the argument. (Here, not
    in method.py, because quant.py imports nothing of nanokv: method.py and the stores import it.)"""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        return operator.index(value)
    except TypeError:  # e.g. a tensor with more than one element
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def check_bits(bits: int, name: str = "bits") -> int:
    """bits as a Python int in BITS (4.0, True or "4" are refused: a TypeError naming `name`)."""
    try:
        bits = as_int(name, bits)
    except TypeError:
        raise TypeError(f"{name} must be an int, one of {BITS}, got {type(bits).__name__} {bits!r}") from None
    if bits not in BITS:
        raise ValueError(f"{name} must be one of {BITS}, got {bits!r}")
    return bits


def check_group_saves(bits: int, group: int | None, name: str = "group") -> int | None:
    """A group of `group` values carries an fp16 scale and an fp16 zero: bits + 32 / group bits per
    value. Refuse groups so small that the codes hold 16 bits per value or more (as much as an
    fp16 cache, or more: rtn(group=1) would hold 36 bits per value). None passes (chosen later)."""
    if group is None:
        return None
    group = as_int(name, group)
    if group < 1:
        raise ValueError(f"{name} must be None or a positive int, got {group!r}")
    per_value = bits + 32 / group
    if per_value >= 16:
        raise ValueError(f"{name}={group} at {bits} bits stores {per_value:g} bits per value (codes + an fp16 "
                         f"scale and zero per group), no less than an fp16 cache; use {name} >= "
                         f"{math.floor(32 / (16 - bits)) + 1}")
    return group


def check_group(size: int, group: int, what: str = "head_dim"):
    if not isinstance(group, int) or group < 1 or size % group != 0:
        raise ValueError(f"group size {group!r} must be a positive divisor of {what} ({size})")


def quantize(x: torch.Tensor, bits: int, group: int):
    """Quantize groups of `group` consecutive entries along the last dim of x (..., n).
    Returns codes (..., n) uint8, scale (..., n // group) fp16, zero (..., n // group) fp16."""
    check_bits(bits)
    check_group(x.shape[-1], group, "the quantized dimension")
    xg = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)
    low, high = torch.aminmax(xg, dim=-1)
    zero = low.half()
    scale = ((high - low) / (2**bits - 1)).half()
    z, s = zero.float()[..., None], scale.float()[..., None]
    varies = s > 0  # a constant group has scale 0: code 0, no division by zero
    codes = torch.round((xg - z) / torch.where(varies, s, 1.0)).clamp_(0, 2**bits - 1)
    return codes.masked_fill_(~varies, 0).to(torch.uint8).reshape(x.shape), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32, out=None):
    """Inverse of quantize: codes (..., n), scale and zero (..., n // group) -> (..., n) in dtype.
    out: a tensor (a view is fine, e.g. a slice of a larger buffer) of that shape to write into
    instead of a new one (attention's concatenated keys: no copy after); its dtype wins."""
    n_groups = scale.shape[-1]
    grouped = (*codes.shape[:-1], n_groups, codes.shape[-1] // n_groups)
    s, z = scale.float()[..., None], zero.float()[..., None]
    if out is not None and out.dtype == torch.float32:  # code * scale + zero, computed in fp32 straight into out
        x = out.unflatten(-1, grouped[-2:])
        x.copy_(codes.reshape(grouped)).mul_(s).add_(z)  # exact: a uint8 code converts to fp32 exactly
        return out
    x = codes.float().reshape(grouped)  # a new tensor:
    x.mul_(s).add_(z)  # code * scale + zero, in place
    x = x.reshape(codes.shape).to(dtype)  # fp32 arithmetic, then the model's dtype (the same bits either way)
    return x if out is None else out.copy_(x)


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) in one packing chunk: the smallest whole number of bytes."""
    codes = 8 // math.gcd(8, bits)
    return codes, codes * bits // 8


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits take once packed."""
    codes, nbytes = _chunk(bits)
    return math.ceil(n / codes) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (..., n) uint8 (each < 2^bits) into (..., packed_bytes(n, bits)) uint8."""
    check_bits(bits)
    per, nbytes = _chunk(bits)
    n = codes.shape[-1]
    pad = (-n) % per
    if nbytes == 1 and pad == 0:  # 2, 4, 8 bits: OR the codes of each byte together in uint8
        c = codes.reshape(*codes.shape[:-1], n // per, per)
        out = c[..., 0].clone()
        for i in range(1, per):
            out |= c[..., i] << (bits * i)
        return out
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(*codes.shape[:-1], (n + pad) // per, per)
    shifts = torch.arange(per, device=codes.device) * bits
    word = (c << shifts).sum(dim=-1)  # (..., chunks) one integer of per*bits bits
    byte_shifts = torch.arange(nbytes, device=codes.device) * 8
    out = (word[..., None] >> byte_shifts) & 0xFF  # (..., chunks, nbytes)
    return out.to(torch.uint8).flatten(-2)


def _split_bytes(x: torch.Tensor, half: int) -> torch.Tensor:
    """(..., m) uint8 of values below 2^(2 * half) -> (..., 2m): each value's low `half` bits,
    then its next `half` bits. Done in 16-bit words so that every step reads and writes whole
    contiguous tensors (writing every other byte is several times slower): w | (w << (8 - half))
    puts the high part in the word's second byte, the mask clears the rest, and the words read
    as bytes (little-endian) are the two parts in order."""
    w = x.to(torch.int16, memory_format=torch.contiguous_format)  # whatever the strides of x
    w.bitwise_or_(w << (8 - half)).bitwise_and_((2**half - 1) * 0x0101)
    return w.view(torch.uint8)


def _four_codes(x: torch.Tensor) -> torch.Tensor:
    """(..., m) uint8 -> (..., 4m): the four 2-bit codes of every byte, in order (twice as fast as
    two _split_bytes). In 32-bit words, where a multiplication is an OR when the shifted copies do
    not overlap: w * 4097 = w | w << 12 (w < 2^8), masked with 0x000F000F, leaves the low nibble in
    bits 0-3 and the high one in bits 16-19; n * 65 = n | n << 6 copies each nibble's upper pair
    to the next byte; the mask 0x03030303 keeps one code per byte, which read as bytes
    (little-endian) are the four codes in order."""
    w = x.to(torch.int32, memory_format=torch.contiguous_format)
    w.mul_(4097).bitwise_and_(0x000F000F).mul_(65).bitwise_and_(0x03030303)
    return w.view(torch.uint8)


def _shift_out(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The 8 // bits codes of every byte (code i: bits [bits * i, bits * (i + 1))), shifted out
    in uint8 and stacked along a new dim `dim`."""
    return torch.stack([(packed >> (bits * i)) & (2**bits - 1) for i in range(8 // bits)], dim=dim)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack: (..., packed_bytes(n, bits)) uint8 -> codes (..., n) uint8 (at 8 bits a
    view of `packed` itself: do not write into it)."""
    check_bits(bits)
    per, nbytes = _chunk(bits)
    if bits == 2 and sys.byteorder == "little":
        return _four_codes(packed)[..., :n]
    if bits == 4 and sys.byteorder == "little":  # two codes in each byte: one split
        return _split_bytes(packed, 4)[..., :n]
    if bits == 8:
        return packed[..., :n]
    if nbytes == 1:  # a big-endian machine: shifted out one code at a time
        return _shift_out(packed, bits, dim=-1).flatten(-2)[..., :n]
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], packed.shape[-1] // nbytes, nbytes)
    word = (b << (torch.arange(nbytes, device=packed.device) * 8)).sum(dim=-1)
    shifts = torch.arange(per, device=packed.device) * bits
    codes = (word[..., None] >> shifts) & (2**bits - 1)
    return codes.flatten(-2)[..., :n].to(torch.uint8)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """unpack along the second-to-last dim: (..., packed_bytes(n, bits), D) uint8 -> codes
    (..., n, D) uint8. For codes packed along tokens, one row of D channels per byte row (KIVI's
    per-channel keys): each code comes out as a whole row, so every write is contiguous."""
    if _chunk(bits)[1] != 1:  # 3 bits: codes straddle bytes
        return unpack(packed.transpose(-1, -2), bits, n).transpose(-1, -2)
    codes = _shift_out(packed.contiguous(), bits, dim=-2)  # (..., bytes, per, D); one copy of the bytes first:
    return codes.flatten(-3, -2)[..., :n, :]  # a strided read per shift costs more; -> (..., n, D)


def quantize_packed(x: torch.Tensor, bits: int, group: int):
    """quantize + pack along the last dim: (packed uint8, scale fp16, zero fp16)."""
    codes, scale, zero = quantize(x, bits, group)
    return pack(codes, bits), scale, zero


def dequantize_packed(packed, scale, zero, bits: int, n: int, dtype=torch.float32, out=None):
    return dequantize(unpack(packed, bits, n), scale, zero, dtype, out)
