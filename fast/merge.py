"""
Kernel 5: the nearest class center of every token, for the merging methods, without an L x L
similarity matrix. Must match nanokv.method.nearest_center (the torch reference):

    sim[t, c] = cos(k_t, k_c)                                   (D2O: keys only)
    sim[t, c] = max(cos(k_t, k_c), 0) * max(cos(v_t, v_c), 0)   (EMS; nonneg=False: no clamps)
    best[t], center[t] = max and argmax of sim[t, c] over the centers c (lowest slot on ties)

for the rows t a method asks about (EMS: its merge candidates; D2O: the evicted tokens). The
reference builds sim as a (B, H, L, L) fp32 matrix (at a 32-head 8k prefill, 8 GB per matrix);
here one program per (head, block of BLOCK_T rows) walks the centers in blocks of BLOCK_C,
computes that tile of cosines with tl.dot on unit vectors, and keeps a running max and argmax:
O(L) memory. A row block with no asked row returns at once, so D2O's decode step (one evicted
token per head) costs one tile row, not L^2. Rows not asked about get best = -inf, center = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def nearest_center_kernel(KN, VN, ROWS, CENTERS, BEST, CENTER, L, D,
                          USE_V: tl.constexpr, NONNEG: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    tmask, dmask = offs_t < L, offs_d < D
    asked = (tl.load(ROWS + bh * L + offs_t, mask=tmask, other=0) != 0) & tmask
    best = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_T,), tl.int32)
    if tl.max(asked.to(tl.int32), axis=0) > 0:  # else: nothing asked in this block
        base = bh * L * D
        tile = tmask[:, None] & dmask[None, :]
        kt = tl.load(KN + base + offs_t[:, None] * D + offs_d[None, :], mask=tile, other=0.0)  # (BLOCK_T, BLOCK_D)
        if USE_V:
            vt = tl.load(VN + base + offs_t[:, None] * D + offs_d[None, :], mask=tile, other=0.0)
        for start in range(0, L, BLOCK_C):
            offs_c = start + tl.arange(0, BLOCK_C)
            cmask = offs_c < L
            is_center = (tl.load(CENTERS + bh * L + offs_c, mask=cmask, other=0) != 0) & cmask
            ctile = cmask[:, None] & dmask[None, :]
            kc = tl.load(KN + base + offs_c[:, None] * D + offs_d[None, :], mask=ctile, other=0.0)
            sim = tl.dot(kt, tl.trans(kc), input_precision="ieee")  # (BLOCK_T, BLOCK_C) cosines of keys
            if USE_V:
                vc = tl.load(VN + base + offs_c[:, None] * D + offs_d[None, :], mask=ctile, other=0.0)
                cv = tl.dot(vt, tl.trans(vc), input_precision="ieee")
                if NONNEG:
                    sim = tl.maximum(sim, 0.0) * tl.maximum(cv, 0.0)
                else:
                    sim = sim * cv
            sim = tl.where(is_center[None, :], sim, float("-inf"))
            blk_best = tl.max(sim, axis=1)  # (BLOCK_T,)
            # the lowest slot holding the block's max (a plain argmax may pick any of equal values)
            blk_arg = tl.min(tl.where(sim == blk_best[:, None], offs_c[None, :], 2147483647), axis=1)
            better = blk_best > best  # strictly: an earlier block keeps its (lower) slot on a tie
            arg = tl.where(better, blk_arg, arg)
            best = tl.where(better, blk_best, best)
    tl.store(BEST + bh * L + offs_t, tl.where(asked, best, float("-inf")), mask=tmask)
    tl.store(CENTER + bh * L + offs_t, tl.where(asked, arg, 0), mask=tmask)


def nearest_center(k, v, centers, rows, nonneg: bool = True, block_t: int = 32, block_c: int = 32):
    """k (B, H, L, D); v the same or None (keys only, D2O); centers, rows (B, H, L) bool.
    Returns best (B, H, L) fp32 and center (B, H, L) long: for every asked row, the max over
    centers of the similarity above and its slot (lowest on ties); -inf and 0 elsewhere (also
    where a head has no center)."""
    B, H, L, D = k.shape
    if centers.shape != (B, H, L) or rows.shape != (B, H, L):
        raise ValueError(f"centers and rows must be (B, H, L) = {(B, H, L)}, got {tuple(centers.shape)}, "
                         f"{tuple(rows.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    kn = F.normalize(k.float(), dim=-1).contiguous()  # unit vectors, as the reference normalizes
    vn = F.normalize(v.float(), dim=-1).contiguous() if v is not None else kn
    r8 = rows.to(torch.int8).contiguous()
    c8 = centers.to(torch.int8).contiguous()
    best = torch.empty(B, H, L, device=k.device, dtype=torch.float32)
    arg = torch.empty(B, H, L, device=k.device, dtype=torch.int32)
    if L:
        nearest_center_kernel[(B * H, triton.cdiv(L, block_t))](
            kn, vn, r8, c8, best, arg, L, D, USE_V=v is not None, NONNEG=nonneg,
            BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return best, arg.long()
