"""
StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453).

Rule: keep the first `n_sink` tokens (the "attention sinks" that soak up attention mass the
softmax must put somewhere) and the most recent `budget - n_sink` tokens; drop the middle.
    kept = {positions < n_sink} U {the budget - n_sink newest positions}
Compresses at prefill (a prompt longer than the budget) and at every decode step.

Positions: Llama-style models re-number the kept tokens' rotary positions so the model never
sees a position beyond its window. GPT-2's positions are learned and absolute: every token
keeps the position it was read at, so nothing is re-numbered here (and streaming past
block_size is out of scope for this model).
"""

from ..method import ScoredEviction, _check_int


class StreamingLLM(ScoredEviction):
    name = "streamingllm"
    needs_probs = False

    def __init__(self, budget: int, n_sink: int = 4):
        budget = _check_int("budget", budget, 1)
        n_sink = _check_int("n_sink", n_sink, 0)
        if n_sink >= budget:
            raise ValueError(f"n_sink ({n_sink}) must be < budget ({budget}): no room for recent tokens")
        super().__init__(budget, n_sink=n_sink, window=budget - n_sink)

    @classmethod
    def scaled(cls, budget, **kwargs):
        kwargs.setdefault("n_sink", min(4, max(1, budget // 4)) if budget > 1 else 0)
        return cls(budget=budget, **kwargs)

    def score(self, layer):
        # everything outside the protected sinks and window is dropped; score by recency
        return layer.padded("pos", fill=-1).float()  # (B, H, L)
