"""
TOVA: Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs",
arXiv 2401.06104).

Rule: when the cache holds more than `budget` tokens, drop the tokens that the *current*
query attends to least:
    score[j] = mean over the heads of the layer of a_t[h, j]     (a_t: the newest query's row)
and keep the `budget` best. No accumulated history, no protected tokens. With
head_reduce="mean" (the official code's choice) every head of a layer keeps the same set;
head_reduce="none" scores and evicts each head separately.

At a prefill longer than the budget the prompt's last query does the scoring, as in the
official code. Method state: none (the score lives only during one call).
Grouped-query models (nanokv.hf): a key-value head's row is the mean of its query heads' rows.
"""

from ..method import ScoredEviction


class TOVA(ScoredEviction):
    name = "tova"

    def __init__(self, budget: int, head_reduce: str = "mean"):
        if head_reduce not in ("mean", "none"):
            raise ValueError(f"head_reduce must be 'mean' or 'none', got {head_reduce!r}")
        super().__init__(budget)
        self.head_reduce = head_reduce

    probs_rows = 1  # observe reads the newest query's row only

    def observe(self, layer, probs, q):
        last = probs[:, :, -1, :]  # (B, H, L): the newest query's attention, this call's scores
        if self.head_reduce == "mean":
            last = last.mean(dim=1, keepdim=True).expand_as(last)
        return last  # handed to compress (ScoredEviction's), not kept
