"""
Kernel 2: decode attention over mixed segments, low-bit tokens dequantized while loading and
full-precision tokens, with ONE softmax over both. Must match
nanokv.cache.reference_attention over the dequantized parts (RTN's, the Quantized wrapper's and
MiKV's low-bit tier with full-precision tokens; KIVI's per-channel keys and per-token values
with their full-precision residuals).

Token n of a head (0 <= n < L) is, for its key, low-bit when n < LQK (else K[n - LQK]) and, for
its value, low-bit when n < LQV (else V[n - LQV]): KIVI quantizes keys R at a time and values
first in first out, so the two split points differ. Codes of b bits are packed PER = 8/gcd(8, b)
to a chunk of NBYTES bytes, little-endian (nanokv/quant.py):

    word = sum over j < NBYTES of byte[chunk * NBYTES + j] << (8 j)
    code = (word >> (i * b)) & (2^b - 1)          i = index within the chunk
    x    = code * scale + zero

  per-token groups (values; keys of RTN and MiKV): codes (L, packed D), scale/zero (L, D / G);
      channel d of token n: chunk d // PER, i = d % PER, group d // G
  per-channel groups (KIVI's keys): G consecutive tokens of one channel share scale and zero;
      codes (C, D, packed G), scale/zero (C, D); token n, channel d: c = n // G, t = n % G,
      chunk t // PER, i = t % PER, scale[c, d]

The split-K structure is kernel 1's (fast/decode.py): each program takes a chunk of the L
tokens, writes (m, l, acc) partials and raw scores, and kernel 1's reduce merges them (and turns
scores into probabilities).
"""


from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .decode import launch_shape, online_softmax_step, partial_start, partial_store, reduce_partials
from .quant import chunk_of


@triton.jit
def _unpack(CODES, offs, mask, shift, BITS: tl.constexpr, NBYTES: tl.constexpr):
    """Codes at byte offsets `offs` (the first byte of each chunk), shifted by `shift` bits."""
    word = tl.zeros_like(offs)
    for j in tl.static_range(NBYTES):
        byte = tl.load(CODES + offs + j, mask=mask, other=0)
        word = word | (byte.to(tl.int32) << (8 * j))
    return (word >> shift) & ((1 << BITS) - 1)


@triton.jit
def _per_token_tile(CODES, SC, ZE, base_c, base_s, offs_n, offs_d, m2, sc_n, ss_n,
                    BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, NBYTES: tl.constexpr):
    """(BLOCK_N, BLOCK_D) fp32 values of tokens offs_n, channels offs_d, per-token groups."""
    offs = base_c + offs_n[:, None] * sc_n + ((offs_d // PER) * NBYTES)[None, :]
    code = _unpack(CODES, offs, m2, ((offs_d % PER) * BITS)[None, :], BITS, NBYTES)
    g = base_s + offs_n[:, None] * ss_n + (offs_d // GROUP)[None, :]
    scale = tl.load(SC + g, mask=m2, other=0.0).to(tl.float32)
    zero = tl.load(ZE + g, mask=m2, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def _per_channel_tile(CODES, SC, ZE, base_c, base_s, offs_n, offs_d, m2, sc_c, sc_d, ss_c, ss_d,
                      BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, NBYTES: tl.constexpr):
    """(BLOCK_N, BLOCK_D) fp32 values of tokens offs_n, channels offs_d, per-channel groups of
    GROUP tokens (KIVI's keys)."""
    c, t = offs_n // GROUP, offs_n % GROUP
    offs = base_c + c[:, None] * sc_c + offs_d[None, :] * sc_d + ((t // PER) * NBYTES)[:, None]
    code = _unpack(CODES, offs, m2, ((t % PER) * BITS)[:, None], BITS, NBYTES)
    g = base_s + c[:, None] * ss_c + offs_d[None, :] * ss_d
    scale = tl.load(SC + g, mask=m2, other=0.0).to(tl.float32)
    zero = tl.load(ZE + g, mask=m2, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def decode_quant_partial_kernel(Q, KC, KS, KZ, VC, VS, VZ, K, V, SCORES, M_PART, L_PART, ACC_PART,
                                H, L, LQK, LQV, D, scale, S,
                                sq_b, sq_h, skc_b, skc_h, skc_n, skc_d, sks_b, sks_h, sks_n, sks_d,
                                svc_b, svc_h, svc_n, svs_b, svs_h, svs_n,
                                sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                                BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr,
                                NBYTES: tl.constexpr, KEY_PER_CHANNEL: tl.constexpr, CHUNK: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_d, dmask, q, m, lsum, acc = partial_start(Q, b, h, sq_b, sq_h, D, scale, BLOCK_D)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        # keys: low-bit below LQK, full precision from LQK (masked loads: only one is read)
        kq_m = (nmask & (offs_n < LQK))[:, None] & dmask[None, :]
        kf_m = (nmask & (offs_n >= LQK))[:, None] & dmask[None, :]
        if KEY_PER_CHANNEL:
            k = _per_channel_tile(KC, KS, KZ, b * skc_b + h * skc_h, b * sks_b + h * sks_h, offs_n, offs_d, kq_m,
                                  skc_n, skc_d, sks_n, sks_d, BITS, GROUP, PER, NBYTES)
        else:
            k = _per_token_tile(KC, KS, KZ, b * skc_b + h * skc_h, b * sks_b + h * sks_h, offs_n, offs_d, kq_m,
                                skc_n, sks_n, BITS, GROUP, PER, NBYTES)
        k += tl.load(K + b * sk_b + h * sk_h + (offs_n - LQK)[:, None] * sk_n + offs_d[None, :], mask=kf_m,
                     other=0.0).to(tl.float32)
        score = tl.where(nmask, tl.sum(k * q[None, :], axis=1), float("-inf"))
        tl.store(SCORES + bh * L + offs_n, score, mask=nmask)
        vq_m = (nmask & (offs_n < LQV))[:, None] & dmask[None, :]
        vf_m = (nmask & (offs_n >= LQV))[:, None] & dmask[None, :]
        v = _per_token_tile(VC, VS, VZ, b * svc_b + h * svc_h, b * svs_b + h * svs_h, offs_n, offs_d, vq_m,
                            svc_n, svs_n, BITS, GROUP, PER, NBYTES)
        v += tl.load(V + b * sv_b + h * sv_h + (offs_n - LQV)[:, None] * sv_n + offs_d[None, :], mask=vf_m,
                     other=0.0).to(tl.float32)
        m, lsum, acc = online_softmax_step(score, v, m, lsum, acc)
    partial_store(M_PART, L_PART, ACC_PART, bh, s, S, m, lsum, acc, offs_d, BLOCK_D)


def decode_attention_quant(q, kq, vq, k, v, bits: int, group: int, key_layout: str = "token",
                           want_probs: bool = True, chunk: int | None = None, block_n: int | None = None):
    """q (B, H, 1, D). Keys: kq = (codes, scale, zero) of the low-bit keys, then k (B, H, LFK, D) in
    full precision; values likewise: vq, then v (B, H, LFV, D). key_layout "token": kq as
    nanokv.quant.quantize_packed makes them over D, codes (B, H, LQK, packed D), scale and zero
    (B, H, LQK, D / group); "channel" (KIVI): codes (B, H, C, D, packed group), scale and zero
    (B, H, C, D), LQK = C * group tokens. Values are per-token groups. Keys and values must cover
    the same L = LQK + LFK = LQV + LFV tokens. Returns out (B, H, 1, D) in q's dtype and probs
    (B, H, 1, L) fp32 in token order (low-bit tokens first)."""
    B, H, T, D = q.shape
    if T != 1:
        raise ValueError(f"decode_attention_quant takes one query per head, got T={T}")
    if key_layout not in ("token", "channel"):
        raise ValueError(f"key_layout must be 'token' or 'channel', got {key_layout!r}")
    per, nbytes = chunk_of(bits)
    by_token = lambda n: ((B, H, n, math.ceil(D / per) * nbytes), (B, H, n, D // group))  # noqa: E731
    LQV = vq[0].size(2)
    if key_layout == "token":
        LQK = kq[0].size(2)
        k_shapes = by_token(LQK)
    else:
        LQK = kq[0].size(2) * group
        k_shapes = ((B, H, kq[0].size(2), D, math.ceil(group / per) * nbytes), (B, H, kq[0].size(2), D))
    for name, (codes, sc, ze), (c_shape, s_shape) in (("kq", kq, k_shapes), ("vq", vq, by_token(LQV))):
        if codes.shape != c_shape or sc.shape != s_shape or ze.shape != sc.shape:
            raise ValueError(f"{name}: codes/scale/zero shapes {tuple(codes.shape)}, {tuple(sc.shape)}, "
                             f"{tuple(ze.shape)} do not fit {bits}-bit groups of {group} over D={D} "
                             f"({key_layout if name == 'kq' else 'token'} layout)")
    L = LQK + k.size(2)
    if k.shape != (B, H, L - LQK, D) or v.shape != (B, H, L - LQV, D):
        raise ValueError(f"keys and values must cover the same tokens with head dim {D}: {LQK} low-bit + "
                         f"k {tuple(k.shape)} against {LQV} low-bit + v {tuple(v.shape)}")
    if L == 0:
        raise ValueError("nothing to attend to: both segments are empty")
    chunk, block_n, block_d = launch_shape(L, D, chunk, block_n)
    S = triton.cdiv(L, chunk)
    dev = q.device
    scores = torch.empty(B * H, L, device=dev, dtype=torch.float32)
    m_part = torch.empty(B * H, S, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * H, S, block_d, device=dev, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=dev, dtype=q.dtype)
    kc, ks, kz = (t.contiguous() for t in kq)
    vc, vs, vz = (t.contiguous() for t in vq)
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    skc_d = kc.stride(3) if key_layout == "channel" else 0
    sks_d = ks.stride(3) if key_layout == "channel" else 0
    decode_quant_partial_kernel[(B * H, S)](
        q, kc, ks, kz, vc, vs, vz, k, v, scores, m_part, l_part, acc_part,
        H, L, LQK, LQV, D, 1.0 / math.sqrt(D), S,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), skc_d,
        ks.stride(0), ks.stride(1), ks.stride(2), sks_d,
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        BITS=bits, GROUP=group, PER=per, NBYTES=nbytes, KEY_PER_CHANNEL=key_layout == "channel",
        CHUNK=chunk, BLOCK_N=block_n, BLOCK_D=block_d)
    reduce_partials(m_part, l_part, acc_part, scores, out, L, D, S, block_d, want_probs)
    return out, scores.reshape(B, H, 1, L) if want_probs else None
