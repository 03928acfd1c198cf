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

Heads of different lengths (Ada-KV's ragged layout) are read where they are held, without a
padded copy: `decode_attention_varlen` takes the flat (rows, D) store, each key-value head's first
row and length (VARLEN: program (bh, s) offsets its loads by its head's first row and stops at its
length; scores past it stay -inf), and lets G query heads read one key-value head (no copy).
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
def decode_partial_kernel(Q, K, V, VALID, SCORES, M_PART, L_PART, ACC_PART, STARTS, LENS, G,
                          H, L, D, scale, S,
                          sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                          HAS_VALID: tl.constexpr, VARLEN: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)  # which (batch, head)
    s = tl.program_id(1)  # which chunk of the sequence
    b, h = bh // H, bh % H
    offs_d, dmask, q, m, lsum, acc = partial_start(Q, b, h, sq_b, sq_h, D, scale, BLOCK_D)
    if VARLEN:  # K, V flat (rows, D): query head bh reads key-value head bh // G, rows start .. start + n - 1
        k_base = tl.load(STARTS + bh // G) * sk_n
        v_base = tl.load(STARTS + bh // G) * sv_n
        n = tl.load(LENS + bh // G).to(tl.int32)
    else:
        k_base, v_base, n = b * sk_b + h * sk_h, b * sv_b + h * sv_h, L
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, n)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        k = tl.load(K + k_base + offs_n[:, None] * sk_n + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        score = tl.sum(k * q[None, :], axis=1)  # (BLOCK_N,)
        ok = nmask
        if HAS_VALID:
            ok = ok & (tl.load(VALID + bh * L + offs_n, mask=nmask, other=0) != 0)
        score = tl.where(ok, score, float("-inf"))
        tl.store(SCORES + bh * L + offs_n, score, mask=nmask)
        v = tl.load(V + v_base + offs_n[:, None] * sv_n + offs_d[None, :],
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
        q, k, v, valid_i8, scores, m_part, l_part, acc_part, scores, scores, 1, H, L, D, 1.0 / math.sqrt(D), S,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HAS_VALID=valid is not None, VARLEN=False, CHUNK=chunk, BLOCK_N=block_n, BLOCK_D=block_d)
    reduce_partials(m_part, l_part, acc_part, scores, out, L, D, S, block_d, want_probs)
    probs = scores.reshape(B, H, 1, L) if want_probs else None
    return out, probs


def decode_attention_varlen(q, k, v, starts, lengths, max_len: int | None = None, want_probs: bool = True,
                            chunk: int | None = None, block_n: int | None = None):
    """The same attention over heads of different lengths held flat, without padding them:
    q (B, Hq, 1, D); k, v (rows, D), key-value head i (of B * H, row-major) owning rows
    starts[i] .. starts[i] + lengths[i] - 1 (rows after them are ignored: spare rows); Hq a
    multiple of H (grouped-query: query head h reads key-value head h // (Hq / H), no copy).
    Every head must hold at least one entry. max_len: the longest head (computed when None).
    Returns out (B, Hq, 1, D) and probs (B, Hq, 1, Lmax) fp32, 0 past each head's length."""
    B, Hq, T, D = q.shape
    if T != 1:
        raise ValueError(f"decode_attention_varlen takes one query per head, got T={T}")
    n = starts.numel()
    if starts.shape != lengths.shape or starts.dim() != 1 or n == 0 or n % B or Hq % (n // B):
        raise ValueError(f"starts and lengths must be (B * H,) = ({B} * H,) with H dividing {Hq} query heads, "
                         f"got {tuple(starts.shape)} and {tuple(lengths.shape)}")
    if k.dim() != 2 or k.shape != v.shape or k.size(1) != D:
        raise ValueError(f"k, v must be (rows, {D}), got {tuple(k.shape)}, {tuple(v.shape)}")
    G = B * Hq // n
    L = int(lengths.max()) if max_len is None else max_len
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    chunk, block_n, block_d = launch_shape(L, D, chunk, block_n)
    S = triton.cdiv(L, chunk)
    dev = q.device
    scores = torch.full((B * Hq, L), float("-inf"), device=dev, dtype=torch.float32) if want_probs else \
        torch.empty(B * Hq, L, device=dev, dtype=torch.float32)  # -inf past a head's end (read only for probs)
    m_part = torch.empty(B * Hq, S, device=dev, dtype=torch.float32)
    l_part = torch.empty(B * Hq, S, device=dev, dtype=torch.float32)
    acc_part = torch.empty(B * Hq, S, block_d, device=dev, dtype=torch.float32)
    out = torch.empty(B, Hq, 1, D, device=dev, dtype=q.dtype)
    decode_partial_kernel[(B * Hq, S)](
        q, k, v, scores, scores, m_part, l_part, acc_part, starts.to(torch.int64).contiguous(),
        lengths.to(torch.int64).contiguous(), G, Hq, L, D, 1.0 / math.sqrt(D), S,
        q.stride(0), q.stride(1), 0, 0, k.stride(0), 0, 0, v.stride(0),
        HAS_VALID=False, VARLEN=True, CHUNK=chunk, BLOCK_N=block_n, BLOCK_D=block_d)
    reduce_partials(m_part, l_part, acc_part, scores, out, L, D, S, block_d, want_probs)
    return out, (scores.reshape(B, Hq, 1, L) if want_probs else None)
