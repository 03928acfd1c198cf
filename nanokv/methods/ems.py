"""
EMS: adaptive Evict-then-Merge with a Global-Local importance score (Li et al. 2024,
"EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on
Global-Local Importance", arXiv 2412.08521).

The paper's method section was not available to us. What is known (abstract, public reviews)
is honoured; every other piece is OUR RECONSTRUCTION, exposed as a parameter.

Known: a Global-Local score, the max of a global score (attention accumulated over all
queries: favours early tokens, because of the causal mask) and a local score (attention
from a recent observation window: favours recent tokens), mean-aligned first; per head,
tokens are important (kept), to be merged, or irrelevant (evicted), in proportions set by
the head's sparsity and redundancy; redundancy is the product of key and value cosine
similarity; to-be-merged tokens are folded, weighted by score, into their most similar
important token (a class center); a token not similar enough to any center joins a zero
center and vanishes, so eviction and merging are one batched operation with the same
shapes for every head; compression at the end of prefill and periodically while decoding.

Per layer and head, when a head holds more than `budget` tokens (and, while decoding, every
`interval` steps [1: every step, so the budget holds after each call]):
  s_glo[j] = sum over all queries so far of a_t[j]                  (kept online, fp32)
  s_loc[j] = sum over the last `window` queries of a_t[j]           (a ring of `window` rows)
  s_loc'   = s_loc * mean(s_glo) / mean(s_loc)                      (means over non-window tokens)
  s[j]     = max(s_glo[j], s_loc'[j])
  window   = the `window` newest tokens: always kept, never merged         [reconstruction]
  centers  = the top (budget - window) other tokens by s                   [reconstruction]
             (head_budgets="adaptive": chosen jointly over the layer's heads as Ada-KV does,
             so heads keep different numbers of tokens; "uniform" [default]: per head)
  candidates = the best remaining tokens holding a fraction `mass` of the remaining score
             mass [0.9]; the rest are irrelevant (sparse heads evict more)    [reconstruction]
  sim(t, c) = max(cos(k_t, k_c), 0) * max(cos(v_t, v_c), 0)  (clamped: the reviewers note that
             two negative cosines multiply to a positive one; nonneg_cos=False keeps the plain
             product)                                                        [reconstruction]
  class(t) = argmax over centers of sim(t, c) if that sim >= tau [0.5], else the zero class
  v_c      <- sum over members j (c included) of s[j] v_j / sum of s[j]
  k_c      <- the same weighted mean (key_merge="mean" [default]), or ("direction") the weighted
             mean norm times the normalized weighted sum of unit keys        [reconstruction]
The zero class is slot L of a (B, H, L + 1, D) scatter buffer: every candidate and irrelevant
token is scattered somewhere, irrelevant and dissimilar ones into slot L, which is dropped.
A merged center keeps its own position and scores.
Method state: s_glo (4 bytes) and the local ring (4 * window bytes) per token.
Grouped-query models (nanokv.hf): attention is the mean of a key-value head's query heads' rows.
"""

import torch
import torch.nn.functional as F

from ..method import Method, _check_int, _check_number, top_k_mask
from .adakv import headwise_topk


class EMS(Method):
    name = "ems"
    compresses_at = "prefill+decode"
    merges = True

    def __init__(self, budget: int, window: int = 32, mass: float = 0.9, tau: float = 0.5,
                 key_merge: str = "mean", head_budgets: str = "uniform", alpha: float = 0.2,
                 interval: int = 1, nonneg_cos: bool = True):
        super().__init__(budget)
        budget = _check_int("budget", budget, 1)
        window = _check_int("window", window, 1)
        interval = _check_int("interval", interval, 1)
        if window >= budget:
            raise ValueError(f"window ({window}) must be < budget ({budget}): no room for class centers")
        _check_number("mass", mass, 0, 1, low_open=True)
        _check_number("tau", tau, -1, note=" (inf disables merging)")
        if key_merge not in ("mean", "direction"):
            raise ValueError(f"key_merge must be 'mean' or 'direction', got {key_merge!r}")
        if head_budgets not in ("uniform", "adaptive"):
            raise ValueError(f"head_budgets must be 'uniform' or 'adaptive', got {head_budgets!r}")
        _check_number("alpha", alpha, 0, 1)
        self.window, self.mass, self.tau, self.key_merge = window, float(mass), float(tau), key_merge
        self.probs_rows = window  # observe reads column sums and the last `window` rows
        self.head_budgets, self.alpha, self.interval, self.nonneg_cos = head_budgets, float(alpha), interval, nonneg_cos

    @classmethod
    def scaled(cls, budget, **kwargs):
        kwargs.setdefault("window", min(32, max(1, budget // 4)))
        return cls(budget=budget, **kwargs)

    def init_layer(self, layer, layer_idx):
        layer.add_field("glo", "method_state", (), torch.float32)
        layer.add_field("loc", "method_state", (self.window,), torch.float32)  # ring of recent rows

    def observe(self, layer, probs, q):
        B, H, T, L = probs.shape
        layer.set_padded("glo", layer.padded("glo") + probs.sum(dim=2))
        m = min(T, self.window)  # the last m queries enter the ring, each at slot position % window
        slots = (torch.arange(layer.n_seen + T - m, layer.n_seen + T) % self.window).to(probs.device)
        loc = layer.padded("loc").clone()
        loc[..., slots] = probs[:, :, T - m:, :].transpose(-1, -2)
        layer.set_padded("loc", loc)

    # ------------------------------------------------------------------ scores and classes
    def scores(self, layer):
        """(s_glo, aligned s_loc, s) over the padded slots (B, H, L)."""
        valid = layer.valid_mask()
        n = layer.lengths[:, :, None]
        slot = torch.arange(layer.max_len, device=valid.device)
        outside = valid & (slot < n - self.window)  # non-window tokens
        glo = layer.padded("glo").masked_fill(~valid, 0.0)
        loc = layer.padded("loc").sum(dim=-1).masked_fill(~valid, 0.0)
        cnt = outside.sum(-1, keepdim=True).clamp(min=1)
        mg = (glo * outside).sum(-1, keepdim=True) / cnt
        ml = (loc * outside).sum(-1, keepdim=True) / cnt
        loc = torch.where(ml > 0, loc * mg / ml.clamp(min=1e-30), loc)
        return glo, loc, torch.maximum(glo, loc)

    def classes(self, layer, s):
        """keep (B, H, L): window + centers; assign (B, H, L) long: each token's center slot,
        the slot itself for kept tokens, L (the zero center) for evicted ones."""
        B, H, L = s.shape
        valid = layer.valid_mask()
        slot = torch.arange(L, device=s.device)
        window = valid & (slot >= layer.lengths[:, :, None] - self.window)
        if self.head_budgets == "uniform":
            keep = top_k_mask(layer.lengths, s, self.budget, window=self.window)
        else:  # centers chosen jointly over the layer's heads: H * (budget - window) of them
            outside = valid & ~window
            centers = headwise_topk(s.masked_fill(~outside, float("-inf")), self.budget - self.window, self.alpha)
            keep = (centers & outside) | window
        centers = keep & ~window
        rest = valid & ~keep
        # sparsity: candidates hold a fraction `mass` of the remaining score mass
        r = s.masked_fill(~rest, 0.0)
        if self.mass >= 1.0:
            cand = rest
        else:
            order = torch.sort(r.flip(-1), dim=-1, descending=True, stable=True).indices
            order = L - 1 - order
            sorted_r = r.gather(-1, order)
            before = torch.cumsum(sorted_r, -1) - sorted_r  # mass of strictly better tokens
            total = r.sum(-1, keepdim=True)
            in_prefix = before < self.mass * total
            cand = torch.zeros_like(rest).scatter_(-1, order, in_prefix) & rest
        # redundancy: product of key and value cosine similarity to each center (method.py)
        best, center = layer.nearest_center(layer.padded("k"), layer.padded("v"), centers, cand,
                                            self.nonneg_cos)  # (B, H, L) each
        member = cand & (best >= self.tau)
        assign = torch.full((B, H, L), L, dtype=torch.long, device=s.device)  # the zero center
        assign = torch.where(member, center, assign)
        assign = torch.where(keep, slot.expand(B, H, L), assign)
        return keep, assign

    # ------------------------------------------------------------------ evict and merge, batched
    def over_budget(self, layer) -> bool:
        if self.head_budgets == "uniform":
            return layer.max_len > self.budget
        return bool((layer.lengths.sum(-1) > layer.heads * self.budget).any())  # the layer's total

    def compress(self, layer, scores=None):
        if not self.over_budget(layer):
            return
        if layer.n_seen > 0 and layer.n_seen % self.interval != 0:
            return  # decoding: compress every `interval` steps
        _, _, s = self.scores(layer)
        keep, assign = self.classes(layer, s)
        k, v = merge(layer.padded("k"), layer.padded("v"), s, assign, keep, self.key_merge)
        layer.set_padded("k", k)
        layer.set_padded("v", v)
        layer.keep(keep)


def merge(k, v, s, assign, keep, key_merge="mean"):
    """Fold every token into the slot `assign` names (L = the zero center, dropped), weighted
    by s. k, v (B, H, L, D); returns the new k, v; rows that are not centers are unchanged."""
    B, H, L, D = k.shape
    w = s.float().clamp(min=0)[..., None]  # (B, H, L, 1)
    idx = assign[..., None].expand(B, H, L, D)
    count = torch.zeros(B, H, L + 1, 1, device=k.device).scatter_add_(2, assign[..., None], torch.ones_like(w))
    wsum = torch.zeros(B, H, L + 1, 1, device=k.device).scatter_add_(2, assign[..., None], w)
    vsum = torch.zeros(B, H, L + 1, D, device=k.device).scatter_add_(2, idx, w * v.float())
    ksum = torch.zeros(B, H, L + 1, D, device=k.device).scatter_add_(2, idx, w * k.float())
    ok = (count[:, :, :L] > 1) & (wsum[:, :, :L] > 0) & keep[..., None]  # a center with members
    new_v = torch.where(ok, vsum[:, :, :L] / wsum[:, :, :L].clamp(min=1e-30), v.float())
    if key_merge == "mean":
        new_k = torch.where(ok, ksum[:, :, :L] / wsum[:, :, :L].clamp(min=1e-30), k.float())
    else:  # direction and norm merged separately
        norm = k.float().norm(dim=-1, keepdim=True)
        nsum = torch.zeros(B, H, L + 1, 1, device=k.device).scatter_add_(2, assign[..., None], w * norm)
        dsum = torch.zeros(B, H, L + 1, D, device=k.device).scatter_add_(2, idx, w * k.float() / norm.clamp(min=1e-30))
        merged = F.normalize(dsum[:, :, :L], dim=-1) * nsum[:, :, :L] / wsum[:, :, :L].clamp(min=1e-30)
        new_k = torch.where(ok, merged, k.float())
    return new_k.to(k.dtype), new_v.to(v.dtype)
