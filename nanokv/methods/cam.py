"""
CaM: Cache Merging (Zhang et al. 2024, "CaM: Cache Merging for Memory-efficient LLMs
Inference", ICML 2024).

Rule: on top of an eviction policy (here H2O's: accumulated attention plus a recent window),
a token e about to be evicted first hands its value to the tokens after it. With A the
accumulated attention and W the next `m` kept tokens after e (fewer at the end of the cache),
    p_e = clamp(A[e] / mean over j in W of A[j], 0, max_prob)
    z_e ~ Bernoulli(p_e)
    v_j += z_e * v_e / |W|          for every j in W
then (k_e, v_e) are dropped. Keys are never merged. m defaults to 16 (the official generation
code); max_prob = 0 turns merging off and leaves exactly the eviction policy (H2O's, evicting in place).

Choices: the eviction policy is H2O's (the official code's sinks + recent window is H2O with recent
= budget - n_sink and no heavy hitters); W counts kept tokens only, as kvpress does; contributions
of several evicted tokens add up (A is not changed by merging). The Bernoulli draws are seeded and
stateless: each call uses a generator seeded from (seed, layer, tokens seen), so runs and clones
are reproducible; every batch row uses the same draws, so a row's result does not depend on the
batch it is in. Grouped-query models (nanokv.hf): A sums the mean row of a key-value head's queries.
"""

import torch

from ..method import _check_number, mask_slots
from .h2o import H2O


class CaM(H2O):
    name = "cam"
    merges = True  # stored values (and keys for D2O) are mixtures of tokens

    def __init__(self, budget: int, recent: int | None = None, n_sink: int = 0, m: int = 16,
                 max_prob: float = 1.0, seed: int = 0):
        super().__init__(budget, recent=recent, n_sink=n_sink)
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"m (merge window) must be an int >= 1, got {m!r}")
        _check_number("max_prob", max_prob, 0, 1)
        self.m, self.max_prob, self.seed = m, float(max_prob), seed

    @property
    def evicts_in_place(self):  # W reads slot order: a merging CaM compacts
        return self.max_prob == 0

    def merge(self, layer, keep, score):  # H2O's compress calls this with its keep mask (B, H, L), then evicts
        if self.max_prob == 0:  # never merges: exactly H2O
            return
        B, H, L = keep.shape
        evicted = layer.valid_mask() & ~keep  # (B, H, L); at decode one token per head
        e = mask_slots(evicted)  # (B, H, m_e): work on the evicted rows only
        e_ok = evicted.gather(-1, e)
        acc = layer.padded("acc").float()  # (B, H, L) A[j]
        # W[e, j]: j is one of the next m kept tokens after e
        kept_rank = torch.cumsum(keep.long(), dim=-1)  # number of kept slots up to and including j
        after = kept_rank[:, :, None, :] - kept_rank.gather(-1, e)[..., None]  # kept tokens in (e, j]
        W = keep[:, :, None, :] & (after >= 1) & (after <= self.m) & e_ok[..., None]  # (B, H, m_e, L_j)
        size = W.sum(dim=-1)  # (B, H, m_e)
        mean_a, a_e = (W * acc[:, :, None, :]).sum(dim=-1) / size.clamp(min=1), acc.gather(-1, e)
        p = torch.where(mean_a > 0, a_e / mean_a.clamp(min=1e-30), (a_e > 0).float())
        p = p.clamp(0.0, self.max_prob) * (size > 0)
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + layer.index * 10_007 + layer.n_seen)
        u = torch.rand(H, L, generator=g).expand(B, H, L).to(p.device)  # the same draws for every batch row
        z = u.gather(-1, e) < p
        share = (W * (z / size.clamp(min=1))[..., None]).to(layer.dtype)  # (B, H, m_e, L_j)
        v = layer.padded("v")  # every kept j adds its share of each evicted value v_e (B, H, m_e, D)
        layer.set_padded("v", v + share.transpose(-1, -2) @ v.gather(2, e[..., None].expand(-1, -1, -1, v.size(-1))))
