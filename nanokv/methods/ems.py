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
How: ScoredEviction's compress (keep_mask -> merge -> evict; a decode step evicts one per head in
place, and rewrites nothing if no token joins a center); irrelevant and dissimilar tokens go to slot
L (the zero center, dropped); centers keep position and scores. State: s_glo and the local ring,
4 + 4 * window bytes per token. Grouped-query (nanokv.hf): the mean of a group's query heads' rows."""

import torch
import torch.nn.functional as F

from ..method import ScoredEviction, _check_int, _check_number
from .adakv import headwise_topk


class EMS(ScoredEviction):
    name = "ems"
    merges = True

    def __init__(self, budget: int, window: int = 32, mass: float = 0.9, tau: float = 0.5,
                 key_merge: str = "mean", head_budgets: str = "uniform", alpha: float = 0.2,
                 interval: int = 1, nonneg_cos: bool = True):
        budget = _check_int("budget", budget, 1)
        window = _check_int("window", window, 1)
        interval = _check_int("interval", interval, 1)
        if window >= budget:
            raise ValueError(f"window ({window}) must be < budget ({budget}): no room for class centers")
        super().__init__(budget, window=window)
        _check_number("mass", mass, 0, 1, low_open=True)
        _check_number("tau", tau, -1, note=" (inf disables merging)")
        if key_merge not in ("mean", "direction"):
            raise ValueError(f"key_merge must be 'mean' or 'direction', got {key_merge!r}")
        if head_budgets not in ("uniform", "adaptive"):
            raise ValueError(f"head_budgets must be 'uniform' or 'adaptive', got {head_budgets!r}")
        _check_number("alpha", alpha, 0, 1)
        self.mass, self.tau, self.key_merge = float(mass), float(tau), key_merge
        self.probs_rows = window  # observe reads column sums and the last `window` rows
        self.head_budgets, self.alpha, self.interval, self.nonneg_cos = head_budgets, float(alpha), interval, nonneg_cos
        self.evicts_in_place = interval == 1 and head_budgets == "uniform"  # adaptive: a head may drop 0 or 2

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
        loc = layer.padded("loc")  # a view of the store (uniform heads) or a copy (ragged): written back below
        loc[..., slots] = probs[:, :, T - m:, :].transpose(-1, -2)
        layer.set_padded("loc", loc)

    def in_window(self, layer):  # (B, H, L) bool: the `window` newest tokens, by position (not slot order)
        pos = layer.padded("pos", fill=-1)
        return (pos > pos.amax(dim=-1, keepdim=True) - self.window) & layer.valid_mask()

    def scores(self, layer):
        """(s_glo, aligned s_loc, s) over the padded slots (B, H, L)."""
        valid = layer.valid_mask()
        outside = valid & ~self.in_window(layer)  # non-window tokens
        glo = layer.padded("glo").masked_fill(~valid, 0.0)
        loc = layer.padded("loc").sum(dim=-1).masked_fill(~valid, 0.0)
        cnt = outside.sum(-1, keepdim=True).clamp(min=1)
        mg = (glo * outside).sum(-1, keepdim=True) / cnt
        ml = (loc * outside).sum(-1, keepdim=True) / cnt
        loc = torch.where(ml > 0, loc * mg / ml.clamp(min=1e-30), loc)
        return glo, loc, torch.maximum(glo, loc)

    def score(self, layer):
        return self.scores(layer)[2]

    def keep_mask(self, layer, s, budget):
        """Window + centers: the top (budget - window) others by s, per head or (adaptive) per layer."""
        if self.head_budgets == "uniform":
            return super().keep_mask(layer, s, budget)
        window = self.in_window(layer)
        outside = layer.valid_mask() & ~window
        centers = headwise_topk(s.masked_fill(~outside, float("-inf")), budget - self.window, self.alpha)
        return (centers & outside) | window

    def classes(self, layer, s, keep=None):
        """keep (B, H, L): window + centers; assign (B, H, L) long: each token's center slot,
        the slot itself for kept tokens, L (the zero center) for evicted ones."""
        B, H, L = s.shape
        keep = self.keep_mask(layer, s, self.budget) if keep is None else keep
        centers, rest = keep & ~self.in_window(layer), layer.valid_mask() & ~keep
        # sparsity: candidates hold a fraction `mass` of the remaining score mass
        r = s.masked_fill(~rest, 0.0)
        if self.mass >= 1.0:
            cand = rest
        elif int(rest.sum(-1).max()) <= 1:  # a decode step, one token out per head: the prefix is it if it has mass
            cand = rest & (r > 0)
        else:
            order = L - 1 - torch.sort(r.flip(-1), dim=-1, descending=True, stable=True).indices
            sorted_r = r.gather(-1, order)
            before = torch.cumsum(sorted_r, -1) - sorted_r  # mass of strictly better tokens
            in_prefix = before < self.mass * r.sum(-1, keepdim=True)
            cand = torch.zeros_like(rest).scatter_(-1, order, in_prefix) & rest
        best, center = layer.nearest_center(layer.padded("k"), layer.padded("v"), centers, cand,
                                            self.nonneg_cos)  # (B, H, L): redundancy, key cos x value cos
        assign = torch.where(cand & (best >= self.tau), center, L)  # members join a center, the rest slot L
        assign = torch.where(keep, torch.arange(L, device=s.device).expand(B, H, L), assign)
        return keep, assign

    def compress(self, layer, scores=None):  # ScoredEviction's: keep_mask -> merge -> evict
        over = layer.max_len > self.budget if self.head_budgets == "uniform" else \
            bool((layer.lengths.sum(-1) > layer.heads * self.budget).any())  # adaptive: the layer's total
        if over and (layer.n_seen == 0 or layer.n_seen % self.interval == 0):  # decoding: every `interval` steps
            super().compress(layer)

    def merge(self, layer, keep, s):
        _, assign = self.classes(layer, s, keep)
        if bool(((assign < s.size(-1)) & ~keep).any()):  # some token joins a center (else nothing changes)
            k, v = merge(layer.padded("k"), layer.padded("v"), s, assign, keep, self.key_merge)
            layer.set_padded("k", k)
            layer.set_padded("v", v)


def merge(k, v, s, assign, keep, key_merge="mean"):
    """Fold every token into the slot `assign` names (L = the zero center, dropped), weighted
    by s. k, v (B, H, L, D); returns the new k, v; rows that are not centers are unchanged.
    Only members and their centers are summed, in slot order (the sums a scatter of every row makes)."""
    B, H, L, D = k.shape
    w = s.float().clamp(min=0).flatten()[:, None]  # (B*H*L, 1)
    dest = (assign + (L + 1) * torch.arange(B * H, device=k.device).view(B, H, 1)).flatten()  # rows of (B*H*(L+1))
    member = ((assign < L) & ~keep).flatten()  # (B*H*L,) folded into a center

    def total(rows, x):  # x (n, d) of `rows` -> (B*H*(L+1), d): each slot's sum over the rows assigned to it
        return torch.zeros(B * H * (L + 1), x.size(-1), device=k.device).index_add_(0, dest[rows], x)

    joined = total(member.nonzero().squeeze(1), w.new_ones(int(member.sum()), 1)).view(B, H, L + 1)[:, :, :L]
    rows = (member | (joined > 0).flatten()).nonzero().squeeze(1)  # (n,) members and their centers
    wsum = total(rows, w[rows])
    ctr = ((joined > 0) & keep & (wsum.view(B, H, L + 1)[:, :, :L] > 0)).flatten().nonzero().squeeze(1)
    at = ctr + ctr // L  # the centers' rows of (B*H*(L+1))
    kf, vf = k.flatten(0, 2).float(), v.flatten(0, 2).float()  # (B*H*L, D)
    new_k, new_v, denom = kf.clone(), vf.clone(), wsum[at].clamp(min=1e-30)
    new_v[ctr] = total(rows, w[rows] * vf[rows])[at] / denom
    if key_merge == "mean":
        new_k[ctr] = total(rows, w[rows] * kf[rows])[at] / denom
    else:  # direction and norm merged separately
        norm = kf[rows].norm(dim=-1, keepdim=True)
        nsum, dsum = total(rows, w[rows] * norm), total(rows, w[rows] * kf[rows] / norm.clamp(min=1e-30))
        new_k[ctr] = F.normalize(dsum[at], dim=-1) * nsum[at] / denom
    return new_k.view(B, H, L, D).to(k.dtype), new_v.view(B, H, L, D).to(v.dtype)
