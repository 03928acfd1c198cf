"""Eviction methods: kept sets against an independent per-head simulation, budgets,
protected tokens, memory (bad input: test_bad_input.py).

The simulation captures the q and k every layer hands the cache during the real run, then
replays each policy per (layer, batch row, head) with plain Python lists of positions and
explicitly computed attention rows; it shares no code with nanokv/methods/."""

import math
import types

import pytest
import torch

from nanokv import METHODS, KVCache
from nanokv.methods.pyramidkv import pyramid_budgets

from conftest import peaked_model

N_PROMPT, N_DECODE, BATCH = 40, 16, 2


def run_capturing(model, cache, idx):
    """Run prefill + decode; return per-layer lists of (q, k) per call, each (B, H, T, D), and
    the kept positions of every (layer, b, h) after every call."""
    calls = {i: [] for i in range(model.config.n_layer)}
    orig = cache.attend

    def attend(layer_idx, q, k, v):
        calls[layer_idx].append((q.clone(), k.clone()))
        return orig(layer_idx, q, k, v)

    cache.attend = attend
    kept = []
    with torch.no_grad():
        chunks = [idx[:, :N_PROMPT]] + [idx[:, t:t + 1] for t in range(N_PROMPT, idx.size(1))]
        for chunk in chunks:
            model(chunk, cache=cache)
            kept.append({(l, b, h): cache.kept_positions(l, b, h).tolist()
                         for l in range(model.config.n_layer) for b in range(BATCH)
                         for h in range(model.config.n_head)})
    return calls, kept


def rows(q, k, kept, qpos):
    """Attention rows of queries (positions qpos) over the kept positions, causal."""
    d = q.size(-1)
    out = []
    for qi, p in zip(q, qpos):
        vis = [j for j in kept if j <= p]
        s = torch.stack([qi @ k[j] for j in vis]).double() / math.sqrt(d)
        a = torch.softmax(s, 0)
        out.append({j: float(x) for j, x in zip(vis, a)})
    return out


def top(cands, score, n):
    """The n best candidates by (score, then later position)."""
    return sorted(cands, key=lambda j: (-score[j], -j))[:n]


def simulate(name, params, calls, layer, b, h, n_layer):
    """Kept positions of one head after every call, per the method's rule as the paper states it."""
    qs = [c[0][b, h] for c in calls[layer]]
    ks = torch.cat([c[1][b, h] for c in calls[layer]], 0)  # (total, D), row = position
    kept, acc, low, out, pos = [], {}, {}, [], 0
    budget = params["budget"]
    for call, q in enumerate(qs):
        T = q.size(0)
        new = list(range(pos, pos + T))
        if name == "scissorhands":
            for t in new:  # every token as if generated
                kept.append(t)
                (row,) = rows(q[t - pos:t - pos + 1], ks, kept, [t])
                for j, a in row.items():
                    if a < 1.0 / (t + 1):
                        low.setdefault(j, []).append(t)
                if len(kept) > budget:
                    cnt = {j: sum(1 for s in low.get(j, []) if s > t - params["history"]) for j in kept}
                    cands = kept[: len(kept) - params["recent"]]
                    # the `drop` largest counts; among equal counts the older token goes first
                    drop = set(sorted(cands, key=lambda j: (-cnt[j], j))[: params["drop"]])
                    kept = [j for j in kept if j not in drop]
        else:
            kept = kept + new
            r = rows(q, ks, kept, new)
            if name == "h2o":
                for row in r:
                    for j, a in row.items():
                        acc[j] = acc.get(j, 0.0) + a
                if len(kept) > budget:
                    recent = kept[-params["recent"]:]
                    heavy = top([j for j in kept if j not in recent], acc, budget - len(recent))
                    kept = sorted(heavy + recent)
            elif name == "tova" and len(kept) > budget:
                mean = {j: sum(rows(calls[layer][call][0][b, hh][-1:], torch.cat(
                    [c[1][b, hh] for c in calls[layer]], 0), kept, [new[-1]])[0][j]
                    for hh in range(params["H"])) / params["H"] for j in kept}
                kept = sorted(top(kept, mean, budget))
            elif name in ("snapkv", "pyramidkv", "adakv") and call == 0 and len(kept) > budget:
                kept = params["select"](r, kept, layer)
        pos += T
        out.append(list(kept))
    return out


def snap_scores(r, kept, w, kernel=7):
    P = len(kept) - w
    s = [sum(row.get(j, 0.0) for row in r[-w:]) for j in range(P)]
    return {j: max(s[i] for i in range(max(0, j - kernel // 2), min(P, j + kernel // 2 + 1))) for j in range(P)}


def snap_select(budget_of, w):
    def select(r, kept, layer):
        s = snap_scores(r, kept, w)
        return sorted(top(list(s), s, budget_of(layer) - w) + kept[-w:])
    return select


CASES = {
    "h2o": dict(budget=12, recent=6),
    "tova": dict(budget=12),
    "scissorhands": dict(budget=12, recent=3, drop=5, history=8),
    "snapkv": dict(budget=12, window=4),
    "pyramidkv": dict(budget=12, window=4, beta=3.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kept_sets_match_independent_simulation(name):
    model = peaked_model(seed=1)
    kw = dict(CASES[name])
    cache = KVCache(model.config, name, **kw)
    idx = torch.randint(0, 256, (BATCH, N_PROMPT + N_DECODE), generator=torch.Generator().manual_seed(7))
    calls, kept = run_capturing(model, cache, idx)
    params = dict(kw, H=model.config.n_head)
    if name == "snapkv":
        params["select"] = snap_select(lambda layer: kw["budget"], kw["window"])
    if name == "pyramidkv":
        budgets = pyramid_budgets(kw["budget"], kw["window"], model.config.n_layer, kw["beta"], N_PROMPT)
        params["select"] = snap_select(lambda layer: budgets[layer], kw["window"])
    for (layer, b, h) in kept[0]:
        expect = simulate(name, params, calls, layer, b, h, model.config.n_layer)
        got = [k[(layer, b, h)] for k in kept]
        assert got == expect, f"{name} layer {layer} row {b} head {h}"


def test_adakv_matches_independent_global_topk():
    model = peaked_model(seed=2)
    budget, w, alpha = 12, 4, 0.25
    cache = KVCache(model.config, "adakv", budget=budget, window=w, alpha=alpha)
    idx = torch.randint(0, 256, (BATCH, N_PROMPT + N_DECODE), generator=torch.Generator().manual_seed(8))
    calls, kept = run_capturing(model, cache, idx)
    H, past = model.config.n_head, budget - w
    floor = int(alpha * past)
    for layer in range(model.config.n_layer):
        for b in range(BATCH):
            scores = {}
            for h in range(H):
                q, k = calls[layer][0][0][b, h], calls[layer][0][1][b, h]
                r = rows(q, k, list(range(N_PROMPT)), list(range(N_PROMPT)))
                scores[h] = snap_scores(r, list(range(N_PROMPT)), w)
            chosen = {h: set(top(list(scores[h]), scores[h], floor)) for h in range(H)}
            rest = [(h, j) for h in range(H) for j in scores[h] if j not in chosen[h]]
            rest.sort(key=lambda hj: (-scores[hj[0]][hj[1]], -hj[1], hj[0]))
            for h, j in rest[: H * (past - floor)]:
                chosen[h].add(j)
            lens = []
            for h in range(H):
                expect = sorted(chosen[h]) + list(range(N_PROMPT - w, N_PROMPT))
                assert kept[0][(layer, b, h)] == expect
                assert len(expect) >= floor + w
                lens.append(len(expect))
                # decode appends to every head
                assert kept[-1][(layer, b, h)] == expect + list(range(N_PROMPT, N_PROMPT + N_DECODE))
            assert sum(lens) == H * budget
    assert not all(len(set(cache.lengths(l).flatten().tolist())) == 1 for l in range(2)), "heads should differ"


def test_streamingllm_keeps_first_and_last():
    model = peaked_model()
    cache = KVCache(model.config, "streamingllm", budget=10, n_sink=3)
    idx = torch.randint(0, 256, (BATCH, N_PROMPT + N_DECODE))
    _, kept = run_capturing(model, cache, idx)
    for i, k in enumerate(kept):
        last = N_PROMPT + i
        for positions in k.values():
            assert positions == [0, 1, 2] + list(range(last - 7, last))


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if cls.takes_budget))
def test_budget_holds_and_positions_aligned(name):
    model = peaked_model()
    budget = 16
    cache = KVCache(model.config, METHODS[name].scaled(budget))
    idx = torch.randint(0, 256, (BATCH, 60), generator=torch.Generator().manual_seed(3))
    grows = name in ("snapkv", "pyramidkv", "adakv")  # compress the prompt, then append
    with torch.no_grad():
        model(idx[:, :40], cache=cache)
        for t in range(40, 60):
            model(idx[:, t:t + 1], cache=cache)
            for layer in range(2):
                lens = cache.lengths(layer)
                limit = (cache.method.layer_budget(layer, 40) if grows else budget) + (t - 39 if grows else 0)
                if name == "adakv":
                    assert lens.sum(-1).tolist() == [4 * limit] * BATCH
                else:
                    assert (lens <= limit).all(), (t, lens)
                store = cache.layers[layer]
                assert store.flat("k").shape[0] == store.flat("v").shape[0] == store.flat("pos").shape[0] \
                    == int(lens.sum())
                for b in range(BATCH):
                    for h in range(4):
                        pos = cache.kept_positions(layer, b, h)
                        assert (pos.diff() > 0).all()  # position order
                        if cache.method.window > 0:  # a protected recent window keeps the newest
                            assert pos[-1] == t
    # layer 0's keys depend on the tokens alone: the stored keys are those of the kept positions
    if getattr(cache.method, "merges", False):
        return  # merged keys are mixtures (tested in test_merging.py)
    full = KVCache(model.config, "full")
    with torch.no_grad():
        model(idx, cache=full)
    store = cache.layers[0]
    pos = store.padded("pos", fill=0).long()  # (B, H, L)
    expect = torch.gather(full.layers[0].padded("k"), 2, pos[..., None].expand(-1, -1, -1, 16))
    valid = store.valid_mask()
    tol = 1e-5
    if "k" in store.quantized:  # stored at low bits: within half a quantization step
        tol = store.padded("k.scale").float()[valid] / 2 + 1e-3 * expect.abs().max()  # one group of 16
    assert ((store.padded("k")[valid] - expect[valid]).abs() <= tol).all()


def test_pyramid_budgets_mean_and_order():
    for n_layer, budget, w, beta in [(12, 64, 8, 20), (4, 100, 32, 20), (5, 17, 4, 3.0), (2, 10, 2, 1.0)]:
        b = pyramid_budgets(budget, w, n_layer, beta)
        assert sum(b) == n_layer * budget
        assert b == sorted(b, reverse=True) and min(b) >= w
    assert pyramid_budgets(64, 8, 1, 20) == [64]


def test_pyramid_budgets_follow_the_official_prompt_rules():
    """Budget 64, window 16, 4 layers (past = 48): a prompt shorter than 2 * past = 96 gets SnapKV's
    uniform budget everywhere (the official code's fallback: 256 tokens per head over the layers,
    where capping alone gave [70, 70, 49, 18] = 207); a prompt just above it caps the bottom layer at
    the prompt and moves the rest up; a long prompt gets the full slope. Always n_layer * budget."""
    assert pyramid_budgets(64, 16, 4, 20, prompt_len=70) == [64, 64, 64, 64]
    capped = pyramid_budgets(64, 16, 4, 20, prompt_len=100)  # hi = 100 - 16 = 84, lo = 12
    assert capped == [100, 76, 52, 28] and sum(capped) == 256
    assert pyramid_budgets(64, 16, 4, 20) == pyramid_budgets(64, 16, 4, 20, prompt_len=4096) == [110, 79, 49, 18]
    for L in range(96, 400, 7):
        b = pyramid_budgets(64, 16, 4, 20, prompt_len=L)
        assert sum(b) == 256 and b[0] <= L and b == sorted(b, reverse=True) and min(b) >= 16, (L, b)
    # end to end: a 70-token prompt keeps 64 tokens per head in every layer
    model = peaked_model(n_layer=4)
    cache = KVCache(model.config, "pyramidkv", budget=64, window=16)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(0)), cache=cache)
    assert [int(cache.lengths(i).max()) for i in range(4)] == [64, 64, 64, 64]


def test_h2o_accumulates_in_fp32_and_counts_state():
    model = peaked_model()
    cache = KVCache(model.config, "h2o", budget=16)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 30)), cache=cache)
    assert cache.layers[0].flat("acc").dtype == torch.float32
    assert cache.memory_breakdown()["method_state"] == 2 * 4 * 16 * 4


def test_scissorhands_history_is_bits():
    model = peaked_model()
    cache = KVCache(model.config, "scissorhands", budget=20, history=400, recent=4)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 50)), cache=cache)
    lens = cache.lengths(0)
    assert (lens <= 20).all()
    n = int(cache.lengths(0).sum() + cache.lengths(1).sum())
    assert cache.memory_breakdown()["method_state"] == n * 50  # 400 steps = 50 bytes per token


@pytest.mark.parametrize("threshold", ["1/t", "1/n"])
def test_scissorhands_pieces_equal_token_by_token(monkeypatch, threshold):
    """The prompt runs in pieces that end where a token-by-token reading evicts: the same kept
    positions, history bits and logits as forcing one token per pass (and far fewer passes)."""
    from nanokv.methods.scissorhands import Scissorhands

    model, idx = peaked_model(), torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(4))
    runs = {}
    for mode in ("pieces", "one by one"):
        if mode == "one by one":
            monkeypatch.setattr(Scissorhands, "pieces", lambda self, layer, T: [1] * T)
        cache = KVCache(model.config, "scissorhands", budget=20, drop=7, recent=3, threshold=threshold)
        with torch.no_grad():
            logits, _ = model(idx, cache=cache)
            nxt, _ = model(idx[:, :1], cache=cache)
        kept = [[cache.kept_positions(i, b, h).tolist() for b in range(2) for h in range(4)] for i in range(2)]
        runs[mode] = (logits, nxt, kept, cache.layers[1].padded("hist").clone())
    (l1, n1, k1, h1), (l2, n2, k2, h2) = runs["pieces"], runs["one by one"]
    print("max |dlogit|", (l1 - l2).abs().max().item(), (n1 - n2).abs().max().item())
    assert k1 == k2 and torch.equal(h1, h2)
    assert (l1 - l2).abs().max() <= 1e-4 and (n1 - n2).abs().max() <= 1e-4
    monkeypatch.undo()
    empty_layer = types.SimpleNamespace(max_len=0)  # pieces reads only how many tokens are held
    assert Scissorhands(budget=20, drop=7, recent=3).pieces(empty_layer, 90) == [21] + [7] * 9 + [6]


def test_memory_shrinks_exactly_with_budget():
    model = peaked_model()  # 2 layers, 4 heads, D=16, fp32: 2*16*4 + 4 bytes per entry
    idx = torch.randint(0, 256, (1, 64))
    for name, extra in [("streamingllm", 0), ("tova", 0), ("h2o", 4), ("knorm", 0)]:
        for budget in (8, 32):
            cache = KVCache(model.config, METHODS[name].scaled(budget))
            with torch.no_grad():
                model(idx, cache=cache)
            assert cache.memory_bytes() == 2 * (4 * budget * (2 * 16 * 4 + 4 + extra) + 4 * 8), name


def test_prompt_shorter_than_window_not_compressed():
    model = peaked_model()
    cache = KVCache(model.config, "snapkv", budget=40, window=32)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 20)), cache=cache)
    assert cache.kept_positions(1, 0, 3).tolist() == list(range(20))


class _Constant(METHODS["knorm"]):
    """Every entry scores the same: which one goes is decided by the tie-break alone."""

    def score(self, layer):
        return torch.zeros(layer.batch, layer.heads, layer.max_len)


@pytest.mark.parametrize("name", ["h2o", "tova", "knorm", "streamingllm", "d2o", "ems", "ties"])
def test_in_place_eviction_equals_compacting(name):
    """A decode step writes the new token into the slot of the one it evicts (Ragged.evict_in_place;
    no compaction, one spare slot); with evicts_in_place off every step compacts the store as the
    prefill does. Same kept sets after every call (a 3-token chunk in the middle puts the slots
    back in position order first), logits within float reassociation (attention sums the kept
    entries in another order), one spare slot per (row, head) after a decode step."""
    model = peaked_model(seed=3)
    idx = torch.randint(0, 256, (BATCH, 64), generator=torch.Generator().manual_seed(3))
    calls = [(0, 30)] + [(t, t + 1) for t in range(30, 45)] + [(45, 48)] + [(t, t + 1) for t in range(48, 64)]

    def make():
        if name == "ties":
            return _Constant(budget=12, n_sink=2, window=3)
        return METHODS[name].scaled(12, **({"n_sink": 2} if name == "h2o" else {}))

    runs = []
    for in_place in (True, False):
        method = make()
        method.evicts_in_place = in_place
        cache = KVCache(model.config, method)
        logits, kept = [], []
        with torch.no_grad():
            for a, b in calls:
                logits.append(model(idx[:, a:b], cache=cache)[0])
                kept.append([cache.kept_positions(l, r, h).tolist() for l in range(2) for r in range(BATCH)
                             for h in range(4)])
        runs.append((logits, kept, cache))
    (l1, k1, c1), (l2, k2, c2) = runs
    assert k1 == k2
    diff = max((a - b).abs().max().item() for a, b in zip(l1, l2))
    print(f"{name}: in place vs compacting, max logit diff {diff:.2g}")
    assert diff <= 1e-5
    assert not c1.layers[0].ordered and c2.layers[0].ordered  # the slots really were reused out of order
    per_slot = sum(t[0, 0, 0].numel() * t.element_size() for t in c1.layers[0].fields.values())
    assert c1.memory_breakdown()["padding"] == 2 * BATCH * 4 * per_slot and c2.memory_breakdown()["padding"] == 0
    for layer in c1.layers:  # back in position order: the same store as the compacting run's, bit for bit
        layer.sort_by_position()
    for i, (a, b) in enumerate(zip(c1.layers, c2.layers)):  # layer 0's keys and values come from the tokens alone
        for f in a.fields:  # (EMS's merge weights are attention scores: summed in another order)
            if (i == 0 and f in ("k", "v") and name != "ems") or f == "pos":
                assert torch.equal(a.padded(f), b.padded(f)), f
            else:
                assert torch.allclose(a.padded(f), b.padded(f), rtol=0, atol=1e-5), f


def test_ems_adaptive_heads_keep_their_window_at_every_decode_step():
    """EMS with head_budgets="adaptive" chooses centers over the whole layer, so a decode step may
    drop two tokens from one head and none from another, even when every head holds budget + 1:
    it must compact, not evict one slot per head in place (a head that drops nothing would lose
    the token in its slot 0). Regression: the window token at slot 0 of a head went missing."""
    model = peaked_model(seed=3)
    idx = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(3))
    method = METHODS["ems"].scaled(12, head_budgets="adaptive")
    assert not method.evicts_in_place and METHODS["ems"].scaled(12).evicts_in_place
    cache, ragged = KVCache(model.config, method), 0
    with torch.no_grad():
        model(idx[:, :20], cache=cache)
        for t in range(20, 60):
            model(idx[:, t:t + 1], cache=cache)
            for li in range(model.config.n_layer):
                lens = cache.lengths(li)[0]  # (H,)
                ragged += int(lens.min() != lens.max())
                assert lens.float().mean() <= 12
                for h in range(model.config.n_head):
                    kept = set(cache.kept_positions(li, 0, h).tolist())
                    assert set(range(t + 1 - method.window, t + 1)) <= kept, (t, li, h, sorted(kept))
    assert ragged > 0  # the heads really did hold different numbers of tokens


def test_decode_step_drops_what_the_sort_drops_even_with_nan_scores():
    """keep_mask at a decode step (argmin by position) against top_k_mask (the sort), on one layer
    whose scores include a NaN: the sort ranks NaN highest, so the protected sink must stay."""
    from nanokv.method import top_k_mask
    from nanokv.methods.h2o import H2O
    from nanokv.ragged import Layer

    layer = Layer(1, 1, "cpu", 16, index=0, dtype=torch.float32)
    layer.add_field("pos", "positions", (), torch.int32)
    layer.append(pos=torch.arange(5, dtype=torch.int32).view(1, 1, 5))
    layer.n_seen, layer.n_new = 4, 1  # the fifth token just arrived
    method = H2O(budget=4, recent=1, n_sink=1)
    for score in ([0.5, 0.1, float("nan"), 0.3, 0.2], [0.3, 0.3, 0.3, 0.3, 0.3], [float("nan")] * 5):
        s = torch.tensor([[score]])
        want = top_k_mask(layer.lengths, s, 4, n_sink=1, window=1)
        assert torch.equal(method.keep_mask(layer, s, 4), want), score
