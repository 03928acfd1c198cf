"""
PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069).

Rule: SnapKV's scoring and selection, but lower layers (whose attention is spread widely)
get larger budgets than upper layers (whose attention concentrates on few tokens). Budgets
form an arithmetic sequence over layers, largest at the bottom, with mean `budget`:
    past  = budget - window                       (tokens chosen by score, per head)
    lo    = past / beta,   hi = 2 * past - lo     (steepness beta [20])
    if hi > L - window:  hi = L - window,  lo = 2 * past - hi     (L = prompt length: the bottom
                                      layer cannot keep more than the prompt; the rest moves up)
    b_l   = window + hi - l * (hi - lo) / (n_layer - 1)        l = 0 .. n_layer - 1
As in the official code (KVCache-Factory, pyramidkv_utils.py), a prompt no longer than `budget` is
not compressed, and a prompt shorter than 2 * past gets SnapKV's uniform `budget` in every layer.
Choice: the official code computes lo with integer division and floors the step
(hi - lo) // (n_layer - 1), so its budgets drift above the mean (e.g. budget 64, window 16,
4 layers, a long prompt: 260 tokens per head over the layers, not 256); here the b_l are exact
fractions rounded by largest remainder (ties to lower layers), so they sum to exactly
n_layer * budget. Every b_l must hold the window.
Grouped-query models (nanokv.hf): scores as SnapKV's, from the mean of a group's query heads.
"""

import math

from ..method import _check_number
from .snapkv import SnapKV


def pyramid_budgets(budget: int, window: int, n_layer: int, beta: float, prompt_len: int | None = None) -> list[int]:
    """Per-layer budgets (window included) for a prompt of prompt_len tokens (None: a long prompt)."""
    past = budget - window
    if n_layer == 1 or (prompt_len is not None and prompt_len < 2 * past):
        return [budget] * n_layer  # the official code's SnapKV fallback for short prompts
    lo = past / beta
    hi = 2 * past - lo
    if prompt_len is not None and hi > prompt_len - window:  # cap the bottom layer at the prompt
        hi = prompt_len - window
        lo = 2 * past - hi
    exact = [window + hi - layer * (hi - lo) / (n_layer - 1) for layer in range(n_layer)]
    out = [math.floor(x) for x in exact]
    short = n_layer * budget - sum(out)
    by_remainder = sorted(range(n_layer), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[:short]:
        out[i] += 1
    return out


class PyramidKV(SnapKV):
    name = "pyramidkv"

    def __init__(self, budget: int, window: int = 32, kernel: int = 7, pool: str = "max", beta: float = 20.0):
        super().__init__(budget, window=window, kernel=kernel, pool=pool)
        _check_number("beta", beta, 1)
        self.beta = float(beta)
        self.n_layer = None  # set from the model config

    def check_config(self, config):
        self.n_layer = config.n_layer
        steepest = pyramid_budgets(self.budget, self.window, config.n_layer, self.beta)  # a long prompt
        if min(steepest) < max(self.window, 1):
            raise ValueError(
                f"the top layer's budget ({min(steepest)}) is below window ({self.window}); "
                "use a smaller window or beta, or a larger budget"
            )

    def layer_budget(self, layer_idx: int, prompt_len: int | None = None) -> int:
        return pyramid_budgets(self.budget, self.window, self.n_layer, self.beta, prompt_len)[layer_idx]
