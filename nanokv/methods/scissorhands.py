"""
Scissorhands (Liu et al. 2023, "Scissorhands: Exploiting the Persistence of Importance
Hypothesis for LLM KV Cache Compression at Test Time", arXiv 2305.17118).

Rule ("persistence of importance"): a token that was unimportant for many recent steps will
stay unimportant. At every step t each cached token j records whether its attention was low,
    low_t[j] = a_t[j] < threshold,      threshold = 1/t [default] or 1/n (n = tokens cached)
and counts the low steps among the last `history` steps [400]:
    count[j] = sum over the last `history` steps s of low_s[j]
When the cache exceeds the budget B, the `drop` tokens with the largest counts are evicted
[drop = B/2], never the `recent` newest ones [10]. The cache then refills to B + 1 and drops again.

Every input token is processed as if it were generated, evicting as it goes. The cache runs a
prompt in pieces (`pieces`) that end where a token-by-token reading would evict: one parallel pass
per piece, its queries recorded as steps in order (the token-by-token result in about T / drop
passes). Ties in count go to the more recent token. The history is stored compactly: one bit per
step, ceil(history / 8) bytes per cached token, reported as method state.
Grouped-query models (nanokv.hf): a key-value head's attention row is the mean of its query heads'.
"""

import math

import torch

from ..method import ScoredEviction, _check_int

POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


class Scissorhands(ScoredEviction):
    name = "scissorhands"

    def __init__(self, budget: int, history: int = 400, drop: int | None = None, recent: int = 10,
                 threshold: str = "1/t"):
        budget = _check_int("budget", budget, 1)
        drop = max(1, budget // 2) if drop is None else drop
        super().__init__(budget, window=recent)
        history = _check_int("history", history, 1)
        drop = _check_int("drop", drop, 1, budget + 1 - recent)
        if threshold not in ("1/t", "1/n"):
            raise ValueError(f"threshold must be '1/t' or '1/n', got {threshold!r}")
        self.history, self.drop, self.recent, self.threshold = history, drop, recent, threshold

    @classmethod
    def scaled(cls, budget, **kwargs):
        kwargs.setdefault("recent", min(10, budget // 4))
        return cls(budget=budget, **kwargs)

    def init_layer(self, layer, layer_idx):
        layer.add_field("hist", "method_state", (math.ceil(self.history / 8),), torch.uint8)

    def pieces(self, layer, T):
        """Pieces ending where token-by-token reading would evict (at budget + 1): the result of [1] * T."""
        out, n = [], layer.max_len  # n: tokens held before each piece (equal in every head)
        while T > 0:  # a piece is >= 1 token: after a drop the cache holds budget + 1 - drop
            out.append(min(T, self.budget + 1 - n))
            T, n = T - out[-1], n + out[-1]
            if n > self.budget:  # its last token overflowed: compress drops `drop`
                n -= self.drop
        return out

    def observe(self, layer, probs, q):
        for i in range(probs.size(2)):  # (B, H, T, L): one bit per query, in order
            self.record(layer, probs[:, :, i], layer.n_seen + i)

    def compress(self, layer, scores=None):
        if layer.max_len > self.budget:  # drop the `drop` tokens most often below the threshold
            layer.keep(self.keep_mask(layer, -self.counts(layer).float(), layer.max_len - self.drop))

    def record(self, layer, p, step: int):
        """Set this step's bit: p (B, H, L) attention of the query at position `step`."""
        pos = layer.padded("pos", fill=-1)  # (B, H, L)
        present = (pos >= 0) & (pos <= step)
        if self.threshold == "1/t":
            thr = 1.0 / (step + 1)
        else:
            thr = 1.0 / present.sum(dim=-1, keepdim=True).clamp(min=1)
        low = (p < thr) & present
        byte, bit = divmod(step % self.history, 8)
        hist = layer.padded("hist")  # (B, H, L, nbytes)
        old = hist[..., byte]
        new = (old & (0xFF - (1 << bit))) | (low.to(torch.uint8) << bit)
        hist = hist.clone()
        hist[..., byte] = new
        layer.set_padded("hist", hist)

    def counts(self, layer):
        """(B, H, L) number of low-attention steps among the last `history`."""
        hist = layer.padded("hist").long()
        return POPCOUNT.to(hist.device)[hist].sum(dim=-1)
