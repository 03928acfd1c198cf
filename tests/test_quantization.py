"""Quantization methods in the cache: RTN, KIVI, MiKV, eviction + INT4.
Lossless settings equal the full cache; stored entries dequantize within scale/2; KIVI's
residual schedule; MiKV's one-way demotion; memory matches the papers' formula."""

import math

import pytest
import torch

from nanokv import METHODS, KVCache
from nanokv.methods.mikv import MiKV, balance_factors

from conftest import peaked_model

N_PROMPT, N_TOTAL = 40, 72


def run(model, cache, idx, each_step=None):
    with torch.no_grad():
        out = [model(idx[:, :N_PROMPT], cache=cache)[0]]
        if each_step:
            each_step(cache)
        for t in range(N_PROMPT, idx.size(1)):
            out.append(model(idx[:, t:t + 1], cache=cache)[0])
            if each_step:
                each_step(cache)
    return torch.cat(out, 1)


@pytest.fixture(scope="module")
def setup():
    m = peaked_model()
    idx = torch.randint(0, 256, (2, N_TOTAL), generator=torch.Generator().manual_seed(11))
    ref = run(m, KVCache(m.config), idx)
    with torch.no_grad():  # the full cache itself against a forward pass with no cache
        assert (ref - m(idx)[0]).abs().max() < 1e-5
    return m, idx, ref


@pytest.mark.parametrize("method", [
    lambda: METHODS["kivi"](residual=128),  # a residual longer than the sequence
    lambda: MiKV(rho=1.0, balancer=False),
])
def test_lossless_settings_equal_full(setup, method):
    m, idx, ref = setup
    got = run(m, KVCache(m.config, method()), idx)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("balancer", [False, True])
def test_mikv_identity_quantizer_close_to_full(setup, balancer):
    m, idx, ref = setup
    got = run(m, KVCache(m.config, MiKV(rho=0.2, bits_lo=None, balancer=balancer)), idx)
    diff = (got - ref).abs().max().item()
    print(f"MiKV identity quantizer, balancer={balancer}: max |logits diff| {diff:.3g}")
    assert diff < 1e-5


def test_balancer_keeps_attention_and_shrinks_key_outliers():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    k[..., 3] *= 50  # an outlier key channel
    amax = lambda x: x.abs().amax(dim=2, keepdim=True)  # noqa: E731  per-channel max over tokens
    b = balance_factors(amax(q), amax(k))
    assert torch.allclose((q / b) @ (k * b).transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-4)
    assert (k * b).abs().amax() < k.abs().amax() / 3
    assert torch.equal(balance_factors(amax(q), amax(torch.zeros_like(k))), torch.ones(1, 2, 1, 8))


def test_stored_entries_dequantize_within_half_a_step(setup):
    m, idx, _ = setup
    full, rtn = KVCache(m.config), KVCache(m.config, "rtn", bits=3)
    run(m, full, idx)
    run(m, rtn, idx)
    q = rtn.layers[0].segments["q"]  # layer 0's keys depend on the tokens alone
    k_ref = full.layers[0].padded("k")
    err = (q.padded("k") - k_ref).abs()  # (B, H, L, D); one group of min(32, D) = 16 channels
    bound = q.padded("k.scale").float() / 2 + 1e-3 * k_ref.abs().amax()  # (B, H, L, 1 group)
    print(f"RTN 3-bit keys: max err {err.max():.4g}, max scale/2 {q.padded('k.scale').float().max() / 2:.4g}")
    assert (err <= bound).all()


def test_kivi_residual_schedule_and_precision(setup):
    m, idx, _ = setup
    R, G = 16, 8
    seen = []

    def check(cache):
        n = cache.seq_len
        layer = cache.layers[1]
        assert layer.max_len == n % R  # key residual
        assert layer.segments["vr"].max_len == min(n, R)  # value residual
        assert layer.segments["kq"].max_len == (n - n % R) // G
        pos, bits = cache.kept_precision(1, 1, 2)
        assert pos.tolist() == list(range(n))
        seen.append(n)
        assert bits.tolist() == [2] * (n - n % R) + [32] * (n % R)  # key precision by position
        assert cache.lengths(1).eq(n).all()

    run(m, KVCache(m.config, "kivi", bits=2, group=G, residual=R), idx, check)
    assert seen == list(range(N_PROMPT, N_TOTAL + 1))


def test_mikv_demotion_is_one_way_and_nothing_is_dropped(setup):
    m, idx, _ = setup
    history = {}

    def check(cache):
        n = cache.seq_len
        assert cache.lengths(0).eq(n).all()
        pos, bits = cache.kept_precision(0, 0, 1)
        assert pos.tolist() == list(range(n))
        hi = int((bits == 32).sum())
        assert hi == math.ceil(0.25 * n)
        for p, b in zip(pos.tolist(), bits.tolist()):
            assert b <= history.get(p, 32)  # precision never rises
            history[p] = b

    run(m, KVCache(m.config, MiKV(rho=0.25, bits_lo=3)), idx, check)
    assert min(history.values()) == 3


class _CompactingMiKV(MiKV):
    """MiKV taking the general path at every call: rank the high tier (top_k_mask) and compact it."""

    def demote(self, layer, n_seen):
        n_new, layer.n_new = layer.n_new, 0  # not seen as a one-token step
        try:
            super().demote(layer, n_seen)
        finally:
            layer.n_new = n_new


def test_mikv_in_place_demotion_equals_compacting():
    """A decode step demotes one token per head by argmin and writes the newest token into its
    high-tier slot (Ragged.evict_in_place); ranking and compacting at every step chooses the same
    tokens: equal precisions of every position after every call (a 3-token chunk in the middle
    puts the slots back in position order first), logits within float reassociation (attention
    reads the high tier in another order), and the same high tier once sorted (F within 1e-5)."""
    model = peaked_model(seed=5)
    idx = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(5))
    calls = [(0, 36)] + [(t, t + 1) for t in range(36, 50)] + [(50, 53)] + [(t, t + 1) for t in range(53, 70)]
    runs = []
    for cls in (MiKV, _CompactingMiKV):
        cache = KVCache(model.config, cls(rho=0.3, bits_lo=2))
        logits, kept = [], []
        with torch.no_grad():
            for a, b in calls:
                logits.append(model(idx[:, a:b], cache=cache)[0])
                kept.append([[t.tolist() for t in cache.kept_precision(l, r, h)]
                             for l in range(2) for r in range(2) for h in range(4)])
        runs.append((logits, kept, cache))
    (l1, k1, c1), (l2, k2, c2) = runs
    assert k1 == k2
    assert {b for step in k1 for head in step for b in head[1]} == {2, 32}  # both tiers in use
    diff = max((a - b).abs().max().item() for a, b in zip(l1, l2))
    print(f"mikv: in-place demotion vs compacting, max logit diff {diff:.2g}")
    assert diff <= 1e-5
    hi1, hi2 = c1.layers[0].segments["hi"], c2.layers[0].segments["hi"]
    assert not hi1.ordered and hi2.ordered  # the slots really were reused out of order
    hi1.sort_by_position()
    for name in ("k", "v", "pos"):
        assert torch.equal(hi1.padded(name), hi2.padded(name)), name
    assert (hi1.padded("acc") - hi2.padded("acc")).abs().max() <= 1e-5  # F sums the reordered probabilities


def test_quantized_eviction_keeps_the_same_set_at_8_bits(setup):
    """Wrapping H2O changes storage, not the policy: at 8 bits the kept sets match plain H2O
    on this peaked model, and the prefill (full-precision current tokens) is exact."""
    m, idx, ref = setup
    plain, wrapped = KVCache(m.config, "h2o", budget=20), KVCache(m.config, "quantized", inner="h2o", budget=20, bits=8)
    a, b = run(m, plain, idx), run(m, wrapped, idx)
    assert torch.equal(b[:, :N_PROMPT], a[:, :N_PROMPT])
    agree = sum(plain.kept_positions(l, r, h).tolist() == wrapped.kept_positions(l, r, h).tolist()
                for l in range(2) for r in range(2) for h in range(4))
    assert agree >= 14  # of 16 heads
    assert wrapped.memory_breakdown()["keys"] < plain.memory_breakdown()["keys"] / 3


@pytest.mark.parametrize("name, kw", [
    ("rtn", dict(bits=2)), ("rtn", dict(bits=3, group=8)), ("rtn", dict(bits=4)),
    ("kivi", dict(bits=2, group=8, residual=16)), ("kivi", dict(bits=4, group=16, residual=32)),
    ("mikv", dict(rho=0.2, bits_lo=2)), ("mikv", dict(rho=0.5, bits_lo=3, balancer=False)),
    ("mikv", dict(rho=0.2, bits_lo=4, bits_hi=8)),
    ("quantized", dict(inner="h2o", budget=24, bits=4)),
])
def test_memory_matches_the_formula(name, kw):
    """keys + values + metadata = sum over stored tokens of D * (b + 32 / g) bits per element
    (b + o with o = 32/g for fp16 scale and zero), and D * 16 bits for model-dtype (fp16) tokens."""
    m = peaked_model().half()
    idx = torch.randint(0, 256, (1, N_TOTAL), generator=torch.Generator().manual_seed(3))
    cache = KVCache(m.config, name, grow_by=1, **kw)
    run(m, cache, idx)
    D, n, expect = 16, N_TOTAL, 0.0

    def size(tokens, b, g):  # bytes of `tokens` keys (or values) of one head, b bits (16 = fp16)
        return tokens * D * (16 if b == 16 else b + 32 / g) / 8

    for layer in range(2):
        for h in range(4):
            if name == "kivi":
                R, G, b = kw["residual"], kw["group"], kw["bits"]
                expect += size(n - n % R, b, G) + size(n % R, 16, G)  # keys: chunks, then the residual
                expect += size(max(0, n - R), b, G) + size(min(n, R), 16, G)  # values: FIFO residual
                continue
            _, bits = cache.kept_precision(layer, 0, h)
            g = 8 if name == "mikv" and kw.get("balancer", True) else kw.get("group", 16)
            expect += sum(2 * size(1, b, g) for b in bits.tolist())
    report = cache.compression_report()
    print(f"{name} {kw}: {report['bits_per_element']:.3f} bits/element, {report['fraction_of_fp16']:.3f} of fp16")
    assert report["kv_bytes"] == expect


def test_mikv_size_formula_against_rho():
    """size ~= rho (b_hi + o_hi)/16 + (1 - rho)(b_lo + o_lo)/16 of an fp16 cache."""
    m = peaked_model(block_size=256).half()
    idx = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(4))
    for rho, b_lo in ((0.2, 2), (0.25, 3), (0.5, 4)):
        cache = KVCache(m.config, MiKV(rho=rho, bits_lo=b_lo), grow_by=1)
        with torch.no_grad():
            m(idx, cache=cache)
        n_hi = math.ceil(rho * 200) / 200
        formula = n_hi * 16 / 16 + (1 - n_hi) * (b_lo + 32 / 8) / 16
        assert cache.compression_report()["fraction_of_fp16"] == pytest.approx(formula, rel=1e-3)


@pytest.mark.parametrize("name", ["rtn", "kivi", "mikv", "quantized"])
def test_scratch_reuse_across_layers_changes_nothing(monkeypatch, name):
    """Every layer of a forward pass dequantizes into the same scratch buffer (nanokv.method.Scratch);
    the logits are bit-identical to fresh buffers per layer, and nothing is held after a call."""
    from nanokv.method import Scratch

    model = peaked_model(seed=5, n_layer=3)
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    def run():
        kw = {"residual": 16} if name == "kivi" else {}
        method = METHODS[name].scaled(16) if name == "quantized" else METHODS[name](**kw)
        cache = KVCache(model.config, method)
        out = []
        with torch.no_grad():
            for a, b in [(0, 24)] + [(t, t + 1) for t in range(24, 40)]:
                out.append(model(idx[:, a:b], cache=cache)[0])
                assert cache._scratch.buf is None  # dropped after the last layer
        return torch.cat(out, dim=1)

    shared = run()
    scratch = Scratch()  # a buffer taken under inference mode is not handed out outside it (it would be read-only)
    with torch.inference_mode():
        held = scratch.take(8, torch.float32, "cpu")
    assert held.is_inference() and not scratch.take(8, torch.float32, "cpu").is_inference()
    monkeypatch.setattr(Scratch, "take", lambda self, n, dtype, device: torch.empty(n, dtype=dtype, device=device))
    assert torch.equal(shared, run())
