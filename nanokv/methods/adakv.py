"""
Ada-KV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation for Efficient LLM Inference", arXiv 2407.11550), over SnapKV's scores.

Rule: a layer's budget is shared by its heads. Instead of the top b tokens of every head,
take the top H * b' entries of all heads' SnapKV scores together (b' = budget - window), so a
head whose attention is concentrated keeps few tokens and a diffuse head keeps many. A
safeguard gives each head at least floor(alpha * b') of its own best tokens [alpha 0.2].
    guaranteed_h = head h's top floor(alpha * b') tokens
    rest         = the global top (H * b' - H * floor(alpha * b')) of all other entries of the layer
    head h keeps   guaranteed_h + its entries in rest + the window
So the head budgets sum to exactly H * budget per layer (per batch row) and each is at least
floor(alpha * b') + window. Global ties go to the more recent token, then the lower head.

The safeguard, as each implementation has it:
  - official code (FFY0/AdaKV): counts head h's share n_h of the global top H * b' past entries,
    then keeps round(n_h * (1 - alpha) + int(alpha * b')) past tokens plus the window; the floor
    is over past tokens, and the head budgets sum to H * b' only up to rounding;
  - kvpress (AdaKVPress): forces each head's top int(alpha * n_kept) entries, where n_kept counts
    the window too and the window already scores highest, so the window fills the floor first (a
    window of alpha * n_kept tokens or more leaves no floor for past tokens); exact totals;
  - here: each head's top floor(alpha * b') past tokens are forced (the official code's floor,
    over past tokens, window not counted), the rest of the H * b' past entries are filled
    globally (kvpress's forcing, so the totals are exact).
Storage: the heads really hold different numbers of tokens (nanokv/ragged.py: flat per-head
entries, no padding allocated).
Grouped-query models (nanokv.hf): the heads are key-value heads, scored as SnapKV (the mean of
a group's query heads), as kvpress's AdaKVPress and the Ada-KV GQA code do.
"""

import math

import torch

from ..method import _check_number
from .snapkv import SnapKV


class AdaKV(SnapKV):
    name = "adakv"

    def __init__(self, budget: int, window: int = 32, kernel: int = 7, pool: str = "max", alpha: float = 0.2):
        super().__init__(budget, window=window, kernel=kernel, pool=pool)
        _check_number("alpha", alpha, 0, 1)
        self.alpha = float(alpha)

    def select(self, layer, score):
        B, H, L = score.shape
        P = L - self.window  # prompt tokens before the window
        keep = torch.ones(B, H, L, dtype=torch.bool, device=score.device)  # the window is kept
        keep[:, :, :P] = headwise_topk(score[:, :, :P], self.budget - self.window, self.alpha)
        return keep


def headwise_topk(s, per_head: int, alpha: float):
    """Ada-KV's selection over the heads of a layer. s (B, H, P) scores -> (B, H, P) bool
    choosing H * per_head entries per batch row: each head's own top floor(alpha * per_head),
    then the best of all remaining entries of all heads. Ties: later position, then lower head."""
    B, H, P = s.shape
    floor = math.floor(alpha * per_head)
    s = s.float()
    order = P - 1 - torch.sort(s.flip(-1), dim=-1, descending=True, stable=True).indices
    guaranteed = torch.zeros_like(s, dtype=torch.bool)
    guaranteed.scatter_(-1, order[:, :, :floor], True)
    # flatten position-major, newest first, heads in order, so a stable sort breaks ties
    # by (later position, lower head)
    rest = s.masked_fill(guaranteed, float("-inf")).flip(-1).transpose(1, 2).reshape(B, P * H)
    top = torch.sort(rest, dim=-1, descending=True, stable=True).indices[:, : H * (per_head - floor)]
    picked = torch.zeros(B, P * H, dtype=torch.bool, device=s.device)
    picked.scatter_(-1, top, True)
    picked = picked.view(B, P, H).transpose(1, 2).flip(-1)  # back to (B, H, P)
    return guaranteed | picked
