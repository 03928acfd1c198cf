"""
PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069).

Rule: SnapKV's scoring and selection, but lower layers (whose attention is spread widely)
get larger budgets than upper layers (whose attention concentrates on few tokens). Budgets
form an arithmetic sequence over layers, largest at the bottom, with mean `budget`:
    past  = budget - window                       (tokens chosen by score, per head)
    lo    = past / beta,   hi = 2 * past - lo     (steepness beta [20])
    b_l   = window + hi - l * (hi - lo) / (n_layer - 1)        l = 0 .. n_layer - 1
Choices: the official code truncates each b_l to an int, so its mean drifts below the
budget; here the b_l are rounded by largest remainder (ties to lower layers) so that they
sum to exactly n_layer * budget. Every b_l must hold the window. As in the official code, a
prompt no longer than `budget` is not compressed in any layer.
"""

import math

from ..method import _check_number
from .snapkv import SnapKV


def pyramid_budgets(budget: int, window: int, n_layer: int, beta: float) -> list[int]:
    if n_layer == 1:
        return [budget]
    past = budget - window
    lo = past / beta
    hi = 2 * past - lo
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
        self.layer_budgets = None  # set from the model config

    def check_config(self, config):
        self.layer_budgets = pyramid_budgets(self.budget, self.window, config.n_layer, self.beta)
        if min(self.layer_budgets) < max(self.window, 1):
            raise ValueError(
                f"the top layer's budget ({min(self.layer_budgets)}) is below window ({self.window}); "
                "use a smaller window or beta, or a larger budget"
            )

    def layer_budget(self, layer_idx: int) -> int:
        return self.layer_budgets[layer_idx]
