"""Merging methods: EMS (batched zero-class merge against a per-head loop, reductions, score
invariants, budgets), CaM and D2O (reduce to their eviction policy)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nanokv import METHODS, KVCache
from nanokv.methods.ems import EMS

from conftest import peaked_model

N_PROMPT, N_TOTAL = 40, 64


def run(model, cache, idx):
    with torch.no_grad():
        out = [model(idx[:, :N_PROMPT], cache=cache)[0]]
        for t in range(N_PROMPT, idx.size(1)):
            out.append(model(idx[:, t:t + 1], cache=cache)[0])
    return torch.cat(out, 1)


@pytest.fixture(scope="module")
def filled():
    """An EMS cache that has read 40 tokens without compressing (its budget holds them all),
    so its scores are real; tests lower the budget and call compress themselves."""
    m = peaked_model(seed=5)
    idx = torch.randint(0, 256, (2, N_PROMPT), generator=torch.Generator().manual_seed(5))
    cache = KVCache(m.config, EMS(budget=N_PROMPT, window=4))
    with torch.no_grad():
        m(idx, cache=cache)
    return cache


def compressed(filled, **kw):
    cache = copy.deepcopy(filled)
    method = EMS(**{"budget": 12, "window": 4, **kw})
    layer = cache.layers[1]
    before = copy.deepcopy(layer)
    method.compress(layer)
    return method, before, layer


def loop_centers(method, before, b, h):
    """EMS's Global-Local score of one head as a plain loop (s[j] = max(global, local scaled so
    that the two have the same mean outside the window)), and the centers it picks: the best
    budget - window tokens outside the window, ties to the later token."""
    n, w = int(before.lengths[b, h]), method.window
    glo = before.padded("glo")[b, h, :n]
    loc = before.padded("loc")[b, h, :n].sum(-1)
    outside = list(range(n - w))
    mg = sum(glo[j] for j in outside) / len(outside)
    ml = sum(loc[j] for j in outside) / len(outside)
    s = [max(glo[j], loc[j] * mg / ml) for j in range(n)]
    window = list(range(n - w, n))
    centers = sorted(outside, key=lambda j: (-s[j], -j))[: method.budget - w]
    return s, outside, window, centers


def per_head_loop(method, before, b, h):
    """EMS's compression of one head, written as a plain loop over tokens (independent of
    the batched zero-class code): returns kept positions and their k, v."""
    n, w = int(before.lengths[b, h]), method.window
    k, v = before.padded("k")[b, h, :n], before.padded("v")[b, h, :n]
    s, outside, window, centers = loop_centers(method, before, b, h)
    rest = sorted((j for j in outside if j not in centers), key=lambda j: (-s[j], -j))
    total, acc, cand = sum(s[j] for j in rest), 0.0, []
    for j in rest:  # the prefix holding `mass` of the remaining score mass
        if acc < method.mass * total:
            cand.append(j)
        acc += s[j]
    members = {c: [c] for c in centers}
    for t in cand:
        sims = {c: max(float(F.cosine_similarity(k[t], k[c], dim=0)), 0) *
                max(float(F.cosine_similarity(v[t], v[c], dim=0)), 0) for c in centers}
        c = max(sims, key=lambda c: (sims[c], -c))
        if sims[c] >= method.tau:
            members[c].append(t)
    out_k, out_v = {}, {}
    for c in centers:
        ws = sum(float(s[j]) for j in members[c])
        out_k[c] = sum(float(s[j]) * k[j] for j in members[c]) / ws
        out_v[c] = sum(float(s[j]) * v[j] for j in members[c]) / ws
    for j in window:
        out_k[j], out_v[j] = k[j], v[j]
    kept = sorted(out_k)
    n_merged = sum(len(m) - 1 for m in members.values())
    return kept, torch.stack([out_k[j] for j in kept]), torch.stack([out_v[j] for j in kept]), n_merged


MERGED = {}  # tau -> tokens merged into a center, over every head (the loop's count)


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.7, 0.95])
def test_batched_zero_class_equals_per_head_loop(filled, tau):
    method, before, layer = compressed(filled, tau=tau)
    MERGED[tau] = 0
    for b in range(2):
        for h in range(4):
            kept, k, v, n_merged = per_head_loop(method, before, b, h)
            MERGED[tau] += n_merged
            n = int(layer.lengths[b, h])
            assert layer.padded("pos")[b, h, :n].tolist() == kept
            dk = (layer.padded("k")[b, h, :n] - k).abs().max().item()
            dv = (layer.padded("v")[b, h, :n] - v).abs().max().item()
            assert dk <= 1e-6 and dv <= 1e-6, (dk, dv)  # fp32: the loop sums in another order
            if n_merged == 0:  # no merge: kept tokens exactly as they were
                assert torch.equal(layer.padded("v")[b, h, :n], before.padded("v")[b, h, kept])
    print(f"tau={tau}: {MERGED[tau]} tokens merged over 8 heads")
    # a higher threshold merges fewer tokens; the sweep covers merging and not merging
    done = [MERGED[t] for t in sorted(MERGED)]
    assert done == sorted(done, reverse=True)
    if tau == 0.0:
        assert MERGED[tau] > 0
    if tau == 0.95:
        assert MERGED[tau] < MERGED[0.0]


def test_no_merge_no_sparsity_is_top_b_by_global_local_score(filled):
    """tau = inf (nothing merges): EMS keeps the window and the best budget - window tokens by
    the Global-Local score (computed here by a plain loop, not by the method), values untouched."""
    method, before, layer = compressed(filled, tau=float("inf"), mass=1.0)
    for b in range(2):
        for h in range(4):
            _, _, window, centers = loop_centers(method, before, b, h)
            kept = sorted(centers + window)
            assert len(kept) == 12
            assert layer.padded("pos")[b, h].tolist() == before.padded("pos")[b, h, kept].tolist()
            assert torch.equal(layer.padded("v")[b, h], before.padded("v")[b, h, kept])  # untouched


def test_zero_class_members_contribute_nothing(filled):
    method, before, layer = compressed(filled, tau=0.5)
    _, _, s = method.scores(before)
    keep, assign = method.classes(before, s)
    zero = (assign == before.max_len) & before.valid_mask()
    assert zero.any()
    poked = copy.deepcopy(before)
    v = poked.padded("v").clone()
    v[zero] = 1e4  # whatever the zero class holds must not reach any center
    poked.set_padded("v", v)
    method.compress(poked)
    assert torch.equal(poked.padded("v"), layer.padded("v"))


def test_merging_exact_copies_leaves_the_center_unchanged():
    from nanokv.methods.ems import merge

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, 6, 8, generator=g), torch.randn(1, 1, 6, 8, generator=g)
    k[0, 0, 3:], v[0, 0, 3:] = k[0, 0, 1], v[0, 0, 1]  # tokens 3..5 copy token 1
    s = torch.rand(1, 1, 6, generator=g) + 0.1
    assign = torch.tensor([[[0, 1, 2, 1, 1, 1]]])
    keep = torch.tensor([[[True, True, True, False, False, False]]])
    for mode in ("mean", "direction"):
        nk, nv = merge(k, v, s, assign, keep, mode)
        assert torch.allclose(nk[0, 0, 1], k[0, 0, 1], atol=1e-6) and torch.allclose(nv[0, 0, 1], v[0, 0, 1], atol=1e-6)
        assert torch.equal(nk[0, 0, :3:2], k[0, 0, :3:2])  # centers without members are untouched


def test_merge_sums_members_as_a_scatter_of_every_row_does():
    """EMS's merge sums only members and their centers; a scatter-add of every row into its
    assigned slot (the rule as written, key_merge="mean") gives the same tensors bit for bit,
    with zero weights, centers without members and a zero class."""
    from nanokv.methods.ems import merge

    def scattered(k, v, s, assign, keep):
        B, H, L, D = k.shape
        w = s.clamp(min=0)[..., None]
        sums = [torch.zeros(B, H, L + 1, x.size(-1)).scatter_add_(2, assign[..., None].expand_as(x), x)[:, :, :L]
                for x in (torch.ones_like(w), w, w * v, w * k)]
        ok = (sums[0] > 1) & (sums[1] > 0) & keep[..., None]
        return (torch.where(ok, sums[3] / sums[1].clamp(min=1e-30), k), torch.where(ok, sums[2] / sums[1].clamp(min=1e-30), v))

    g = torch.Generator().manual_seed(5)
    merged = 0
    for trial in range(40):
        B, H, L, D = 2, 3, 5 + trial, 8
        k, v, s = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, generator=g)
        keep = torch.rand(B, H, L, generator=g) < 0.4
        keep[..., 0] = True
        kept_slot = torch.where(keep, torch.arange(L), -1).sort(dim=-1, descending=True).values  # kept slots first
        pick = (torch.rand(B, H, L, generator=g) * keep.sum(-1, keepdim=True)).long()
        target = kept_slot.gather(-1, pick)
        assign = torch.where(keep, torch.arange(L), torch.where(torch.rand(B, H, L, generator=g) < 0.7, target, L))
        got, want = merge(k, v, s, assign, keep), scattered(k, v, s, assign, keep)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        merged += int((got[1] != v).any(-1).sum())
    print(f"{merged} centers changed, all bit-identical to the scatter of every row")
    assert merged > 0


def test_global_local_score_invariants(filled):
    method = EMS(budget=12, window=4)
    layer = filled.layers[0]
    glo, loc, s = method.scores(layer)
    assert (s >= glo).all()
    outside = torch.zeros_like(glo, dtype=torch.bool)
    outside[:, :, : N_PROMPT - 4] = True
    mg = (glo * outside).sum(-1) / outside.sum(-1)
    ml = (loc * outside).sum(-1) / outside.sum(-1)
    assert torch.allclose(mg, ml, rtol=1e-5)
    # the global score favours early tokens, the local score recent ones
    assert glo[..., :5].mean() > glo[..., 20:35].mean()


@pytest.mark.parametrize("head_budgets", ["uniform", "adaptive"])
def test_ems_budgets_hold_while_decoding(head_budgets):
    m = peaked_model(seed=6)
    cache = KVCache(m.config, EMS(budget=16, window=4, head_budgets=head_budgets))
    idx = torch.randint(0, 256, (2, N_TOTAL), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        m(idx[:, :N_PROMPT], cache=cache)
        for t in range(N_PROMPT, N_TOTAL):
            m(idx[:, t:t + 1], cache=cache)
            for layer in range(2):
                lens = cache.lengths(layer)
                if head_budgets == "uniform":
                    assert (lens == 16).all()
                else:
                    assert (lens.sum(-1) == 4 * 16).all() and (lens >= 4 + int(0.2 * 12)).all()
                for b in range(2):
                    for h in range(4):
                        assert cache.kept_positions(layer, b, h)[-4:].tolist() == list(range(t - 3, t + 1))
    if head_budgets == "adaptive":
        assert any(len(set(cache.lengths(l).flatten().tolist())) > 1 for l in range(2))


def test_ems_interval_compresses_periodically():
    m = peaked_model()
    cache = KVCache(m.config, EMS(budget=16, window=4, interval=4))
    idx = torch.randint(0, 256, (1, N_TOTAL))
    sizes = []
    with torch.no_grad():
        m(idx[:, :N_PROMPT], cache=cache)
        for t in range(N_PROMPT, N_PROMPT + 8):
            m(idx[:, t:t + 1], cache=cache)
            sizes.append(int(cache.lengths(0).max()))
    assert sizes == [16, 17, 18, 19, 16, 17, 18, 19]  # compressed when n_seen is 40, 44


# ----------------------------------------------------------------------------- CaM and D2O
def test_cam_without_merging_is_h2o_and_never_touches_keys():
    m = peaked_model(seed=7)
    idx = torch.randint(0, 256, (2, N_TOTAL), generator=torch.Generator().manual_seed(7))
    h2o, cam0 = KVCache(m.config, "h2o", budget=12), KVCache(m.config, "cam", budget=12, max_prob=0.0)
    assert torch.equal(run(m, h2o, idx), run(m, cam0, idx))
    cam = KVCache(m.config, "cam", budget=12, m=4)
    run(m, cam, idx)
    for layer in range(2):
        for b in range(2):
            for h in range(4):
                assert cam.kept_positions(layer, b, h).tolist() == h2o.kept_positions(layer, b, h).tolist()
    # keys are never merged: layer 0's keys (a function of the tokens alone) equal H2O's
    assert torch.equal(cam.layers[0].padded("k"), h2o.layers[0].padded("k"))
    assert not torch.equal(cam.layers[0].padded("v"), h2o.layers[0].padded("v"))


def test_cam_is_seeded_and_merges_with_probability_p():
    m = peaked_model(seed=7)
    idx = torch.randint(0, 256, (1, N_TOTAL), generator=torch.Generator().manual_seed(8))
    a = run(m, KVCache(m.config, "cam", budget=12, seed=1), idx)
    b = run(m, KVCache(m.config, "cam", budget=12, seed=1), idx)
    assert torch.equal(a, b)
    # p = A[e] / mean A[W] = 0.5 for every evicted token: about half of them merge, and the
    # draws depend on the seed
    cache = KVCache(m.config, "cam", budget=60, m=4)
    with torch.no_grad():
        m(torch.randint(0, 256, (8, N_PROMPT), generator=torch.Generator().manual_seed(9)), cache=cache)
    layer = cache.layers[0]
    keep = torch.zeros(8, 4, N_PROMPT, dtype=torch.bool)
    keep[:, :, 1::2] = True  # evict every other token
    layer.set_padded("acc", torch.where(keep, 2.0, 1.0))
    merged = []
    for seed in (0, 1):
        cam = METHODS["cam"](budget=20, m=4, seed=seed)
        copy_ = copy.deepcopy(layer)
        cam.merge(copy_, keep, layer.padded("acc"))
        merged.append((copy_.padded("v") != layer.padded("v")).any(-1) & keep)  # receivers
    assert not torch.equal(merged[0], merged[1])
    rate = merged[0].float().mean().item() * 2  # every kept token receives from ~4 evicted ones
    assert 0.5 < rate < 2.0


def test_d2o_with_infinite_threshold_is_h2o_with_sinks():
    m = peaked_model(seed=9)
    idx = torch.randint(0, 256, (2, N_TOTAL), generator=torch.Generator().manual_seed(9))
    h2o = KVCache(m.config, "h2o", budget=12, n_sink=4)
    d2o = KVCache(m.config, "d2o", budget=12, threshold=float("inf"))
    assert torch.equal(run(m, h2o, idx), run(m, d2o, idx))
    ema = KVCache(m.config, "d2o", budget=12)
    run(m, ema, idx)
    tau = ema.method.tau  # per layer, one EMA threshold per batch row, fp32
    assert set(tau) == {0, 1} and all(t.shape == (2,) and t.dtype == torch.float32 for t in tau.values())
    assert all(((-1 <= t) & (t <= 1)).all() for t in tau.values())
    assert not torch.equal(ema.layers[0].padded("k"), h2o.layers[0].padded("k"))  # keys merged
    for layer in range(2):
        assert ema.kept_positions(layer, 1, 2)[:4].tolist() == [0, 1, 2, 3]  # sinks kept
