"""
StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453).

Rule: keep the first `n_sink` tokens (the "attention sinks" that soak up attention mass the
softmax must put somewhere) and the most recent `budget - n_sink` tokens; drop the middle.
    kept = {positions < n_sink} U {the budget - n_sink newest positions}
Compresses at prefill (a prompt longer than the budget) and at every decode step.

Positions [reposition False]: every token keeps the position it was read at (GPT-2's learned
positions cannot be renumbered). reposition=True is the paper's in-cache positions for rotary
models (Llama, Qwen, Mistral through nanokv.hf): the model sees the kept tokens at their slot
numbers 0..L-1, never a position past the budget, so it can generate past its trained context.
Keys are stored as they were rotated on arrival (at their slot then, `slot`) and turned to their
present slot each time attention reads them:
    key at slot s = rotate(stored key, s - slot)          (nanokv/rope.py; exact when s = slot)
The official code stores un-rotated keys and rotates the whole cache every step; turning the
stored key once by the difference gives the same vectors without keeping a second copy.
"""

import torch

from ..method import ScoredEviction, _check_int, store_part
from ..rope import rotate


class StreamingLLM(ScoredEviction):
    name = "streamingllm"
    needs_probs = False

    def __init__(self, budget: int, n_sink: int = 4, reposition: bool = False):
        budget = _check_int("budget", budget, 1)
        n_sink = _check_int("n_sink", n_sink, 0)
        if n_sink >= budget:
            raise ValueError(f"n_sink ({n_sink}) must be < budget ({budget}): no room for recent tokens")
        if not isinstance(reposition, bool):
            raise TypeError(f"reposition must be True or False, got {reposition!r}")
        super().__init__(budget, n_sink=n_sink, window=budget - n_sink)
        self.reposition, self.evicts_in_place = reposition, not reposition  # repositioning reads slot order

    @classmethod
    def scaled(cls, budget, **kwargs):
        kwargs.setdefault("n_sink", min(4, max(1, budget // 4)) if budget > 1 else 0)
        return cls(budget=budget, **kwargs)

    def check_config(self, config):
        if self.reposition and getattr(config, "inv_freq", None) is None:
            raise ValueError("reposition=True turns kept keys to their slot positions: it needs a rotary model "
                             "with fixed frequencies (Llama, Qwen, Mistral through nanokv.hf); this model's "
                             "positions are learned or length-dependent")

    def init_layer(self, layer, layer_idx):
        if self.reposition:
            layer.add_field("slot", "positions", (), torch.int32)  # the slot a key was rotated at when stored

    def store(self, layer, k, v, pos):
        if not self.reposition:
            return super().store(layer, k, v, pos)
        B, H, T, _ = k.shape  # every head holds the same tokens: the new ones go to slots L .. L + T - 1
        slot = torch.arange(layer.max_len, layer.max_len + T, dtype=torch.int32, device=k.device)
        layer.append(k=k, v=v, pos=pos.expand(B, H, T), slot=slot.expand(B, H, T))

    def gather(self, layer, fresh=None):
        k, v, pos, valid = store_part(layer)  # (B, H, L, D) keys as stored
        if self.reposition:
            now = torch.arange(layer.max_len, dtype=torch.int32, device=k.device)  # (L,) present slots
            k = rotate(k, now - layer.padded("slot"), layer.inv_freq)
        return [(k, v, pos, valid)]

    def score(self, layer):
        # everything outside the protected sinks and window is dropped; score by recency
        return layer.padded("pos", fill=-1).float()  # (B, H, L)
