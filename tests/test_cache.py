"""The cache contract, for every registered method, plus the ragged storage it rests on."""

import pytest
import torch

from nanokv import METHODS, KVCache, ScoredEviction, register
from nanokv.cache import ProbStats
from nanokv.ragged import Ragged

from conftest import make_method, peaked_model, walk_tensor_bytes

ALL = sorted(METHODS)


def run(model, cache, idx, n_prompt):
    """Prefill idx[:, :n_prompt], then decode the rest one token at a time; return all logits."""
    with torch.no_grad():
        out = [model(idx[:, :n_prompt], cache=cache)[0]]
        for t in range(n_prompt, idx.size(1)):
            out.append(model(idx[:, t:t + 1], cache=cache)[0])
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", ALL)
def test_budget_that_keeps_everything_equals_full(name):
    if METHODS[name].lossy:
        pytest.skip("a quantization method: its lossless settings are tested in test_quantization.py")
    m = peaked_model()
    idx = torch.randint(0, 256, (2, 72), generator=torch.Generator().manual_seed(0))
    ref = run(m, KVCache(m.config, "full"), idx, 40)  # prefill 40, then 32 decode steps
    with torch.no_grad():  # the yardstick itself against a forward pass with no cache at all
        uncached = m(idx)[0]
    assert (ref - uncached).abs().max() < 1e-5, f"full cache vs uncached: {(ref - uncached).abs().max():.3g}"
    cache = KVCache(m.config, make_method(name, budget=72))
    got = run(m, cache, idx, 40)
    assert torch.equal(got, ref), f"{name}: max diff {(got - ref).abs().max()}"
    assert cache.kept_positions(1, 1, 3).tolist() == list(range(72))


@pytest.mark.parametrize("name", ALL)
def test_memory_bytes_is_what_is_held(name):
    m = peaked_model()
    cache = KVCache(m.config, make_method(name, budget=24))
    run(m, cache, torch.randint(0, 256, (2, 50)), 30)
    # against an independent walk of every tensor the cache holds (not the breakdown it sums)
    assert cache.memory_bytes() == walk_tensor_bytes(cache), (cache.memory_bytes(), walk_tensor_bytes(cache))
    assert cache.memory_breakdown()["positions"] > 0 and cache.memory_breakdown()["keys"] > 0


@pytest.mark.parametrize("grow_by", [1, 8, 64])
def test_full_cache_memory_exact(grow_by):
    m = peaked_model()  # 2 layers, 4 heads, head dim 16, fp32
    cache = KVCache(m.config, grow_by=grow_by)
    assert cache.memory_bytes() == 0
    run(m, cache, torch.randint(0, 256, (3, 20)), 17)  # prefill 17, decode 3
    per_layer_kv = 3 * 4 * 20 * 16 * 4
    b = cache.memory_breakdown()
    assert b["keys"] == b["values"] == 2 * per_layer_kv
    assert b["positions"] == 2 * (3 * 4 * 20 * 4 + 3 * 4 * 8)  # int32 positions + int64 lengths
    assert b["quant_meta"] == b["method_state"] == 0
    slots = grow_by * -(-20 // grow_by)  # allocated token slots per head
    assert b["padding"] == 2 * 3 * 4 * (slots - 20) * (2 * 16 * 4 + 4)
    assert cache.memory_bytes() == walk_tensor_bytes(cache)


def test_knorm_memory_shrinks_with_budget():
    m = peaked_model()
    idx = torch.randint(0, 256, (1, 64))
    sizes = {}
    for budget in (8, 16, 32):
        cache = KVCache(m.config, "knorm", budget=budget)
        run(m, cache, idx, 64)
        sizes[budget] = cache.memory_bytes()
        assert sizes[budget] == 2 * (4 * budget * (2 * 16 * 4 + 4) + 4 * 8)


def test_scored_eviction_keeps_protected_and_top_scores():
    m = peaked_model()
    cache = KVCache(m.config, "knorm", budget=12, n_sink=2, window=3)
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m(idx[:, :30], cache=cache)
        for t in range(30, 40):
            m(idx[:, t:t + 1], cache=cache)
            for layer in range(2):
                assert (cache.lengths(layer) == 12).all()
                for b in range(2):
                    for h in range(4):
                        pos = cache.kept_positions(layer, b, h).tolist()
                        assert pos == sorted(pos)
                        assert pos[:2] == [0, 1] and pos[-3:] == [t - 2, t - 1, t]


def test_tie_break_prefers_recent():
    class Flat(ScoredEviction):
        name = "flat-test"

        def score(self, layer):
            return torch.zeros(layer.batch, layer.heads, layer.max_len)

    m = peaked_model()
    cache = KVCache(m.config, Flat(budget=5))
    run(m, cache, torch.randint(0, 256, (1, 20)), 20)
    assert cache.kept_positions(0, 0, 0).tolist() == [15, 16, 17, 18, 19]


def test_clone_and_reset():
    m = peaked_model()
    idx = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    cache = KVCache(m.config, "knorm", budget=16)
    with torch.no_grad():
        m(idx[:, :30], cache=cache)
        twin = cache.clone()
        a = m(idx[:, 30:], cache=cache)[0]
        b = m(idx[:, 30:], cache=twin)[0]  # same context, same question: same answer
    assert torch.equal(a, b)
    assert cache.seq_len == 40 and twin.seq_len == 40
    cache.reset()
    assert cache.seq_len == 0 and cache.memory_bytes() == 0
    fresh = KVCache(m.config, "knorm", budget=16)
    with torch.no_grad():
        assert torch.equal(m(idx, cache=cache)[0], m(idx, cache=fresh)[0])


def test_batch_rows_independent():
    m = peaked_model()
    idx = torch.randint(0, 256, (3, 50), generator=torch.Generator().manual_seed(5))
    batch = run(m, KVCache(m.config, "knorm", budget=10), idx, 30)
    for i in range(3):
        alone = run(m, KVCache(m.config, "knorm", budget=10), idx[i:i + 1], 30)
        assert (batch[i:i + 1] - alone).abs().max() < 1e-5


def test_register_and_hello_world_method():
    @register
    class Newest(ScoredEviction):
        name = "newest-test"

        def score(self, layer):
            return layer.padded("pos", fill=-1).float()

    try:
        m = peaked_model()
        cache = KVCache(m.config, "newest-test", budget=6)
        run(m, cache, torch.randint(0, 256, (1, 20)), 15)
        assert cache.kept_positions(1, 0, 2).tolist() == list(range(14, 20))
        with pytest.raises(ValueError, match="already registered"):
            register(type("Other", (ScoredEviction,), {"name": "newest-test"}))
    finally:
        METHODS.pop("newest-test")


# ----------------------------------------------------------------------------- ragged storage
def test_ragged_append_keep_roundtrip():
    r = Ragged(2, 3, "cpu")
    r.add_field("x", "keys", (2,), torch.float32)
    r.add_field("s", "method_state", (), torch.float32, fill=7.0)
    x = torch.arange(2 * 3 * 5 * 2, dtype=torch.float32).view(2, 3, 5, 2)
    r.append(x=x)
    assert r.uniform and torch.equal(r.padded("x"), x)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[0, 0, [1, 3]] = True
    mask[0, 1, :] = True
    mask[1, 2, 4] = True
    r.keep(mask)
    assert r.lengths.tolist() == [[2, 5, 0], [0, 0, 1]] and not r.uniform
    y = -torch.ones(2, 3, 2, 2)
    r.append(x=y)  # ragged append: old rows then the new ones, per head
    assert r.lengths.tolist() == [[4, 7, 2], [2, 2, 3]]
    p = r.padded("x", fill=float("nan"))
    assert torch.equal(p[0, 0, :4], torch.cat([x[0, 0, [1, 3]], y[0, 0]]))
    assert torch.equal(p[1, 2, :3], torch.cat([x[1, 2, [4]], y[1, 2]]))
    assert torch.isnan(p[1, 0, 2:]).all()
    assert (r.padded("s")[r.valid_mask()] == 7.0).all()
    assert r.nbytes()["keys"] == int(r.lengths.sum()) * 2 * 4


def test_ragged_drop_oldest_in_place_equals_keep():
    """drop_oldest(1) on a uniform store (KIVI's value residual at a decode step) moves the entries
    down a slot in the same buffers, one spare slot left; keep() of the same mask compacts. Same
    entries in the same order at every step; n > 1 compacts exactly."""
    a, b = Ragged(2, 3, "cpu", grow_by=4), Ragged(2, 3, "cpu", grow_by=4)
    for r in (a, b):
        r.add_field("x", "values", (2,), torch.float32)
    x = torch.randn(2, 3, 9, 2, generator=torch.Generator().manual_seed(0))
    a.append(x=x[:, :, :5]), b.append(x=x[:, :, :5])
    for t in range(5, 9):
        a.append(x=x[:, :, t:t + 1]), b.append(x=x[:, :, t:t + 1])
        buf = a.fields["x"].data_ptr()
        a.drop_oldest(1)
        mask = torch.ones(2, 3, b.max_len, dtype=torch.bool)
        mask[:, :, 0] = False
        b.keep(mask)
        assert torch.equal(a.padded("x"), b.padded("x")) and torch.equal(a.padded("x"), x[:, :, t - 4:t + 1])
        assert a.capacity == a.max_len + 1 and b.capacity == b.max_len  # one spare slot vs none
        assert t == 5 or a.fields["x"].data_ptr() == buf  # after the first step: no new buffer
    a.drop_oldest(2)
    assert torch.equal(a.padded("x"), x[:, :, 6:9]) and a.capacity == 3 and a.nbytes()["padding"] == 0


def test_ragged_spare_rows():
    """Ragged heads own runs of rows: appends write into each head's spare rows; when a head is
    full every head moves (one copy) into a run with grow_by - 1 spare rows; padded, flat, head_rows
    and set_padded see only the entries; nbytes counts the spare rows as padding; keep makes the
    store exact again."""
    r = Ragged(1, 3, "cpu", grow_by=3)
    r.add_field("x", "keys", (2,), torch.float32)
    x = torch.randn(1, 3, 4, 2, generator=torch.Generator().manual_seed(0))
    r.append(x=x)
    r.keep(torch.tensor([[[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0]]], dtype=torch.bool))
    heads = [list(x[0, 0]), [x[0, 1, 0]], [x[0, 2, 1], x[0, 2, 2]]]
    rows = []
    for step in range(4):
        y = torch.full((1, 3, 1, 2), float(step))
        r.append(x=y)
        for h in range(3):
            heads[h].append(y[0, h, 0])
        rows.append(r.fields["x"].shape[0])
        want = [torch.stack(e) for e in heads]
        assert r.lengths.tolist() == [[len(e) for e in heads]]
        assert all(torch.equal(a, b) for a, b in zip(r.head_rows("x"), want))
        assert all(torch.equal(r.padded("x")[0, h, :len(heads[h])], want[h]) for h in range(3))
        assert torch.equal(r.flat("x"), torch.cat(want))
        N = sum(map(len, heads))
        assert r.nbytes()["keys"] == N * 8 and r.nbytes()["padding"] == (rows[-1] - N) * 8
    assert rows == [7 + 9, 16, 16, 16 + 9]  # runs of 5+2, 2+2, 3+2 rows; then full: 8+2, 5+2, 6+2
    r.set_padded("x", r.padded("x") * 2)
    assert torch.equal(r.flat("x"), 2 * torch.cat([torch.stack(e) for e in heads]))
    r.keep(r.valid_mask())
    assert r.fields["x"].shape[0] == N and r.nbytes()["padding"] == 0


def test_ragged_attention_matches_per_head_loop():
    """Attention over ragged heads equals attention computed head by head on their own entries."""
    from nanokv.cache import reference_attention

    g = torch.Generator().manual_seed(0)
    r = Ragged(1, 2, "cpu")
    r.add_field("k", "keys", (4,), torch.float32)
    r.add_field("v", "values", (4,), torch.float32)
    r.add_field("pos", "positions", (), torch.int32)
    r.append(k=torch.randn(1, 2, 6, 4, generator=g), v=torch.randn(1, 2, 6, 4, generator=g),
             pos=torch.arange(6, dtype=torch.int32).expand(1, 2, 6))
    mask = torch.tensor([[[1, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1]]], dtype=torch.bool)
    r.keep(mask)
    q = torch.randn(1, 2, 1, 4, generator=g)
    out, probs = reference_attention(q, r.padded("k"), r.padded("v"), torch.tensor([6]),
                                     r.padded("pos", fill=-1), r.valid_mask())
    for h in range(2):
        n = int(r.lengths[0, h])
        k, v = r.padded("k")[0, h, :n], r.padded("v")[0, h, :n]
        p = torch.softmax((q[0, h] @ k.T) / 2.0, -1)
        assert torch.allclose(out[0, h], p @ v, atol=1e-6)
        assert torch.allclose(probs[0, h, :, :n], p, atol=1e-6) and (probs[0, h, :, n:] == 0).all()


@pytest.mark.parametrize("T, G", [(1, 1), (3, 1), (1, 2), (3, 2)])
def test_ragged_attention_equals_attention_over_the_padded_heads(T, G):
    """ragged_attention (one head at a time over views of the flat store, what the cache runs for a
    layer whose heads differ in length) against reference_attention over the padded copy with its
    validity mask: decode and a 3-token piece, multi-head and grouped-query (G query heads per
    stored head), out and probs within 1e-6, probs 0 at padded slots."""
    from nanokv.cache import ragged_attention, reference_attention
    from nanokv.method import RaggedPart, store_part

    g = torch.Generator().manual_seed(T + 10 * G)
    B, H, L, D = 2, 3, 12, 8
    r = Ragged(B, H, "cpu", grow_by=4)
    for name, kind in (("k", "keys"), ("v", "values")):
        r.add_field(name, kind, (D,), torch.float32)
    r.add_field("pos", "positions", (), torch.int32)
    r.append(k=torch.randn(B, H, L, D, generator=g), v=torch.randn(B, H, L, D, generator=g),
             pos=torch.arange(L, dtype=torch.int32).expand(B, H, L))
    r.keep(torch.rand(B, H, L, generator=g) < 0.6)
    r.append(k=torch.randn(B, H, T, D, generator=g), v=torch.randn(B, H, T, D, generator=g),
             pos=torch.arange(L, L + T, dtype=torch.int32).expand(B, H, T))  # this piece: into spare rows
    part = store_part(r)
    assert isinstance(part, RaggedPart) and not r.uniform
    q, q_pos = torch.randn(B, G * H, T, D, generator=g), torch.arange(L, L + T)
    out, probs = ragged_attention(q, part, q_pos)
    ref_out, ref_probs = reference_attention(q, r.padded("k"), r.padded("v"), q_pos, r.padded("pos", fill=-1),
                                             r.valid_mask())
    diff = max((out - ref_out).abs().max().item(), (probs - ref_probs).abs().max().item())
    print(f"T={T} G={G}: ragged vs padded attention, max diff {diff:.2g}")
    assert diff <= 1e-6 and (probs[~r.valid_mask()[:, :, None, :].expand_as(probs)] == 0).all()
    assert torch.equal(ragged_attention(q, part, q_pos, with_probs=False)[0], out)


def test_prefill_only_methods_get_no_probabilities_after_their_first_call():
    """compresses_at == "prefill" (SnapKV's family) means the layer's first call only: the cache
    builds probabilities for that call and none after (decode steps then cost what the full cache's
    do); the outputs are those of a run that builds them every time."""
    model, seen = peaked_model(), []

    class Spy(METHODS["adakv"]):
        def observe(self, layer, probs, q):
            seen.append(None if probs is None else tuple(probs.shape))
            return super().observe(layer, probs, q)

    class Always(Spy):
        compresses_at = "prefill+decode"  # (so the cache builds probabilities at every call)

    idx = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = []
    for cls in (Spy, Always):
        seen.clear()
        cache = KVCache(model.config, cls(budget=10, window=2))
        with torch.no_grad():
            logits.append(torch.cat([model(idx[:, :20], cache=cache)[0]] +
                                    [model(idx[:, t:t + 1], cache=cache)[0] for t in range(20, 24)], 1))
        n = model.config.n_layer
        assert all(s is not None for s in seen[:n]) and len(seen) == 5 * n
        assert all(s is None for s in seen[n:]) == (cls is Spy)
    assert torch.equal(logits[0], logits[1])


def test_reference_attention_output_does_not_depend_on_probs_and_matches_explicit_softmax():
    """out is the same tensor with and without probs (methods that skip them stay bit-identical to
    those that read them), equals softmax(q k^T / sqrt(D) + causal mask) v in fp64 to 1e-6, and
    the full cache, which reads no probabilities, never builds a (B, H, T, L) matrix."""
    from nanokv.cache import reference_attention

    g = torch.Generator().manual_seed(1)
    B, H, T, L, D = 2, 3, 5, 9, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (T, L, L))
    q_pos, k_pos = torch.arange(L - T, L), torch.arange(L).expand(B, H, L)
    out, probs = reference_attention(q, k, v, q_pos, k_pos)
    out2, none = reference_attention(q, k, v, q_pos, k_pos, with_probs=False)
    assert none is None and torch.equal(out, out2)
    att = (q.double() @ k.double().transpose(-1, -2)) / D ** 0.5
    att = att.masked_fill(k_pos[:, :, None, :] > q_pos[None, None, :, None], float("-inf")).softmax(-1)
    diff = max((out.double() - att @ v.double()).abs().max().item(), (probs.double() - att).abs().max().item())
    print(f"max |reference - explicit fp64| = {diff:.3g}")
    assert diff < 1e-6
    m = peaked_model()
    for name, scores in (("full", 0), ("h2o", 2 * m.config.n_head * 40 * 40 * 4)):  # B=2, 40-token prompt
        cache = KVCache(m.config, name, **({} if name == "full" else {"budget": 16}))
        cache.track_peak = True
        with torch.no_grad():
            m(torch.randint(0, 256, (2, 40), generator=g), cache=cache)
        assert cache.peak_scores_bytes == scores, (name, cache.peak_scores_bytes)



def test_short_prompt_is_not_compressed():
    m = peaked_model()
    cache = KVCache(m.config, "knorm", budget=32, window=16)
    run(m, cache, torch.randint(0, 256, (1, 10)), 10)
    assert cache.kept_positions(0).tolist() == list(range(10))


@pytest.mark.parametrize("name", ["full", "snapkv", "h2o"])
def test_generate_reserves_room_for_the_new_tokens_once(monkeypatch, name):
    """generate() reserves the decode's slots after the prefill: one copy per layer instead of a
    regrowth every grow_by tokens; no spare slot is left at the end. Evicting methods resize
    their buffers themselves (reserve does nothing for them)."""
    from nanokv.ragged import Ragged

    m = peaked_model()
    calls = []
    real = Ragged._grow
    monkeypatch.setattr(Ragged, "_grow", lambda self, C: calls.append(C) or real(self, C))
    cache = KVCache(m.config, make_method(name, budget=8), grow_by=4)
    m.generate(torch.randint(0, 256, (2, 10)), 9, cache=cache, temperature=0)
    n = m.config.n_layer
    if name != "h2o":
        held = 10 if name == "full" else 8  # SnapKV keeps its budget of the prompt
        # per layer: the prefill's 10 tokens (rounded up to grow_by), then the reservation
        assert calls == [12] * n + [held + 8] * n
        assert cache.memory_breakdown()["padding"] == 0
        assert cache.memory_bytes() == walk_tensor_bytes(cache)
    else:  # grow_by steps, then once down to budget + 1 slots: decode steps evict in place into one spare slot
        assert calls == [12] * n + [12, 9] * n  # per layer: the prefill; the first decode step grows, then shrinks
        per_slot = 2 * 16 * 4 + 4 + 4  # keys and values (4 heads of 16, fp32), position, accumulated attention
        assert cache.memory_breakdown()["padding"] == n * 2 * 4 * per_slot  # one spare slot per (row, head)
    with pytest.raises(ValueError, match="new_tokens must be an int >= 0"):
        cache.reserve(-1)


def test_generate_reserves_spare_rows_for_ragged_heads_once(monkeypatch):
    """Ada-KV's heads hold different numbers of tokens after its prefill: generate() gives every
    head the decode's spare rows in one copy per layer (not a move every grow_by tokens), and
    the tokens and kept sets are the same as without the reservation."""
    from nanokv.ragged import Ragged

    m = peaked_model()
    idx = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    calls = []
    real = Ragged._spread
    monkeypatch.setattr(Ragged, "_spread", lambda self, room: calls.append(room) or real(self, room))
    cache = KVCache(m.config, make_method("adakv", budget=8), grow_by=4)
    out = m.generate(idx, 9, cache=cache, temperature=0)
    assert not cache.layers[0].uniform  # (the heads are ragged: the case under test)
    assert calls == [8] * m.config.n_layer  # the reservation; the 8 decode steps then fill it exactly
    assert cache.memory_breakdown()["padding"] == 0 and cache.memory_bytes() == walk_tensor_bytes(cache)
    calls.clear()
    plain = KVCache(m.config, make_method("adakv", budget=8), grow_by=4)  # the same decode, no reservation
    tokens = [idx]
    with torch.no_grad():
        for _ in range(9):
            tokens.append(m(tokens[-1], cache=plain)[0][:, -1:].argmax(-1))
    assert calls == [4, 4] * m.config.n_layer  # grow_by - 1 spare rows at the first and fifth step
    assert torch.equal(out, torch.cat(tokens, 1))
    for layer, b, h in [(0, 0, 0), (1, 1, 3), (1, 0, 2)]:
        assert cache.kept_positions(layer, b, h).tolist() == plain.kept_positions(layer, b, h).tolist()


def test_prob_stats_answers_the_reads_methods_make_and_refuses_others():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 2, 6, 9, generator=g), -1)  # (B, H, T, L)
    stats = ProbStats.of(probs, 3)
    assert stats.shape == probs.shape
    assert torch.equal(stats.sum(dim=2), probs.sum(2))
    assert torch.equal(stats[..., 2:5].sum(dim=2), probs[..., 2:5].sum(2))
    for row in (-1, -3, 3, 5):  # the last three rows, however they are named
        assert torch.equal(stats[:, :, row], probs[:, :, row])
    for start in (4, -2, 3, -3, 6):
        assert torch.equal(stats[:, :, start:, :7], probs[:, :, start:, :7])
    for bad in (0, 2, -4, 6, -7, slice(2, None), slice(-4, None), slice(4, 5)):
        with pytest.raises(NotImplementedError, match="the last 3 of 6 rows"):
            stats[:, :, bad]
    with pytest.raises(NotImplementedError, match="the last 3 of 6 rows"):
        stats[:, :, True]  # (a bool is not a row number: a tensor would add a dimension)
    with pytest.raises(NotImplementedError, match="dim=2"):
        stats.sum(dim=3)
    assert ProbStats.of(probs[:, :, -1:], 3).rows.shape == (1, 2, 1, 9)  # one query: one row, not three


def test_a_method_reading_more_than_it_declared_fails_on_the_torch_backend_too():
    """The cache hands a ProbStats on every backend, so the read that kernel 3 (Triton) could not
    answer fails here, on CPU, and a method that declares what it reads gets the same numbers."""
    seen = []

    class Declares(ScoredEviction):
        name, probs_rows, overreach = "declares-test", 2, False

        def observe(self, layer, probs, q):
            seen.append(probs[:, :, -1])  # the newest query's row: declared
            if probs.shape[2] > 2:
                seen.append(probs[:, :, -2:].sum(dim=2))  # the last two rows: declared
                if self.overreach:
                    probs[:, :, 0]  # the first query's row: not declared

        def score(self, layer):
            return torch.zeros(layer.batch, layer.heads, layer.max_len)

    m = peaked_model()
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    over = Declares(budget=32)
    over.overreach = True
    with pytest.raises(NotImplementedError, match="declare probs_rows = None"):
        run(m, KVCache(m.config, over), idx, 6)
    seen.clear()
    run(m, KVCache(m.config, Declares(budget=32)), idx, 6)  # a 6-token prefill reads only what it declared
    got = list(seen)
    seen.clear()
    Declares.probs_rows = None  # the whole matrix: the same rows, bit for bit
    run(m, KVCache(m.config, Declares(budget=32)), idx, 6)
    assert len(got) == len(seen) == 2 * (2 + 6)  # two layers: the prefill's two reads, six decode steps
    assert all(torch.equal(a, b) for a, b in zip(got, seen))


def test_attention_over_a_packed_ragged_store_dequantizes_it():
    """Quantized(Ada-KV): heads of different lengths held in low bits. Attention over the layer
    between calls (cache.attention, for introspection) dequantizes and pads them (it used to
    look for full-precision keys the store does not hold and raise KeyError)."""
    from nanokv.cache import reference_attention
    from nanokv.methods.quantized import Quantized

    m = peaked_model()
    cache = KVCache(m.config, Quantized(inner="adakv", budget=8, window=2, kernel=3))
    with torch.no_grad():
        m(torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0)), cache=cache)
    layer = cache.layers[1]
    assert not layer.uniform and "k" not in layer.fields  # ragged heads, packed codes only
    q, q_pos = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([20], dtype=torch.int32)
    out, probs = cache.attention(q, layer, q_pos)
    want = reference_attention(q, layer.padded("k"), layer.padded("v"), q_pos, layer.padded("pos", fill=-1),
                               layer.valid_mask())
    assert torch.equal(out, want[0]) and torch.equal(probs, want[1])

