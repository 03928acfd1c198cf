"""
Measurements that look inside attention while a method runs (used by nanokv.eval).

AttentionProbe runs a method's cache and a full cache side by side on the same q, k, v and
records, per layer, after the first (prefill) call:

    lost mass  = sum over the positions j the method did not hold when it attended of
                 a_full[j]  (the attention the full cache would have put there), in [0, 1]
    rel. error = || out_method - out_full || / || out_full ||  (the layer's attention output)

The model runs on the method's output, so the inputs of layer l are the method's own hidden
states: the error is that of the cache at this layer, not accumulated drift. Quantized
methods hold every position (lost mass 0) but have an output error; a merged token counts
as held only at its representative's position.

persistence_ratio measures Scissorhands' "persistence of importance" on a full attention map;
pivotal_fraction how much of the prefix its pivotal set holds, and peak_over_uniform how far the
map is from uniform attention (the two figures that say what a ratio means).
"""

from __future__ import annotations

import torch

from .cache import KVCache


def held_mask(cache: KVCache, layer_idx: int, n: int) -> torch.Tensor:
    """(B, H, n) bool: which of the positions 0..n-1 one layer of `cache` holds (any precision)."""
    B, H = cache.batch_size, cache.config.n_head
    mask = torch.zeros(B, H, n + 1, dtype=torch.bool, device=cache.device)
    for st in cache._stores_with_positions(layer_idx):
        pos = st.padded("pos", fill=-1).long().flatten(2)  # (B, H, L * tokens per entry)
        pos = torch.where(pos < 0, n, pos)  # padding goes to a spare slot n
        mask.scatter_(2, pos, True)
    return mask[:, :, :n]


class AttentionProbe:
    """Looks like a KVCache to the model; `cache` does the work, `full` is the yardstick."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.full = KVCache(cache.config, "full")
        n = cache.config.n_layer
        self.lost = [[] for _ in range(n)]  # per layer, one value per measured query
        self.err = [[] for _ in range(n)]  # per layer, one value per measured call

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    @property
    def config(self):
        return self.cache.config

    def bind(self, model):
        self.cache.bind(model)
        self.full.bind(model)

    def reserve(self, new_tokens: int):
        self.cache.reserve(new_tokens)
        self.full.reserve(new_tokens)

    def attend(self, layer_idx: int, q, k, v):
        T = q.size(2)
        start = self.cache.seq_len if self.cache.layers is None else self.cache.layers[layer_idx].n_seen
        first = start == 0
        held = None if first else held_mask(self.cache, layer_idx, start)  # before this call appends
        out = self.cache.attend(layer_idx, q, k, v)  # (B, H, T, D)
        ref = self.full.attend(layer_idx, q, k, v)
        if first:
            return out
        layer = self.full.layers[layer_idx]
        q_pos = torch.arange(start, start + T, device=q.device)
        _, probs = self.full.attention(q, layer, q_pos)  # (B, H, T, start + T), positions in order
        lost = (probs[..., :start] * (~held)[:, :, None, :]).sum(-1)  # (B, H, T)
        self.lost[layer_idx] += lost.mean(1).flatten().tolist()  # mean over heads
        err = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)
        self.err[layer_idx].append(float(err))
        return out

    def report(self) -> dict:
        def mean(xs):
            return sum(xs) / len(xs) if xs else 0.0

        lost = [mean(x) for x in self.lost]
        err = [mean(x) for x in self.err]
        return {"lost_mass": mean(lost), "lost_mass_per_layer": lost,
                "rel_error": mean(err), "rel_error_per_layer": err}


@torch.no_grad()
def attention_maps(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Full attention probabilities of every layer for one sequence: a list of (H, T, T)."""
    maps = []

    class Recorder(KVCache):  # a full cache that keeps every probability matrix it computes
        def attention_over(self, q, parts, q_pos, with_probs=True):
            out, probs = super().attention_over(q, parts, q_pos, with_probs=True)  # even where "full" skips them
            maps.append(probs[0])
            return out, probs

    model(ids[None], cache=Recorder(model.config, "full"))
    return maps


def pivotal_sets(probs: torch.Tensor, min_share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """S1 and S2 of persistence_ratio for one layer, probs (H, T, T) causal: two (H, T/2) bool masks
    over the prefix tokens j < T/2 (pivotal for the first-half queries, for the second-half queries)."""
    H, T, _ = probs.shape
    half = T // 2
    t = torch.arange(T, dtype=torch.float32, device=probs.device)
    pivotal = probs > (1.0 / (t + 1))[None, :, None]  # (H, T, T)
    first = pivotal[:, :half, :half].float()  # queries t < half over prefix tokens j < half
    second = pivotal[:, half:, :half].float()
    # a query t sees j <= t: first-half shares count only the queries that could see j
    j = torch.arange(half, device=probs.device)
    seen = (j[None, :] <= j[:, None]).float()  # (t, j)
    s1 = first.sum(1) / seen.sum(0).clamp_min(1) >= min_share  # (H, half)
    s2 = second.mean(1) >= min_share
    return s1, s2


def persistence_ratio(probs: torch.Tensor, min_share: float = 0.5) -> float:
    """Scissorhands' persistence of importance for one layer, probs (H, T, T) causal.

    Token j is pivotal for query t when a_t[j] > 1/(t+1) (above the average attention).
    Split the queries into a first and a second half; over the prefix tokens j < T/2,
        S1 = tokens pivotal for at least `min_share` of the first-half queries
        S2 = tokens pivotal for at least `min_share` of the second-half queries
        ratio = |S1 and S2| / |S2|   (averaged over heads; heads with empty S2 are skipped)
    If no head has a pivotal token in S2 the ratio is undefined and the result is NaN (a window
    whose second half attends to nothing in particular is not evidence against persistence);
    nanokv.eval.persistence leaves such windows out of a layer's average and counts them.
    The paper takes unions (min_share -> 0); on a small model every prefix token is then
    pivotal for some query, so the ratio is 1 for any model. min_share = 0.5 ("usually
    pivotal") keeps the statistic informative; the choice is ours and named here.
    Read it beside pivotal_fraction and peak_over_uniform: a model whose attention is nearly
    uniform (random init) has about half of its prefix "pivotal", and the same half stays so.
    """
    s1, s2 = pivotal_sets(probs, min_share)
    ratios = [float((s1[h] & s2[h]).sum() / s2[h].sum()) for h in range(s2.size(0)) if s2[h].any()]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def pivotal_fraction(probs: torch.Tensor, min_share: float = 0.5) -> float:
    """|S2| / (T/2) of persistence_ratio, averaged over heads: the share of the prefix that stays
    pivotal. The paper finds the pivotal set much smaller than the prefix in a trained model."""
    return float(pivotal_sets(probs, min_share)[1].float().mean())


def peak_over_uniform(probs: torch.Tensor) -> float:
    """How far one layer's attention is from uniform, probs (H, T, T) causal.

    For each head and query t >= 1: the largest attention share max_j a_t[j] divided by the
    uniform share 1/(t+1); averaged over heads and queries. 1.0 means every query spreads its
    attention evenly (then "above the average" in persistence_ratio is noise); a query that
    puts all of its attention on one token gives t+1."""
    H, T, _ = probs.shape
    t = torch.arange(1, T, dtype=torch.float32, device=probs.device)
    return float((probs[:, 1:].float().amax(-1) * (t + 1)).mean())


def visibility_from_maps(maps: list[torch.Tensor], value_pos: list[int], window: int) -> dict:
    """How visible a needle's value is to attention-based scoring, from one prompt's full maps.

    maps: per layer (H, T, T) causal attention of the prompt (context + question); value_pos: the
    positions of the value's tokens in the context. Per layer and head:
        last_mass  = sum over value tokens j of a_{T-1}[j]          (the question's last query)
        window_vs_uniform = (sum over the last `window` queries i and value tokens j of a_i[j])
                            / (window * len(value) / (T - window))  (1 = a uniform share)
        above      = fraction of the tokens before the window whose SnapKV score (the window's
                     summed attention) is above the weakest value token's   (0 = the value ranks first)
    Returned as lists (layer -> head -> value)."""
    out = {"last_mass": [], "window_vs_uniform": [], "above": []}
    vp = torch.tensor(value_pos)
    for probs in maps:
        H, T, _ = probs.shape
        ctx = T - window
        score = probs[:, ctx:, :ctx].sum(dim=1)  # (H, ctx): SnapKV's window score, unpooled
        weakest = score[:, vp].min(dim=1).values  # (H,)
        out["last_mass"].append(probs[:, -1, vp].sum(-1).tolist())
        out["window_vs_uniform"].append((score[:, vp].sum(-1) / (window * len(value_pos) / ctx)).tolist())
        out["above"].append(((score > weakest[:, None]).float().mean(-1)).tolist())
    return out


def needle_visibility(model, episodes, window: int = 16) -> dict:
    """visibility_from_maps averaged over passkey episodes (full prompts: context + question)."""
    per = []
    for ep in episodes:
        ctx = ep.prompt[:ep.context_len]
        n = len(ep.answer)
        starts = [i for i in range(len(ctx) - n + 1) if ctx[i:i + n] == ep.answer]
        if len(starts) != 1:
            raise ValueError(f"the answer occurs {len(starts)} times in the context; expected once")
        maps = attention_maps(model, torch.tensor(ep.prompt))
        per.append(visibility_from_maps(maps, list(range(starts[0], starts[0] + n)), window))
    return {k: torch.tensor([p[k] for p in per]).mean(0).tolist() for k in per[0]}
