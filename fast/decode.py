"""
Kernel 1: split-K decode attention (flash-decoding) over a ragged cache, returning each cached
token's attention probability as well. Must match nanokv.cache.reference_attention for one
query (T = 1): out = softmax(q k^T / sqrt(D)) v, probs = that softmax, 0 where not valid.

Why split: at decode there is one query per head, so a kernel with one program per head leaves
most of a GPU idle while one program streams the whole sequence. Split each head's L cached
tokens into S chunks of CHUNK tokens; program (bh, s) reads only its chunk and writes a partial
result in the log-sum-exp form

    s_j   = (q . k_j) / sqrt(D)                    (written to `scores`, for the probabilities)
    m_s   = max_j s_j                              over the chunk's valid tokens
    l_s   = sum_j exp(s_j - m_s)
    acc_s = sum_j exp(s_j - m_s) v_j               (D,)

and a second kernel merges the S partials of a head:

    M = max_s m_s,   Z = sum_s l_s exp(m_s - M),   out = sum_s acc_s exp(m_s - M) / Z

then, when probabilities are wanted, a third (one program per block of tokens) turns the
stored scores into p_j = exp(s_j - M) / Z in place. The extra traffic is 4 bytes written and read per token, against 2 * D * elem bytes of
keys and values: H2O, TOVA, Scissorhands, MiKV and EMS get their scores without a second,
eager attention pass. Invalid entries (heads shorter than the padded length, or masked by
`valid`) score -inf and get probability 0. A chunk with no valid token has m_s = -1e30 (finite,
so exp(m_s - M) = 0 and no NaN arises).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # "minus infinity" that stays finite in the exp/max arithmetic


@triton.jit
def online_softmax_step(score, v, m, lsum, acc):
    """Fold one tile into a running (max m, sum lsum, weighted values acc): score (BLOCK_N,)
    with -inf where not valid, v (BLOCK_N, BLOCK_D) fp32. Returns the new (m, lsum, acc)."""
    m_new = tl.maximum(m, tl.max(score, axis=0))
    alpha = tl.exp(m - m_new)  # rescales what was accumulated under the old max
    p = tl.exp(score - m_new)  # (BLOCK_N,), 0 where not valid
    acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
    lsum = lsum * alpha + tl.sum(p, axis=0)
    return m_new, lsum, acc


@triton.jit
def partial_start(Q, b, h, sq_b, sq_h, D, scale, BLOCK_D: tl.constexpr):
    """The scaled query of head (b, h) and an empty softmax state (m, l, acc) for one chunk."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + offs_d, mask=dmask, other=0.0).to(tl.float32) * scale  # (BLOCK_D,)
    return offs_d, dmask, q, tl.full((), NEG, tl.float32), tl.zeros((), tl.float32), tl.zeros((BLOCK_D,), tl.float32)


@triton.jit
def partial_store(M_PART, L_PART, ACC_PART, bh, s, S, m, lsum, acc, offs_d, BLOCK_D: tl.constexpr):
    """Write chunk s's partial (m, l, acc) for the reduce kernel."""
    tl.store(M_PART + bh * S + s, m)
    tl.store(L_PART + bh * S + s, lsum)
    tl.store(ACC_PART + (bh * S + s) * BLOCK_D + offs_d, acc)


@triton.jit
def decode_partial_kernel(Q, K, V, VALID, SCORES, M_PART, L_PART, ACC_PART,
                          H, L, D, scale, S,
                          sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                          HAS_VALID: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)  # which (batch, head)
    s = tl.program_id(1)  # which chunk of the sequence
    b, h = bh // H, bh % H
    offs_d, dmask, q, m, lsum, acc = partial_start(Q, b, h, sq_b, sq_h, D, scale, BLOCK_D)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        score = tl.sum(k * q[None, :], axis=1)  # (BLOCK_N,)
        ok = nmask
        if HAS_VALID:
            ok = ok & (tl.load(VALID + bh * L + offs_n, mask=nmask, other=0) != 0)
        score = tl.where(ok, score, float("-inf"))
        tl.store(SCORES + bh * L + offs_n, score, mask=nmask)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        m, lsum, acc = online_softmax_step(score, v, m, lsum, acc)
    partial_store(M_PART, L_PART, ACC_PART, bh, s, S, m, lsum, acc, offs_d, BLOCK_D)


@triton.jit
def decode_reduce_kernel(M_PART, L_PART, ACC_PART, MZ, OUT, D, S,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < S
    m = tl.load(M_PART + bh * S + offs_s, mask=smask, other=NEG)  # (BLOCK_S,)
    lsum = tl.load(L_PART + bh * S + offs_s, mask=smask, other=0.0)
    big_m = tl.max(m, axis=0)
    w = tl.exp(m - big_m)  # (BLOCK_S,) weight of each partial
    z = tl.sum(lsum * w, axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(ACC_PART + (bh * S + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
                  mask=smask[:, None], other=0.0)  # (BLOCK_S, BLOCK_D)
    out = tl.sum(acc * w[:, None], axis=0) / z
    tl.store(OUT + bh * D + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < D)
    tl.store(MZ + bh * 2, big_m)
    tl.store(MZ + bh * 2 + 1, z)


@triton.jit
def probs_kernel(SCORES, MZ, L, BLOCK_P: tl.constexpr):
    """p_j = exp(s_j - M) / Z in place, one block of tokens of one head per program."""
    bh = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < L
    big_m = tl.load(MZ + bh * 2)
    z = tl.load(MZ + bh * 2 + 1)
    score = tl.load(SCORES + bh * L + offs, mask=mask, other=float("-inf"))
    tl.store(SCORES + bh * L + offs, tl.exp(score - big_m) / z, mask=mask)


def reduce_partials(m_part, l_part, acc_part, scores, out, L, D, S, block_d, want_probs):
    """Merge the S partials of every head into `out`; turn `scores` into probabilities if asked."""
    BH = m_part.size(0)
    mz = torch.empty(BH, 2, device=m_part.device, dtype=torch.float32)
    decode_reduce_kernel[(BH,)](m_part, l_part, acc_part, mz, out, D, S,
                                BLOCK_S=triton.next_power_of_2(S), BLOCK_D=block_d)
    if want_probs:
        probs_kernel[(BH, triton.cdiv(L, 1024))](scores, mz, L, BLOCK_P=1024)


# tokens per inner step at most; the tests lower it to 16 so that short caches span several chunks
MAX_BLOCK_N = 64


def launch_shape(L: int, D: int, chunk: int | None = None, block_n: int | None = None):
    """Block sizes: BLOCK_D covers the head dim, BLOCK_N tokens per step, CHUNK tokens per program."""
    block_d = triton.next_power_of_2(D)
    block_n = block_n or max(16, min(MAX_BLOCK_N, 4096 // block_d))
    chunk = chunk or max(block_n, triton.next_power_of_2(max(1, L // 16)))  # about 16 chunks per head
    chunk = math.ceil(chunk / block_n) * block_n
    return chunk, block_n, block_d


def decode_attention(q, k, v, valid=None, want_probs: bool = True, chunk: int | None = None,
                     block_n: int | None = None):
    """q (B, H, 1, D); k, v (B, H, L, D) (last dim contiguous); valid (B, H, L) bool or None.
    Returns out (B, H, 1, D) in q's dtype and probs (B, H, 1, L) fp32 (None if not wanted)."""
    B, H, T, D = q.shape
    L = k.size(2)
    if T != 1:
        raise ValueError(f"decode_attention takes one query per head, got T={T}")
    if k.shape != (B, H, L, D) or v.shape != (B, H, L, D):
        raise ValueError(f"k, v must be (B, H, L, D) = {(B, H, L, D)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # any (B, H, L) strides
    chunk, block_n, block_d = launch_shape(L, D, chunk, block_n)
    S = triton.cdiv(L, chunk)
    dev = q.device
    scores = torch.empty(B * H, L, device=dev, dtype=torch.float32)
    m_part = torch.empty(B * H, S, device=dev, dtype=torch.float32)
    l_part = torch.empty(B * H, S, device=dev, dtype=torch.float32)
    acc_part = torch.empty(B * H, S, block_d, device=dev, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=dev, dtype=q.dtype)
    valid_i8 = valid.reshape(B * H, L).to(torch.int8).contiguous() if valid is not None else scores  # dummy
    decode_partial_kernel[(B * H, S)](
        q, k, v, valid_i8, scores, m_part, l_part, acc_part, H, L, D, 1.0 / math.sqrt(D), S,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HAS_VALID=valid is not None, CHUNK=chunk, BLOCK_N=block_n, BLOCK_D=block_d)
    reduce_partials(m_part, l_part, acc_part, scores, out, L, D, S, block_d, want_probs)
    probs = scores.reshape(B, H, 1, L) if want_probs else None
    return out, probs
