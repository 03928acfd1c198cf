"""
H2O: Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv 2306.14048).

Rule: a few tokens ("heavy hitters") receive most of the attention. Every cached token j
carries its accumulated attention
    F[j] = sum over every query t that has seen j of a_t[j]
(at prefill: the column sums of the causal prompt attention; then each decode step adds its
row). A head keeps the `recent` newest tokens plus the best `budget - recent` by F (and,
optionally, `n_sink` first tokens). During decode one token is evicted per step.

Choices: per head (not averaged over heads), as the paper; recent defaults to half the
budget ("half/half" of the paper's 10% heavy + 10% recent setting); F is kept in fp32
whatever the model dtype; evicted tokens' F is forgotten. Method state: 4 bytes per token.
Grouped-query models (nanokv.hf): a key-value head's a_t is the mean of its query heads' rows.
"""

import torch

from ..method import ScoredEviction, _check_int


class H2O(ScoredEviction):
    name = "h2o"

    def __init__(self, budget: int, recent: int | None = None, n_sink: int = 0):
        budget = _check_int("budget", budget, 1)
        recent = budget // 2 if recent is None else recent
        super().__init__(budget, n_sink=n_sink, window=recent)
        self.recent = recent

    def init_layer(self, layer, layer_idx):
        layer.add_field("acc", "method_state", (), torch.float32)  # F[j]

    probs_rows = 0  # observe reads column sums only

    def observe(self, layer, probs, q):
        # probs (B, H, T, L): add each query's row to the accumulated attention
        layer.set_padded("acc", layer.padded("acc") + probs.sum(dim=2))

    def score(self, layer):
        return layer.padded("acc", fill=float("-inf"))  # (B, H, L)
