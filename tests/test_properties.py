"""Property-based invariants for every registered method and both backends (hypothesis).

Each example draws a small random model (layers, heads, head dim), a batch, a prompt of 1 to a
few hundred tokens, a few later calls (one token or a chunk), a budget and the method's own
parameters (bits, windows, inner method, ...), runs the cache, and checks after every call:

  - outputs finite;
  - budgets hold (per head, or the layer's mean for methods with ragged head budgets), nothing is
    dropped by the quantizers, and a prompt no longer than the budget is never compressed;
  - protected tokens are kept (the n_sink first and the `window` newest);
  - keys, values and positions stay aligned: every field has one entry per kept token, positions
    are distinct and already seen, and (layer 0, no merging) each stored key is the key of its
    position, exactly or within half a quantization step;
  - quantized entries dequantize within scale/2 of what was stored, and precision never rises;
  - memory_bytes() equals the bytes of every tensor the cache actually holds (walked, not computed);
  - at a budget of at least the whole sequence, a non-lossy method equals the full cache exactly.

Profiles (tests/conftest.py): "ci" (default; derandomized, a few examples per method and
backend) and "long" (HYPOTHESIS_PROFILE=long, many more).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt import GPT, GPTConfig
from nanokv import METHODS, KVCache

from conftest import EXAMPLES, walk_tensor_bytes

ALL = sorted(METHODS)


def draw_kwargs(draw, name, D):
    """The method's own parameters (beyond the budget) for this example."""
    bits = st.sampled_from([2, 3, 4, 8])
    def saves(b, g):  # groups that hold fewer bits per value than fp16 (nanokv.quant.check_group_saves)
        return g is None or b + 32 / g < 16

    if name == "rtn":
        b = draw(bits)
        return dict(bits=b, group=draw(st.sampled_from([g for g in (None, D // 2, D) if saves(b, g)])))
    if name == "kivi":
        b = draw(bits)
        g = draw(st.sampled_from([g for g in (D // 2, D) if saves(b, g)]))
        return dict(bits=b, group=g, residual=g * draw(st.integers(1, 4)))
    if name == "mikv":
        hi = draw(st.sampled_from([None, None, 8, 4]))
        lo = draw(st.sampled_from([b for b in (2, 3, 4, None) if hi is None or (b is not None and b < hi)]))
        return dict(rho=draw(st.floats(0.05, 1.0)), bits_lo=lo, bits_hi=hi, balancer=draw(st.booleans()))
    if name == "quantized":
        return dict(inner=draw(st.sampled_from(["scissorhands", "h2o", "streamingllm", "snapkv", "tova"])),
                    bits=draw(bits))
    if name == "tova":
        return dict(head_reduce=draw(st.sampled_from(["mean", "none"])))
    if name == "snapkv":
        return dict(pool=draw(st.sampled_from(["max", "avg"])), kernel=draw(st.sampled_from([1, 3, 7])))
    if name == "ems":
        return dict(head_budgets=draw(st.sampled_from(["uniform", "adaptive"])),
                    tau=draw(st.sampled_from([0.5, -1.0, math.inf])), key_merge=draw(st.sampled_from(["mean", "direction"])))
    if name == "cam":
        return dict(max_prob=draw(st.sampled_from([0.0, 0.5, 1.0])), m=draw(st.integers(1, 8)))
    return {}


def run_calls(model, cache, idx, calls, check=None):
    """Feed idx in chunks of the sizes in `calls`; check(cache, t) after each; return the logits."""
    out, t = [], 0
    with torch.no_grad():
        for n in calls:
            logits = model(idx[:, t:t + n], cache=cache)[0]
            t += n
            assert torch.isfinite(logits).all(), f"non-finite logits after {t} tokens"
            out.append(logits)
            if check:
                check(cache, t)
    return torch.cat(out, 1)


def stored_vs_true(cache, full):
    """For layer 0 (whose keys and values depend on the tokens alone), yield
    (name, stored, true, bound) over every store that keeps positions: the entries the cache
    holds, the full cache's entries at the same positions, and the allowed error (0 at full
    precision; scale/2 plus fp16 rounding of the scale when stored at low bits)."""
    layer, ref = cache.layers[0], full.layers[0]
    method = getattr(cache.method, "inner", cache.method)
    if getattr(method, "merges", False):
        return
    true_k, true_v = ref.padded("k"), ref.padded("v")  # (B, H, N, D)
    if getattr(cache.method, "balancer", False) and 0 in cache.method.scales:  # MiKV: keys times the factors
        true_k = (true_k.float() * cache.method.scales[0]).to(true_k.dtype)
    for st_ in (layer, *layer.segments.values()):
        if "pos" not in st_.fields or st_.trailing["pos"] != ():
            continue  # KIVI's key chunks are checked by test_quantization.py
        valid = st_.valid_mask()
        pos = st_.padded("pos", fill=0).long()[..., None].expand(-1, -1, -1, true_k.size(-1))
        for name, true in (("k", true_k), ("v", true_v)):
            if not st_.has(name):
                continue
            want = torch.gather(true, 2, pos)[valid].float()
            got = st_.padded(name)[valid].float()
            bound = torch.zeros_like(got)
            if name in st_.quantized:
                group = st_.quantized[name][1]
                scale = st_.padded(f"{name}.scale")[valid].float()  # (N, D / group)
                half = scale.repeat_interleave(group, dim=-1) / 2
                hi = getattr(cache.method, "bits_hi", None)
                if hi is not None and st_ is layer.segments.get("lo"):  # MiKV: quantized twice (hi, then lo)
                    half = half * (1 + (2 ** st_.bits - 1) / (2 ** hi - 1)) * 1.01
                bound = half + 2e-3 * want.abs().amax(-1, keepdim=True) + 1e-6
            elif st_.fields[name].dtype != torch.float32:
                bound = bound + 1e-3 * want.abs()
            yield name, got, want, bound


def check_invariants(name, cache, t, prompt, budget, history):
    method = cache.method
    inner = getattr(method, "inner", method)
    cfg = cache.config
    for li in range(cfg.n_layer):
        lens = cache.lengths(li)  # (B, H)
        # budgets
        if not type(inner).takes_budget:
            assert (lens == t).all(), f"{name} dropped tokens: {lens.tolist()} of {t}"
        elif prompt <= budget and inner.compresses_at == "prefill":
            assert (lens == t).all(), f"{name} compressed a prompt of {prompt} <= budget {budget}"
        else:
            allowed = inner.layer_budget(li, prompt) if hasattr(inner, "layer_budget") else budget
            if inner.compresses_at == "prefill":
                allowed += t - prompt
            ragged = name == "adakv" or getattr(inner, "head_budgets", "uniform") == "adaptive"
            held = lens.float().mean(-1) if ragged else lens
            assert (held <= allowed + 1e-9).all(), \
                f"{name} layer {li} holds {lens.tolist()} > {allowed} after {t} tokens"
        # alignment, protected tokens, precision
        layer = cache.layers[li]
        for st_ in (layer, *layer.segments.values()):
            n = int(st_.lengths.sum())
            for f, tensor in st_.fields.items():
                rows = tensor.shape[0] * tensor.shape[1] * tensor.shape[2] if st_.uniform else tensor.shape[0]
                assert rows >= n, (name, f)
                assert tuple(st_.padded(f).shape[:3]) == (st_.batch, st_.heads, st_.max_len), (name, f)
        for b in range(cache.batch_size):
            for h in range(cfg.n_head):
                pos, bits = cache.kept_precision(li, b, h)
                assert len(pos) == int(lens[b, h]), (name, li, b, h)
                assert (pos.diff() > 0).all() and (pos >= 0).all() and (pos < t).all(), (name, pos.tolist())
                kept = set(pos.tolist())
                n_sink = min(getattr(inner, "n_sink", 0), t)
                assert set(range(n_sink)) <= kept, f"{name} lost a sink: {sorted(kept)[:8]}"
                window = getattr(inner, "window", 0)
                newest = set(range(max(0, t - window), t))
                assert newest <= kept, f"{name} lost a recent token (window {window}) at t={t}"
                before = history.setdefault((li, b, h), {})
                for p, bt in zip(pos.tolist(), bits.tolist()):
                    assert bt <= before.get(p, bt), f"{name}: precision of position {p} rose {before[p]} -> {bt}"
                    before[p] = bt
    # against an independent walk of every tensor the cache holds (not the breakdown it sums)
    assert cache.memory_bytes() == walk_tensor_bytes(cache), (cache.memory_bytes(), walk_tensor_bytes(cache))
    assert cache.memory_breakdown()["positions"] > 0 and cache.memory_breakdown()["keys"] > 0


def random_model(data, max_heads=4):
    n_head = data.draw(st.sampled_from([h for h in (1, 2, 4) if h <= max_heads]), label="n_head")
    D = data.draw(st.sampled_from([8, 16]), label="head_dim")
    n_layer = data.draw(st.integers(1, 2), label="n_layer")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_head * D, block_size=320, vocab_size=64))
    with torch.no_grad():  # attention far from uniform, as in a trained model
        for block in m.transformer.h:
            block.attn.c_attn.weight[: 2 * n_head * D] *= 3.0
    return m.eval(), D, seed


def property_run(name, backend, data):
    cls = METHODS[name]
    small = backend == "triton"  # the Triton interpreter is slow: smaller shapes
    model, D, seed = random_model(data, max_heads=2 if small else 4)
    B = data.draw(st.integers(1, 2 if small else 3), label="batch")
    prompt = data.draw(st.integers(1, 48 if small else 240), label="prompt")
    calls = [prompt] + data.draw(st.lists(st.sampled_from([1, 1, 1, 3]), min_size=1, max_size=4 if small else 6),
                                 label="later calls")
    total = sum(calls)
    budget = data.draw(st.integers(2, total + 4), label="budget")
    kwargs = draw_kwargs(data.draw, name, D)
    method = cls.scaled(budget, **kwargs)  # (methods without a budget ignore it)
    idx = torch.randint(0, 64, (B, total), generator=torch.Generator().manual_seed(seed))

    cache = KVCache(model.config, method, backend=backend)
    full = KVCache(model.config, "full")
    history = {}
    got = run_calls(model, cache, idx, calls, lambda c, t: check_invariants(name, c, t, prompt, budget, history))
    ref = run_calls(model, full, idx, calls)
    with torch.no_grad():  # the yardstick against a forward pass with no cache (its own causal attention)
        uncached = model(idx)[0]
    assert (ref - uncached).abs().max() < 1e-4, f"full cache vs uncached: {(ref - uncached).abs().max():.3g}"
    for field, stored, true, bound in stored_vs_true(cache, full):
        err = (stored - true).abs()
        assert (err <= bound).all(), f"{name} {field}: max err {err.max():.3g} beyond bound (max excess {(err - bound).max():.3g})"
    lossless = not cls.lossy
    if lossless and (budget >= total or not cls.takes_budget):
        tol = 0 if backend == "torch" else 1e-4
        assert (got - ref).abs().max() <= tol, f"{name} at budget {budget} >= {total}: differs from the full cache"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ALL)
def test_invariants_hold_for_random_models_and_inputs(name, backend, small_chunks):
    """With Triton the decode kernels run in 16-token chunks (small_chunks): caches of 17 tokens
    and more are split over several programs and reduced, as long caches are on a GPU."""
    n = EXAMPLES[backend]

    @settings(max_examples=n)
    @given(data=st.data())
    def prop(data):
        property_run(name, backend, data)

    prop()
