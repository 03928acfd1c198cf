"""
The tensor-level API: what a nanokv method decides on *your* tensors, without nanokv's model.

    from nanokv.api import decide
    d = decide("h2o", q, k, v, budget=64)      # q (B, H, T, D), k, v (B, H_kv, T, D) of one layer
    d.kept      # (B, H, T) bool: the tokens the layer still holds after the call(s)
    d.bits      # (B, H, T) int: the bits each held token is stored at (0 = evicted)
    d.keys, d.values   # (B, H, T, D): what attention reads for each held token (merged,
                       # dequantized), zero where evicted
    d.output    # (B, H, T, D): the layer's attention output over the calls

Use it to check another implementation (vLLM, kvpress, a kernel) against nanokv on the same
tensors: take the queries, keys and values of one layer of your model, run both, compare the
kept sets (and merged keys, quantized tokens). Any head count and head dim; one layer at a
time; rotary embeddings already applied to q and k (nanokv attends by the tokens' original
positions, causally). Grouped-query layers: k and v with fewer heads than q (H_kv dividing H);
the decision is then per key-value head, (B, H_kv, T), judged by the mean attention of the
query heads of its group (the rule nanokv.hf uses on Llama, Qwen and Mistral).

`decide` feeds the tensors through the very path nanokv's model uses (a one-layer KVCache:
store, attend, the method's decision, apply it), so the decisions are nanokv's by
construction, not a second implementation; tests/test_api.py checks them against the model's
cache and against the rules written out by hand. `chunks` splits the T tokens into successive
calls: [T] (default) is one prefill in which the method sees every query, question-aware;
[n, T - n] prefills n tokens and then feeds the rest (question-agnostic); [n, 1, 1, ...]
decodes one token per call. Methods whose budget depends on the layer (PyramidKV) take
`layer` and `n_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import CacheShape, KVCache
from .method import Method


@dataclass
class Decision:
    kept: torch.Tensor  # (B, H, T) bool (H: the key-value heads)
    bits: torch.Tensor  # (B, H, T) int32, 0 where evicted
    keys: torch.Tensor  # (B, H, T, D) held keys (as attention reads them), 0 where evicted
    values: torch.Tensor  # (B, H, T, D)
    output: torch.Tensor  # (B, H, T, D) attention output of every call, concatenated
    memory_bytes: int  # what the layer's cache allocates after the last call
    cache: KVCache  # the one-layer cache, for more introspection


def decide(method, q, k, v, *, chunks=None, layer: int = 0, n_layers: int = 1, **method_kwargs) -> Decision:
    """Run `method` (a name from nanokv.METHODS built with method_kwargs, or a Method) on one
    layer's queries, keys and values (B, H, T, D), fed as `chunks` (sizes summing to T)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, T, D) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, H, T, D = q.shape
    Hkv = k.size(1)
    if k.shape != v.shape or k.shape != (B, Hkv, T, D) or H % Hkv:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, H_kv, T, D) with H_kv dividing H, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    chunks = [T] if chunks is None else [int(c) for c in chunks]
    if any(c < 1 for c in chunks) or sum(chunks) != T:
        raise ValueError(f"chunks must be positive sizes summing to T={T}, got {chunks}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, n_layers={n_layers}), got {layer}")
    config = CacheShape(n_layer=n_layers, n_head=H, head_dim=D, n_kv_head=Hkv, block_size=T)
    if not isinstance(method, (str, Method)):
        raise TypeError(f"method must be a name or a nanokv.Method, got {type(method).__name__}")
    cache = KVCache(config, method, **method_kwargs)
    outs, start = [], 0
    with torch.no_grad():
        for c in chunks:
            sl = slice(start, start + c)  # only layer `layer` of the cache is used
            outs.append(cache.attend(layer, q[:, :, sl], k[:, :, sl], v[:, :, sl]))
            start += c
    return _read(cache, layer, torch.cat(outs, dim=2), T, D)


def _read(cache, layer_idx, output, T, D):
    """The decision, read back from the cache: kept tokens, their bits, held keys and values."""
    st = cache.layers[layer_idx]
    B, H = st.batch, st.heads
    kept = torch.zeros(B, H, T, dtype=torch.bool, device=output.device)
    bits = torch.zeros(B, H, T, dtype=torch.int32, device=output.device)
    for b in range(B):
        for h in range(H):
            pos, bt = cache.kept_precision(layer_idx, b, h)
            kept[b, h, pos] = True
            bits[b, h, pos] = bt.to(torch.int32)
    keys = torch.zeros(B, H, T, D, dtype=output.dtype, device=output.device)
    values = torch.zeros_like(keys)
    for pk, pv, ppos, pvalid in cache.method.gather(st):  # what attention reads, dequantized
        ok = ppos >= 0 if pvalid is None else pvalid & (ppos >= 0)  # (B, H, L) real entries
        b, h, i = ok.nonzero(as_tuple=True)
        keys[b, h, ppos[b, h, i].long()] = pk[b, h, i].to(keys.dtype)
        values[b, h, ppos[b, h, i].long()] = pv[b, h, i].to(keys.dtype)
    return Decision(kept, bits, keys, values, output, cache.memory_bytes(), cache)
