"""
D2O: Dynamic Discriminative Operations (Wan et al. 2024, "D2O: Dynamic Discriminative
Operations for Efficient Long-Context Inference of Large Language Models", arXiv 2406.13035).

Rule: H2O's eviction (accumulated attention F, a recent window, and `n_sink` protected first
tokens [4]), plus a compensation step: every evicted token e is matched to its most similar
kept token c* by key cosine similarity,
    s_e = max over kept c of cos(k_e, k_c),      c*(e) = argmax
and merged into it when s_e reaches a threshold tau tracked as an exponential moving average
    tau = mean(s) at the layer's first eviction, then tau <- alpha * tau + beta * mean(s)
(alpha = beta = 0.5; the mean is over the call's evicted tokens of all heads, per sequence: each
batch row has its own tau). Keys and values of c* become the mean of the center and its
weighted members (the official code's scatter-mean including the center itself):
    k_c <- (k_c + sum over e->c of s_e * k_e) / (1 + |{e -> c}|),   v_c likewise.
`threshold` fixes tau instead (threshold=inf never merges: exactly H2O with its sinks).

Matching: layer.nearest_center (fast/merge.py on the Triton backend); merging: a scatter-add
of the evicted rows into their centers. Choices: the decision is per head (the official code
averages s_e over heads, which only makes sense when all heads evict the same tokens); tau is
per layer and batch row, in fp32 (B floats per layer). Not implemented: the optional per-layer
budgets from attention variance (layers get the same budget here).
Grouped-query models (nanokv.hf): attention is the mean of a key-value head's query heads' rows.
"""

import math

import torch

from ..method import _check_number, mask_slots
from .h2o import H2O


class D2O(H2O):
    name = "d2o"
    merges = True  # stored values (and keys for D2O) are mixtures of tokens

    def __init__(self, budget: int, recent: int | None = None, n_sink: int = 4, alpha: float = 0.5,
                 beta: float = 0.5, threshold: float | None = None):
        super().__init__(budget, recent=recent, n_sink=n_sink)
        _check_number("alpha", alpha, 0, 1)
        _check_number("beta", beta, 0, 1)
        if threshold is not None:
            _check_number("threshold", threshold, -1, note=" (or None: the EMA threshold; inf: no merging)")
        self.alpha, self.beta, self.threshold = float(alpha), float(beta), threshold
        self.tau: dict[int, torch.Tensor] = {}  # layer -> EMA threshold per batch row (B,) fp32

    @classmethod
    def scaled(cls, budget, **kwargs):
        kwargs.setdefault("n_sink", min(4, budget // 4))
        return cls(budget=budget, **kwargs)

    def merge(self, layer, keep, score):  # H2O's compress calls this with its keep mask (B, H, L), then evicts
        evicted = layer.valid_mask() & ~keep  # (B, H, L)
        if not evicted.any() or (self.threshold is not None and math.isinf(self.threshold)):
            return
        k, v = layer.padded("k").float(), layer.padded("v").float()
        s, center = layer.nearest_center(k, None, keep, evicted)  # (B, H, L): key cosine
        n_e = evicted.sum(dim=(1, 2))  # (B,) evicted tokens per row, over all heads
        mean_s = s.masked_fill(~evicted, 0.0).sum(dim=(1, 2)) / n_e.clamp(min=1)  # (B,)
        if self.threshold is not None:
            tau = torch.full_like(mean_s, self.threshold)
        else:
            old = self.tau.get(layer.index)
            tau = mean_s if old is None else self.alpha * old + self.beta * mean_s
            if old is not None:
                tau = torch.where(n_e > 0, tau, old)  # a row that evicts nothing keeps its tau
            self.tau[layer.index] = tau
        merge = evicted & (s >= tau[:, None, None])  # (B, H, L_e)
        e = mask_slots(evicted)  # (B, H, m): only the evicted rows contribute (1 per head at a decode step)
        w = torch.where(merge, s, torch.zeros_like(s)).gather(-1, e)  # weight s_e, 0 if not merged
        c = center.gather(-1, e)  # (B, H, m) each one's center
        count = 1 + torch.zeros_like(s).scatter_add_(2, c, merge.gather(-1, e).float())  # a center + its members
        idx, rows = c[..., None].expand(*c.shape, k.size(-1)), e[..., None].expand(*e.shape, k.size(-1))
        ksum = torch.zeros_like(k).scatter_add_(2, idx, w[..., None] * k.gather(2, rows))  # (B, H, L_c, D)
        vsum = torch.zeros_like(v).scatter_add_(2, idx, w[..., None] * v.gather(2, rows))
        layer.set_padded("k", ((k + ksum) / count[..., None]).to(layer.dtype))
        layer.set_padded("v", ((v + vsum) / count[..., None]).to(layer.dtype))

    def state_nbytes(self):
        out = super().state_nbytes()
        out["method_state"] += sum(t.numel() * t.element_size() for t in self.tau.values())
        return out

    def reset(self):
        self.tau = {}
