"""
SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv 2404.14469).

Rule: the last `window` queries of the prompt (the "observation window", which usually holds
the question) already show which earlier tokens generation will need. At the end of prefill,
per head:
    s[j]  = sum over the window queries i of a_i[j]        for the prompt tokens j before the window
    s     = pool1d(s, kernel, stride 1, padding kernel // 2)   (max pool [default] or avg pool)
    keep  = the window + the top (budget - window) tokens by s
Ties go to the more recent token. Decoding only appends (the paper compresses the prompt
once): after prefill a head holds `budget` tokens, then one more per generated token.

Choices: sum (not mean) over the window queries, as the official code (same ranking);
pooling only over the tokens before the window (the official code pools `attn[..., :-w]`);
avg pooling counts the zero padding (count_include_pad=True, as torch's default and the
official code). A prompt no longer than the budget is not compressed.
Grouped-query models (nanokv.hf): a key-value head's a_i is the mean of its query heads' rows
(kvpress pools each query head, then averages: equal with avg pooling, tests/test_hf.py).
"""

import torch.nn.functional as F

from ..method import ScoredEviction, _check_int


def window_scores(probs, window: int, kernel: int, pool: str):
    """probs (B, H, T, L) of a prefill -> pooled observation-window scores (B, H, L);
    the window's own entries score 0 (they are protected anyway)."""
    B, H, T, L = probs.shape
    s = probs[:, :, T - window:, : L - window].sum(dim=2)  # (B, H, L - w)
    x = s.reshape(B * H, 1, L - window)
    if pool == "max":
        x = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        x = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    return F.pad(x.reshape(B, H, L - window), (0, window))


class SnapKV(ScoredEviction):
    name = "snapkv"
    compresses_at = "prefill"

    def __init__(self, budget: int, window: int = 32, kernel: int = 7, pool: str = "max"):
        super().__init__(budget, window=window)
        kernel = _check_int("kernel", kernel, 1)
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (same-length pooling), got {kernel}")
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        self.kernel, self.pool = kernel, pool
        self.probs_rows = window  # observe reads the window's rows only

    @classmethod
    def scaled(cls, budget, **kwargs):
        kwargs.setdefault("window", min(32, max(1, budget // 4)))  # paper default 32, else budget/4
        return cls(budget=budget, **kwargs)

    def layer_budget(self, layer_idx: int, prompt_len: int | None = None) -> int:
        return self.budget

    def observe(self, layer, probs, q):
        # compress the prompt once, when it is longer than the (mean) budget, as the official
        # code does; a layer whose own budget holds the whole prompt then keeps everything
        if layer.n_seen == 0 and layer.max_len > self.budget:
            return window_scores(probs, self.window, self.kernel, self.pool)
        return None  # decode and continuation chunks only append

    def compress(self, layer, scores=None):
        if scores is not None:
            layer.keep(self.select(layer, scores))

    def select(self, layer, score):
        """(B, H, L) keep mask for the prompt."""
        return self.keep_mask(layer, score, self.layer_budget(layer.index, layer.max_len))
