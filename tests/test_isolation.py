"""State isolation and determinism, for every registered method (torch backend).

  - a model reused with a fresh cache gives what a fresh model gives;
  - two caches used alternately on one model do not interfere;
  - cache.reset() returns a cache to empty, and it then behaves as new;
  - batch rows do not leak: row i of a batch equals running row i alone (same kept positions,
    logits to 1e-5, 1e-3 for quantizers), on a model whose attention is not near-uniform;
  - the same inputs and seed give bit-identical results on every run (CaM's random merging too).
"""

import pytest
import torch

from nanokv import METHODS, KVCache

from conftest import make_method, peaked_model

ALL = sorted(METHODS)
N_PROMPT, N_TOTAL, BUDGET = 40, 52, 16


def tokens(batch, seed):
    return torch.randint(0, 256, (batch, N_TOTAL), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def no_grad():  # here, not inside the generator below: two interleaved generators would unbalance it
    with torch.no_grad():
        yield


def steps(model, cache, idx):
    """The calls of one run, as a generator: prefill, then one token at a time; yields logits."""
    yield model(idx[:, :N_PROMPT], cache=cache)[0]
    for t in range(N_PROMPT, idx.size(1)):
        yield model(idx[:, t:t + 1], cache=cache)[0]


def run(model, cache, idx):
    return torch.cat(list(steps(model, cache, idx)), 1)


def new_cache(model, name):
    return KVCache(model.config, make_method(name, BUDGET))


def kept(cache):
    return [[[cache.kept_positions(li, b, h).tolist() for h in range(cache.config.n_head)]
             for b in range(cache.batch_size)] for li in range(cache.config.n_layer)]


@pytest.mark.parametrize("name", ALL)
def test_reused_model_equals_fresh_model(name):
    used = peaked_model()
    run(used, new_cache(used, name), tokens(2, 1))  # an earlier, unrelated run
    got = run(used, new_cache(used, name), tokens(2, 2))
    fresh = peaked_model()
    assert torch.equal(got, run(fresh, new_cache(fresh, name), tokens(2, 2)))


@pytest.mark.parametrize("name", ALL)
def test_two_caches_used_alternately_do_not_interfere(name):
    m = peaked_model()
    a, b = new_cache(m, name), new_cache(m, name)
    out_a, out_b = [], []
    for la, lb in zip(steps(m, a, tokens(2, 3)), steps(m, b, tokens(2, 4))):  # interleaved calls
        out_a.append(la)
        out_b.append(lb)
    assert torch.equal(torch.cat(out_a, 1), run(m, new_cache(m, name), tokens(2, 3)))
    assert torch.equal(torch.cat(out_b, 1), run(m, new_cache(m, name), tokens(2, 4)))


@pytest.mark.parametrize("name", ALL)
def test_reset_returns_the_cache_to_empty(name):
    m = peaked_model()
    cache = new_cache(m, name)
    run(m, cache, tokens(2, 5))
    cache.reset()
    assert cache.layers is None and cache.seq_len == 0 and cache.memory_bytes() == 0
    assert repr(cache).endswith("empty)")
    again = run(m, cache, tokens(3, 6))  # another batch size is fine after a reset
    assert torch.equal(again, run(m, new_cache(m, name), tokens(3, 6)))


@pytest.mark.parametrize("name", ALL)
def test_batch_rows_do_not_leak(name):
    m = peaked_model()
    idx = tokens(3, 7)
    batch = new_cache(m, name)
    together = run(m, batch, idx)
    # A batched matrix product is not bit-identical to a one-row one (last-bit differences); a
    # quantizer may then round a value the other way, which moves a logit by about one
    # quantization step (2e-4 seen for rtn); a leak between rows would move it far more.
    tol = 1e-3 if METHODS[name].lossy else 1e-5
    for i in range(3):
        alone = new_cache(m, name)
        diff = (together[i:i + 1] - run(m, alone, idx[i:i + 1])).abs().max().item()
        print(f"{name} row {i}: max |batched - alone| = {diff:.3g}")
        assert diff < tol, f"{name}: row {i} differs from running it alone by {diff:.3g}"
        assert kept(batch)[0][i] == kept(alone)[0][0], f"{name}: row {i} keeps other positions alone"


@pytest.mark.parametrize("name", ALL)
def test_same_seed_is_bit_identical(name):
    runs = []
    for _ in range(2):
        m = peaked_model()
        cache = new_cache(m, name)
        runs.append((run(m, cache, tokens(2, 8)), kept(cache), cache.memory_bytes()))
    (a, ka, ma), (b, kb, mb) = runs
    assert torch.equal(a, b) and ka == kb and ma == mb
