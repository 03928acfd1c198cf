"""
Key-norm eviction (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression", arXiv 2406.11430). The "hello world" of a scored method.

Rule: keys with a small L2 norm tend to receive a lot of attention, so keep the keys with
the smallest norm:
    score[j] = -||k_j||_2        (higher = keep)
plus an optional window of the most recent tokens (and n_sink first ones), which the base
class protects. Compresses whenever a head holds more than `budget` tokens (prefill and decode).
"""

from ..method import ScoredEviction


class KeyNorm(ScoredEviction):
    name = "knorm"
    needs_probs = False

    def __init__(self, budget: int, window: int = 0, n_sink: int = 0):
        super().__init__(budget, n_sink=n_sink, window=window)

    def score(self, layer):
        k = layer.padded("k")  # (B, H, L, D)
        return -k.float().norm(dim=-1)  # (B, H, L)
