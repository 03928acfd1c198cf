"""
Eviction + quantization: any method decides what is kept, and what is kept is stored at
`bits` bits (the Scissorhands paper's "2x tokens + 4-bit": at the memory of budget B in fp16,
keep about 2B tokens at 4 bits).

Rule: wrap a method (`inner`: a name from nanokv.METHODS, built with the remaining keyword
arguments, or an instance). The layer's keys and values
become low-bit fields (per-token groups of `group` channels, asymmetric min-max RTN, packed
codes with fp16 scale and zero: nanokv/quant.py); the wrapped method runs unchanged on them:
its scores, windows and evictions see dequantized keys and values. The tokens of the current
call attend at full precision (their stored copies are quantized, but attention during the
call they arrive in uses the exact keys and values), as KIVI does for its newest token.
Defaults: scissorhands, 4 bits, group 32 (head_dim when smaller).

Memory per kept token and head: 2 * (ceil(D * b / 8) + 4 * D / group) bytes + 4 bytes of
position + the wrapped method's state.
"""

import torch

from ..method import LowBitPart, Method, store_part
from ..quant import check_bits, check_group, check_group_saves


class Quantized(Method):
    name = "quantized"
    lossy = True

    def __init__(self, inner="scissorhands", bits: int = 4, group: int | None = None, **inner_kwargs):
        from ..registry import METHODS

        if isinstance(inner, str):
            if inner not in METHODS or inner == self.name:
                raise ValueError(f"unknown method {inner!r}; valid methods: {sorted(set(METHODS) - {self.name})}")
            if METHODS[inner].takes_budget and "budget" not in inner_kwargs:
                raise TypeError(f"quantized(inner={inner!r}) needs budget=N (tokens per head kept by {inner!r}), "
                                f"e.g. METHODS['quantized'](inner={inner!r}, budget=64)")
            method = METHODS[inner](**inner_kwargs)
        elif inner_kwargs or not isinstance(inner, Method):
            raise TypeError("inner must be a method name (with its keyword arguments) or a Method instance")
        else:
            method = inner
        if getattr(method, "reposition", False):  # its keys would be read back unturned
            raise ValueError("quantized storage cannot hold StreamingLLM's repositioned keys (reposition=True)")
        bits = check_bits(bits)
        group = check_group_saves(bits, group)
        self.inner, self.bits, self.group = method, bits, group
        self.budget, self.compresses_at = method.budget, method.compresses_at
        self.needs_probs, self.probs_rows = method.needs_probs, method.probs_rows

    @classmethod
    def scaled(cls, budget, inner="scissorhands", **kwargs):
        from ..registry import METHODS

        return cls(METHODS[inner].scaled(budget), **kwargs)

    def __getattr__(self, name):  # windows, layer budgets, ... of the wrapped method
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def check_config(self, config):
        D = config.n_embd // config.n_head
        check_group(D, self.group or min(32, D))
        self.inner.check_config(config)

    def init_layer(self, layer, layer_idx):
        D = layer.trailing["k"][0]
        for name, kind in (("k", "keys"), ("v", "values")):
            layer.drop_field(name)
            layer.add_quantized_field(name, kind, D, self.bits, self.group or min(32, D), layer.dtype)
        layer.bits = self.bits
        self.inner.init_layer(layer, layer_idx)

    # every hook but gather is the wrapped method's
    def pieces(self, layer, T): return self.inner.pieces(layer, T)  # noqa: E704
    def store(self, layer, k, v, pos): self.inner.store(layer, k, v, pos)  # noqa: E704
    def observe(self, layer, probs, q): return self.inner.observe(layer, probs, q)  # noqa: E704
    def compress(self, layer, scores=None): self.inner.compress(layer, scores)  # noqa: E704

    def gather(self, layer, fresh=None):
        """The stored entries, dequantized, with this call's tokens (fresh) at full precision:
        the newest entries of every head; when each head ends with the same number m of them
        (the usual case), two parts: the packed older entries (the Triton backend reads their
        codes directly, kernel 2) and the m new ones, exact. Between calls: the store, dequantized."""
        if fresh is None:
            return [store_part(layer)]
        fk, fv, first = fresh[0], fresh[1], int(fresh[2][0])
        pos = layer.padded("pos", fill=-1)  # (B, H, L)
        n_new = (pos >= first).sum(dim=-1)  # (B, H)
        m, L = int(n_new.max()), layer.max_len
        if layer.uniform and bool((n_new == m).all()):
            new_pos = pos[:, :, L - m:]
            idx = (new_pos.long() - first)[..., None].expand(-1, -1, -1, fk.size(-1))
            return [LowBitPart(layer, L - m), (fk.gather(2, idx), fv.gather(2, idx), new_pos, None)]
        k, v, pos, valid = store_part(layer)  # (B, H, L, D) dequantized
        new = (pos >= first)[..., None]  # entries of this call
        idx = (pos.long() - first).clamp(0, fk.size(2) - 1)[..., None].expand(-1, -1, -1, k.size(-1))
        k = torch.where(new, fk.gather(2, idx), k)
        v = torch.where(new, fv.gather(2, idx), v)
        return [(k, v, pos, valid)]

    def state_nbytes(self):
        return self.inner.state_nbytes()

    def reset(self):
        self.inner.reset()

    def __repr__(self):
        return f"Quantized({self.inner!r}, bits={self.bits}, group={self.group})"
