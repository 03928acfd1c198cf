"""
Kernel 3: prefill attention (flash-attention style) that also returns, per key, the sum of its
attention probabilities over all queries (H2O's accumulated score, EMS's global score) and over
the last `window` queries (SnapKV's and EMS's local score), without materializing T x L.
Must match nanokv.cache.reference_attention (causal by original position, `valid` mask):
    out = probs @ v,  colsum[j] = sum_t probs[t, j],  colsum_win[j] = sum_{t >= T - window} probs[t, j]

Pass 1, one program per (head, block of BLOCK_M queries): the usual online softmax over key
blocks, keeping for each query its running max m and sum l; it writes out and the log-sum-exp
lse = m + log(l). Pass 2, one program per (head, block of BLOCK_N keys): for every query block
it recomputes the scores s = q k^T / sqrt(D), turns them into probabilities with the stored
lse, p = exp(s - lse) (0 where masked), and sums them over the queries. Pass 2 redoes the
q k^T products (twice the FLOPs of a plain prefill) instead of storing a T x L matrix.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def prefill_forward_kernel(Q, K, V, QPOS, KPOS, VALID, OUT, LSE, H, T, L, D, scale,
                           sq_b, sq_h, sq_t, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_t,
                           HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask, dmask = offs_m < T, offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale  # (BLOCK_M, BLOCK_D)
    qpos = tl.load(QPOS + offs_m, mask=mmask, other=-1)
    m = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    lsum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < L
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        kpos = tl.load(KPOS + bh * L + offs_n, mask=nmask, other=2147483647)
        ok = (kpos[None, :] <= qpos[:, None]) & nmask[None, :] & mmask[:, None]
        if HAS_VALID:
            ok = ok & (tl.load(VALID + bh * L + offs_n, mask=nmask, other=0) != 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        lsum = lsum * alpha + tl.sum(p, axis=1)
        m = m_new
    lsum = tl.where(lsum > 0, lsum, 1.0)  # a padded query row (outside T) sees nothing
    out = acc / lsum[:, None]
    tl.store(OUT + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + bh * T + offs_m, m + tl.log(lsum), mask=mmask)


@triton.jit
def prefill_colsum_kernel(Q, K, QPOS, KPOS, VALID, LSE, COLSUM, COLWIN, ROWS, H, T, L, D, scale, W,
                          sq_b, sq_h, sq_t, sk_b, sk_h, sk_n,
                          HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask, dmask = offs_n < L, offs_d < D
    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
    kpos = tl.load(KPOS + bh * L + offs_n, mask=nmask, other=2147483647)
    ok_n = nmask
    if HAS_VALID:
        ok_n = ok_n & (tl.load(VALID + bh * L + offs_n, mask=nmask, other=0) != 0)
    total = tl.zeros((BLOCK_N,), tl.float32)
    window = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, T, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mmask = offs_m < T
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
        qpos = tl.load(QPOS + offs_m, mask=mmask, other=-1)
        lse = tl.load(LSE + bh * T + offs_m, mask=mmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        ok = (kpos[None, :] <= qpos[:, None]) & ok_n[None, :] & mmask[:, None]
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        total += tl.sum(p, axis=0)
        in_win = offs_m >= T - W  # (BLOCK_M,) the last W queries: their rows are also written out
        window += tl.sum(tl.where(in_win[:, None], p, 0.0), axis=0)
        tl.store(ROWS + (bh * W + (offs_m - (T - W)))[:, None] * L + offs_n[None, :], p,
                 mask=(in_win & mmask)[:, None] & nmask[None, :])
    tl.store(COLSUM + bh * L + offs_n, total, mask=nmask)
    tl.store(COLWIN + bh * L + offs_n, window, mask=nmask)


def prefill_attention(q, k, v, q_pos, k_pos, valid=None, window: int = 0,
                      block_m: int = 32, block_n: int = 32):
    """q (B, H, T, D); k, v (B, H, L, D); q_pos (T,); k_pos (B, H, L); valid (B, H, L) bool or None.
    Returns out (B, H, T, D) in q's dtype, colsum (B, H, L) fp32 (probabilities summed over all
    queries), colsum_win (B, H, L) fp32 (over the last `window` queries) and rows (B, H, window, L)
    fp32 (the probabilities of the last `window` queries)."""
    B, H, T, D = q.shape
    L = k.size(2)
    if k.shape != (B, H, L, D) or v.shape != (B, H, L, D):
        raise ValueError(f"k, v must be (B, H, L, D) = {(B, H, L, D)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if q_pos.shape != (T,) or k_pos.shape != (B, H, L):
        raise ValueError(f"q_pos must be (T,) = ({T},) and k_pos (B, H, L); got {tuple(q_pos.shape)}, "
                         f"{tuple(k_pos.shape)}")
    if not 0 <= window <= T:
        raise ValueError(f"window must be in [0, T={T}], got {window}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_d = max(16, triton.next_power_of_2(D))
    dev = q.device
    qp = q_pos.to(torch.int32).contiguous()
    kp = k_pos.to(torch.int32).reshape(B * H, L).contiguous()
    va = valid.reshape(B * H, L).to(torch.int8).contiguous() if valid is not None else kp
    out = torch.empty(B, H, T, D, device=dev, dtype=q.dtype)
    lse = torch.empty(B * H, T, device=dev, dtype=torch.float32)
    colsum = torch.empty(B * H, L, device=dev, dtype=torch.float32)
    colwin = torch.empty_like(colsum)
    rows = torch.empty(B * H, window, L, device=dev, dtype=torch.float32)
    scale = 1.0 / math.sqrt(D)
    prefill_forward_kernel[(B * H, triton.cdiv(T, block_m))](
        q, k, v, qp, kp, va, out, lse, H, T, L, D, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HAS_VALID=valid is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    prefill_colsum_kernel[(B * H, triton.cdiv(L, block_n))](
        q, k, qp, kp, va, lse, colsum, colwin, rows, H, T, L, D, scale, window,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        HAS_VALID=valid is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return out, colsum.reshape(B, H, L), colwin.reshape(B, H, L), rows.reshape(B, H, window, L)
