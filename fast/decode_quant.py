"""
Kernel 2: decode attention over mixed segments, a low-bit segment dequantized while loading and
a full-precision segment, with ONE softmax over both. Must match
nanokv.cache.reference_attention over [dequantized low-bit part, full-precision part]
(the parts RTN, MiKV's low tier and the Quantized wrapper hand to attention).

Low-bit layout (nanokv/quant.py, per-token groups): for each token, its D channels are split in
groups of G; each group has an fp16 scale and zero; codes of b bits are packed PER = 8/gcd(8, b)
to a chunk of NBYTES bytes, little-endian. Channel d of a token is code i = d % PER of chunk
c = d // PER:

    word = sum over j < NBYTES of byte[c * NBYTES + j] << (8 j)
    code = (word >> (i * b)) & (2^b - 1)
    x    = code * scale[d // G] + zero[d // G]

The split-K structure is kernel 1's (fast/decode.py): programs 0..S_q-1 take chunks of the
low-bit segment, programs S_q.. take chunks of the full-precision one; all write the same
(m, l, acc) partials, and kernel 1's reduce merges them (and turns scores into probabilities).
Keys and values both low-bit here (per-token groups); KIVI's per-channel keys are not covered
(its keys are dequantized by torch and go through kernel 1).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .decode import NEG, launch_shape, online_softmax_step, reduce_partials
from .quant import chunk_of


@triton.jit
def _dequant_tile(CODES, SC, ZE, base_c, base_s, offs_n, offs_d, nmask, dmask, sc_n, ss_n,
                  BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, NBYTES: tl.constexpr):
    """(BLOCK_N, BLOCK_D) fp32 values of tokens offs_n, channels offs_d."""
    m2 = nmask[:, None] & dmask[None, :]
    chunk = offs_d // PER
    word = tl.zeros_like(offs_n[:, None] + offs_d[None, :])  # (BLOCK_N, BLOCK_D) int32
    for j in tl.static_range(NBYTES):
        byte = tl.load(CODES + base_c + offs_n[:, None] * sc_n + (chunk * NBYTES + j)[None, :], mask=m2, other=0)
        word = word | (byte.to(tl.int32) << (8 * j))
    code = (word >> ((offs_d % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
    g = (offs_d // GROUP)[None, :]
    scale = tl.load(SC + base_s + offs_n[:, None] * ss_n + g, mask=m2, other=0.0).to(tl.float32)
    zero = tl.load(ZE + base_s + offs_n[:, None] * ss_n + g, mask=m2, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def decode_quant_partial_kernel(Q, KC, KS, KZ, VC, VS, VZ, K, V, SCORES, M_PART, L_PART, ACC_PART,
                                H, LQ, LF, D, scale, S, SQ,
                                sq_b, sq_h, skc_b, skc_h, skc_n, sks_b, sks_h, sks_n,
                                svc_b, svc_h, svc_n, svs_b, svs_h, svs_n,
                                sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                                BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr,
                                NBYTES: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b, h = bh // H, bh % H
    L = LQ + LF
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + offs_d, mask=dmask, other=0.0).to(tl.float32) * scale
    m = tl.full((), NEG, tl.float32)
    lsum = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    if s < SQ:  # a chunk of the low-bit segment: tokens [lo, hi) of it, scores at [lo, hi)
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, LQ)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            k = _dequant_tile(KC, KS, KZ, b * skc_b + h * skc_h, b * sks_b + h * sks_h, offs_n, offs_d,
                              nmask, dmask, skc_n, sks_n, BITS, GROUP, PER, NBYTES)
            score = tl.where(nmask, tl.sum(k * q[None, :], axis=1), float("-inf"))
            tl.store(SCORES + bh * L + offs_n, score, mask=nmask)
            v = _dequant_tile(VC, VS, VZ, b * svc_b + h * svc_h, b * svs_b + h * svs_h, offs_n, offs_d,
                              nmask, dmask, svc_n, svs_n, BITS, GROUP, PER, NBYTES)
            m, lsum, acc = online_softmax_step(score, v, m, lsum, acc)
    else:  # a chunk of the full-precision segment, scores after the low-bit ones
        lo = (s - SQ) * CHUNK
        hi = tl.minimum(lo + CHUNK, LF)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            m2 = nmask[:, None] & dmask[None, :]
            k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=m2,
                        other=0.0).to(tl.float32)
            score = tl.where(nmask, tl.sum(k * q[None, :], axis=1), float("-inf"))
            tl.store(SCORES + bh * L + LQ + offs_n, score, mask=nmask)
            v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=m2,
                        other=0.0).to(tl.float32)
            m, lsum, acc = online_softmax_step(score, v, m, lsum, acc)
    tl.store(M_PART + bh * S + s, m)
    tl.store(L_PART + bh * S + s, lsum)
    tl.store(ACC_PART + (bh * S + s) * BLOCK_D + offs_d, acc)


def decode_attention_quant(q, kq, vq, k, v, bits: int, group: int, want_probs: bool = True,
                           chunk: int | None = None, block_n: int | None = None):
    """q (B, H, 1, D); kq, vq: (codes (B, H, LQ, packed), scale (B, H, LQ, D/group), zero (same))
    as nanokv.quant.quantize_packed makes them; k, v (B, H, LF, D) full precision (LF may be 0).
    Returns out (B, H, 1, D) in q's dtype and probs (B, H, 1, LQ + LF) fp32, low-bit tokens first."""
    B, H, T, D = q.shape
    if T != 1:
        raise ValueError(f"decode_attention_quant takes one query per head, got T={T}")
    per, nbytes = chunk_of(bits)
    LQ, LF = kq[0].size(2), k.size(2)
    for name, (codes, sc, ze) in (("kq", kq), ("vq", vq)):
        if codes.shape != (B, H, LQ, math.ceil(D / per) * nbytes) or sc.shape != (B, H, LQ, D // group) \
                or ze.shape != sc.shape:
            raise ValueError(f"{name}: codes/scale/zero shapes {tuple(codes.shape)}, {tuple(sc.shape)}, "
                             f"{tuple(ze.shape)} do not fit {bits}-bit groups of {group} over D={D}")
    if k.shape != (B, H, LF, D) or v.shape != (B, H, LF, D):
        raise ValueError(f"k, v must be (B, H, LF, D), got {tuple(k.shape)}, {tuple(v.shape)}")
    if LQ + LF == 0:
        raise ValueError("nothing to attend to: both segments are empty")
    chunk, block_n, block_d = launch_shape(LQ + LF, D, chunk, block_n)
    SQ, SF = triton.cdiv(LQ, chunk), triton.cdiv(LF, chunk)
    S, L = SQ + SF, LQ + LF
    dev = q.device
    scores = torch.empty(B * H, L, device=dev, dtype=torch.float32)
    m_part = torch.empty(B * H, S, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * H, S, block_d, device=dev, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=dev, dtype=q.dtype)
    kc, ks, kz = (t.contiguous() for t in kq)
    vc, vs, vz = (t.contiguous() for t in vq)
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    decode_quant_partial_kernel[(B * H, S)](
        q, kc, ks, kz, vc, vs, vz, k, v, scores, m_part, l_part, acc_part,
        H, LQ, LF, D, 1.0 / math.sqrt(D), S, SQ,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        BITS=bits, GROUP=group, PER=per, NBYTES=nbytes, CHUNK=chunk, BLOCK_N=block_n, BLOCK_D=block_d)
    reduce_partials(m_part, l_part, acc_part, scores, out, L, D, S, block_d, want_probs)
    return out, scores.reshape(B, H, 1, L) if want_probs else None
