"""nanokv.api.decide: a method's decision on tensors that do not come from nanokv's model.

1. Random tensors shaped like a large model's layer (32 heads of dim 128): the kept sets of the
   eviction rules written out by hand here (softmax, column sums, pooling, norms) equal decide's.
2. Tensors captured from nanokv's model: decide on one layer's q, k, v gives, for every method,
   the kept tokens and their bits the model's own cache holds for that layer.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_method, peaked_model
from nanokv import METHODS, KVCache
from nanokv.api import decide


@pytest.fixture(scope="module")
def big_layer():
    g = torch.Generator().manual_seed(7)
    B, H, T, D = 1, 32, 160, 128
    q = torch.randn(B, H, T, D, generator=g) * 2  # peaked attention: no near-ties to decide
    k = torch.randn(B, H, T, D, generator=g)
    v = torch.randn(B, H, T, D, generator=g)
    return q, k, v


def causal_probs(q, k):
    T, D = q.size(2), q.size(3)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return att.softmax(-1)  # (B, H, T, T)


def keep_top(score, n_keep, protected):
    """(B, H, T) bool: the protected tokens plus the n_keep best others by score, equal scores
    going to the more recent token (max pooling makes plateaus of equal scores)."""
    keep = protected.clone()
    for b in range(score.size(0)):
        for h in range(score.size(1)):
            s = score[b, h].tolist()
            others = [j for j in range(len(s)) if not protected[b, h, j]]
            for j in sorted(others, key=lambda j: (s[j], j), reverse=True)[:n_keep]:
                keep[b, h, j] = True
    return keep


def recent(T, n, shape):
    return (torch.arange(T) >= T - n).expand(shape)


def test_h2o_by_hand(big_layer):
    q, k, v = big_layer
    T, budget, window = q.size(2), 48, 16
    acc = causal_probs(q, k).sum(dim=2)  # each token's attention summed over every query
    want = keep_top(acc, budget - window, recent(T, window, acc.shape))
    got = decide("h2o", q, k, v, budget=budget, recent=window).kept
    print("h2o: heads differing", (got != want).any(-1).sum().item())
    assert torch.equal(got, want)


def test_snapkv_by_hand(big_layer):
    q, k, v = big_layer
    T, budget, w, kernel = q.size(2), 48, 8, 7
    s = causal_probs(q, k)[:, :, T - w:, : T - w].sum(dim=2)  # the window's queries on earlier tokens
    s = F.max_pool1d(s.flatten(0, 1)[:, None], kernel, stride=1, padding=kernel // 2).view(1, 32, T - w)
    want = keep_top(F.pad(s, (0, w)), budget - w, recent(T, w, (1, 32, T)))
    got = decide("snapkv", q, k, v, budget=budget, window=w, kernel=kernel).kept
    assert torch.equal(got, want)


def test_tova_knorm_streamingllm_by_hand(big_layer):
    q, k, v = big_layer
    T, budget = q.size(2), 40
    last = causal_probs(q, k)[:, :, -1].mean(dim=1, keepdim=True).expand(1, 32, T)  # heads averaged
    none = torch.zeros(1, 32, T, dtype=torch.bool)
    assert torch.equal(decide("tova", q, k, v, budget=budget).kept, keep_top(last, budget, none))
    assert torch.equal(decide("knorm", q, k, v, budget=budget).kept, keep_top(-k.norm(dim=-1), budget, none))
    sink = (torch.arange(T) < 4).expand(1, 32, T)
    assert torch.equal(decide("streamingllm", q, k, v, budget=budget, n_sink=4).kept,
                       sink | recent(T, budget - 4, (1, 32, T)))


def test_quantizer_codes_by_hand(big_layer):
    """RTN at 4 bits, groups of 32 along the head dim: every held key is the min-max round trip."""
    q, k, v = big_layer
    d = decide("rtn", q, k, v, bits=4, group=32)
    x = k.view(*k.shape[:3], 4, 32)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).half().float()
    zero = lo.half().float()
    want = (((x - zero) / scale).round().clamp(0, 15) * scale + zero).view_as(k)
    err = (d.keys - want).abs().max().item()
    print(f"rtn keys vs hand-written round trip: max diff {err:.2e}")
    assert d.bits.eq(4).all() and err < 1e-5


def test_decide_checks_its_input(big_layer):
    q, k, v = big_layer
    with pytest.raises(ValueError, match="H_kv dividing H"):
        decide("h2o", q, k[:, :5], v[:, :5], budget=8)  # 5 key-value heads cannot serve 32 query heads
    with pytest.raises(ValueError, match="H_kv dividing H"):
        decide("h2o", q, k[:, :, :8], v[:, :, :8], budget=8)
    with pytest.raises(ValueError, match="chunks"):
        decide("h2o", q, k, v, budget=8, chunks=[10, 10])
    with pytest.raises(ValueError, match="layer"):
        decide("pyramidkv", q, k, v, budget=8, layer=2, n_layers=2)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_decide_equals_the_model_cache(name):
    """One layer's q, k, v captured from the model, prefill then three decode steps: decide
    reproduces the kept tokens and their bits of the model's own cache, and the layer's output."""
    model = peaked_model(seed=3)
    L, T, budget = model.config.n_layer, 48, 20
    seen = []
    cache = KVCache(model.config, make_method(name, budget))
    attend = cache.attend

    def record(layer_idx, q, k, v):
        out = attend(layer_idx, q, k, v)
        seen.append((layer_idx, q, k, v, out))
        return out

    cache.attend = record
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, cache=cache)
        for t in range(3):
            model(ids[:, t:t + 1], cache=cache)
    for layer in range(L):
        calls = [c for c in seen if c[0] == layer]
        q, k, v = (torch.cat([c[i] for c in calls], dim=2) for i in (1, 2, 3))
        d = decide(make_method(name, budget), q, k, v, chunks=[T, 1, 1, 1], layer=layer, n_layers=L)
        for h in range(model.config.n_head):
            pos, bits = cache.kept_precision(layer, 0, h)
            assert torch.equal(d.kept[0, h].nonzero().flatten(), pos), (name, layer, h)
            assert torch.equal(d.bits[0, h, pos], bits.to(torch.int32)), (name, layer, h)
        out = torch.cat([c[4] for c in calls], dim=2)
        assert torch.equal(d.output, out), (name, layer, (d.output - out).abs().max().item())


def test_readme_example_runs():
    """The README's worked example ("Check your implementation against nanokv") runs as written."""
    import os
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = text.split("## Check your implementation against nanokv")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {}
    exec(compile(code, "README.md", "exec"), env)
    assert env["d"].kept.sum(-1).eq(256).all()
