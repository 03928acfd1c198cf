"""nanokv.hf: nanokv's cache inside transformers models. Offline: random weights built from
configs (grouped-query Llama, Qwen2, Qwen3, Mistral with rotary positions; GPT-2)."""

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nanokv.hf as nh  # noqa: E402
from gpt import GPT  # noqa: E402
from nanokv import METHODS, KVCache  # noqa: E402
from nanokv.api import decide  # noqa: E402

from conftest import walk_tensor_bytes  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
ROTARY = ("llama", "qwen2", "qwen3", "mistral")
LOSSLESS = {"mikv": dict(rho=1.0, balancer=False)}  # a quantizer's settings that keep every token exactly


def tiny(kind="llama", seed=0, layers=2, kv_heads=2, dtype=torch.float32, **overrides):
    """A random causal LM: 4 query heads of dim 16 sharing `kv_heads` key-value heads."""
    torch.manual_seed(seed)
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=256)
    kw.update(overrides)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind](**kw))
    return model.to(dtype).eval()


def ids(B=1, T=40, seed=1, vocab=96):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def step_logits(model, prompt, steps, cache):
    """Logits of the prompt's last position, then of `steps` greedy tokens fed one at a time."""
    out, tokens = [], []
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits = model(nxt, past_key_values=cache).logits[:, -1]
    return torch.stack(out, 1), torch.cat(tokens, 1)


def method(name, budget, **kw):
    return METHODS[name](**LOSSLESS[name]) if name in LOSSLESS and budget is None else METHODS[name].scaled(budget, **kw)


# ------------------------------------------------------------------ the full cache is transformers' cache
@pytest.mark.parametrize("kind", ROTARY)
def test_full_matches_dynamic_cache(kind):
    model, prompt = tiny(kind), ids(B=2)
    ref, ref_tokens = step_logits(model, prompt, 6, transformers.DynamicCache(config=model.config))
    got, got_tokens = step_logits(model, prompt, 6, nh.attach(model, "full"))
    diff = (ref - got).abs().max().item()
    print(f"{kind}: full vs DynamicCache, max |logits diff| {diff:.2e}")
    assert diff < 1e-5 and torch.equal(ref_tokens, got_tokens)
    want = model.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=transformers.DynamicCache(config=model.config))
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=nh.attach(model, "full")), want)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision(dtype, tol):
    model, prompt = tiny("llama", dtype=dtype), ids()
    ref, _ = step_logits(model, prompt, 4, transformers.DynamicCache(config=model.config))
    cache = nh.attach(model, "h2o", budget=1000)  # keeps everything: the full cache's logits
    got, _ = step_logits(model, prompt, 4, cache)
    diff = (ref.float() - got.float()).abs().max().item()
    print(f"{dtype}: h2o keeping everything vs DynamicCache, max |logits diff| {diff:.2e}")
    assert diff < tol and cache.kv.layers[0].padded("k").dtype == dtype
    small = nh.attach(model, "snapkv", budget=16, window=4)
    model.generate(prompt, max_new_tokens=4, do_sample=False, past_key_values=small)
    assert small.lengths(1).eq(16 + 3).all()  # 16 kept at prefill, then the decoded tokens appended


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_keeping_everything_is_full(kind, name):
    if METHODS[name].lossy and name not in LOSSLESS:
        pytest.skip("a quantizer: lossy at any budget (its lossless settings: test_quantization.py)")
    model, prompt = tiny(kind), ids(B=2)
    ref, _ = step_logits(model, prompt, 4, nh.attach(model, "full"))
    budget = None if name in LOSSLESS else 1000
    got, _ = step_logits(model, prompt, 4, nh.attach(model, method(name, budget)))
    assert torch.equal(ref, got), f"{name}: max diff {(ref - got).abs().max().item():.2e}"


# ------------------------------------------------------------------ the decisions are nanokv's
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_kept_sets_equal_the_tensor_level_decision(kind, name, monkeypatch):
    """Record every layer's q, k, v as the cache received them (prefill, then decode steps);
    nanokv.api.decide on those tensors keeps the same tokens at the same bits in every head."""
    model, prompt = tiny(kind), ids(T=36)
    cache = nh.attach(model, method(name, 12))
    calls = {}
    attend = cache.kv.attend

    def record(i, q, k, v):
        calls.setdefault(i, []).append((q, k, v))
        return attend(i, q, k, v)

    monkeypatch.setattr(cache.kv, "attend", record)
    model.generate(prompt, max_new_tokens=5, do_sample=False, past_key_values=cache)
    for i, seq in calls.items():
        q, k, v = (torch.cat([c[j] for c in seq], dim=2) for j in range(3))
        d = decide(method(name, 12), q, k, v, chunks=[c[0].size(2) for c in seq], layer=i,
                   n_layers=model.config.num_hidden_layers)
        for h in range(k.size(1)):
            pos, bits = cache.kept_precision(i, 0, h)
            assert torch.equal(pos, d.kept[0, h].nonzero().squeeze(1)), (name, i, h)
            assert torch.equal(bits.to(torch.int32), d.bits[0, h, pos]), (name, i, h)


@pytest.mark.parametrize("name", ["full", "h2o", "snapkv", "adakv", "mikv", "kivi", "d2o"])
def test_memory_is_a_walk_and_scales_with_kv_heads(name):
    mem = {}
    for kv_heads in (1, 2, 4):
        model = tiny("llama", kv_heads=kv_heads)
        cache = nh.attach(model, method(name, 12))
        model.generate(ids(B=2), max_new_tokens=3, do_sample=False, past_key_values=cache)
        assert cache.memory_bytes() == walk_tensor_bytes(cache.kv) == sum(cache.memory_breakdown().values())
        mem[kv_heads] = cache.memory_breakdown()
        assert cache.lengths(0).shape == (2, kv_heads)
    print(name, {h: m["keys"] + m["values"] for h, m in mem.items()})
    if name != "adakv":  # Ada-KV's head budgets depend on the scores: linear only in expectation
        for kind in ("keys", "values"):
            assert mem[4][kind] == 2 * mem[2][kind] == 4 * mem[1][kind], (kind, mem)


# ------------------------------------------------------------------ GPT-2 both ways
@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=300)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(path)
    return hf, GPT.from_pretrained(str(path))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gpt2_through_transformers_equals_nanokv_gpt(gpt2_pair, name):
    hf, ours = gpt2_pair
    prompt = ids(T=40, vocab=300)
    theirs = nh.attach(hf, method(name, 16))
    want = hf.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=theirs, pad_token_id=0,
                       attention_mask=torch.ones_like(prompt))
    mine = KVCache(ours.config, method(name, 16))
    got = ours.generate(prompt, 8, cache=mine, temperature=0)
    assert torch.equal(want, got)
    for i in range(2):
        for h in range(4):
            a, b = theirs.kept_precision(i, 0, h), mine.kept_precision(i, 0, h)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (name, i, h)
    a, b = theirs.memory_breakdown(), mine.memory_breakdown()
    a.pop("padding"), b.pop("padding")  # GPT.generate reserves the decode's slots at once (cache.reserve)
    assert a == b


# ------------------------------------------------------------------ rotary: StreamingLLM's in-cache positions
def test_repositioned_cache_equals_a_fresh_prefill_of_the_kept_tokens():
    """One layer, so a token's key depends on the token and its position only: after StreamingLLM
    drops the middle, the next tokens' logits equal a fresh prefill of the kept tokens at
    positions 0..n-1 (and the model never sees a position past the budget)."""
    model, prompt = tiny("llama", layers=1, max_position_embeddings=64), ids(T=40)
    cache = nh.attach(model, "streamingllm", budget=10, n_sink=2, reposition=True)
    tokens = prompt
    with torch.no_grad():
        model(prompt, past_key_values=cache)
        for step in range(4):
            kept = cache.kept_positions(0, 0, 0)  # what the next token attends to: the sinks, the newest
            nxt = ids(T=1, seed=100 + step)
            got = model(nxt, past_key_values=cache).logits[:, -1]
            fresh_ids = torch.cat([tokens[:, kept], nxt], 1)
            tokens = torch.cat([tokens, nxt], 1)
            want = model(fresh_ids, past_key_values=transformers.DynamicCache(config=model.config)).logits[:, -1]
            diff = (got - want).abs().max().item()
            print(f"step {step}: repositioned vs fresh prefill of {fresh_ids.size(1)} tokens: max diff {diff:.2e}")
            assert diff < 1e-5
    assert kept.tolist() == [0, 1, *range(tokens.size(1) - 9, tokens.size(1) - 1)]
    # the same stream without reposition reads kept keys at their original positions: not equal
    plain = nh.attach(model, "streamingllm", budget=10, n_sink=2)
    with torch.no_grad():
        model(prompt, past_key_values=plain)
        assert (model(ids(T=1, seed=100), past_key_values=plain).logits[:, -1] - got).abs().max() > 1e-3


def test_reposition_generates_past_the_trained_context():
    model = tiny("llama", max_position_embeddings=32)
    cache = nh.attach(model, "streamingllm", budget=16, n_sink=4, reposition=True)
    out = model.generate(ids(T=24), max_new_tokens=40, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 64) and cache.kv.seq_len == 63 and cache.lengths(1).eq(16).all()


# ------------------------------------------------------------------ the Triton backend (interpreted on CPU)
@pytest.mark.parametrize("name", ["full", "h2o", "snapkv", "tova"])
def test_triton_backend_matches_torch(name):
    model, prompt = tiny("llama"), ids(T=24)
    ref, ref_tokens = step_logits(model, prompt, 3, nh.attach(model, method(name, 12)))
    got, got_tokens = step_logits(model, prompt, 3, nh.attach(model, method(name, 12), backend="triton"))
    diff = (ref - got).abs().max().item()
    print(f"{name}: triton vs torch through nanokv.hf, max |logits diff| {diff:.2e}")
    assert diff < 1e-4 and torch.equal(ref_tokens, got_tokens)


# ------------------------------------------------------------------ bad input: clear errors
def test_unsupported_architecture():
    cfg = transformers.GPTNeoXConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128)
    with pytest.raises(ValueError, match=r"nanokv.hf supports \['gpt2', 'llama'"):
        nh.attach(transformers.GPTNeoXForCausalLM(cfg), "h2o", budget=8)


def test_model_switched_to_another_attention_implementation():
    model = tiny()
    cache = nh.attach(model, "h2o", budget=8)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attends with 'eager'"):
        model(ids(), past_key_values=cache)
    nh.detach(model)  # a model no longer attached attends as before
    with torch.no_grad():
        assert torch.allclose(model(ids()).logits, tiny()(ids()).logits, atol=1e-5)


def test_cache_used_with_another_model():
    first, second = tiny(seed=0), tiny(seed=1)
    cache = nh.attach(first, "h2o", budget=8)
    with pytest.raises(ValueError, match="attached to another model"):
        second(ids(), past_key_values=cache)
    nh.attach(second, "h2o", budget=8)
    with pytest.raises(ValueError, match="attached to another model"):
        second(ids(), past_key_values=cache)


def test_two_models_in_two_threads_keep_their_own_handoff(monkeypatch):
    """update() hands the new keys to the attention function through per-thread state: a model
    running in another thread between one layer's update() and its attention (forced here)
    neither takes nor clears them."""
    import threading

    first, second = tiny(seed=0), tiny(seed=1)
    with torch.no_grad():
        want = first(ids(), past_key_values=nh.attach(first, "full")).logits
    updated, other_done, paused = threading.Event(), threading.Event(), []
    real = nh._Slot.update

    def update(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if threading.current_thread().name == "first" and not paused:
            paused.append(True)
            updated.set()
            other_done.wait(timeout=60)  # the second model runs a whole forward pass meanwhile
        return out

    monkeypatch.setattr(nh._Slot, "update", update)
    cache, got = nh.attach(first, "full"), []

    def run_first():
        with torch.no_grad():
            got.append(first(ids(), past_key_values=cache).logits)

    thread = threading.Thread(target=run_first, name="first")
    thread.start()
    assert updated.wait(timeout=60)
    with torch.no_grad():
        second(ids(seed=2), past_key_values=nh.attach(second, "full"))
    other_done.set()
    thread.join(timeout=60)
    assert torch.equal(got[0], want)
    for layer in range(2):  # every layer attended through nanokv's cache, layer 0 included
        assert cache.kept_positions(layer, 0, 1).tolist() == list(range(40))


def test_options_the_architecture_cannot_honour():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50))
    with pytest.raises(ValueError, match="reposition=True .* needs a rotary model"):
        nh.attach(gpt2, "streamingllm", budget=8, reposition=True)
    with pytest.raises(ValueError, match="quantized storage cannot hold StreamingLLM's repositioned keys"):
        nh.attach(tiny(), METHODS["quantized"](METHODS["streamingllm"](budget=8, reposition=True)))
    mistral = tiny("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="sliding window of 16 tokens"):
        mistral(ids(T=20), past_key_values=nh.attach(mistral, "h2o", budget=8))


def test_left_padded_batch_is_refused():
    model, prompt = tiny(), ids(B=2, T=12)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # the second prompt is 3 tokens shorter, padded on the left
    with pytest.raises(ValueError, match="padded batch"):
        model.generate(prompt, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       past_key_values=nh.attach(model, "h2o", budget=8))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False,
                         pad_token_id=0, past_key_values=nh.attach(model, "h2o", budget=8))
    assert out.shape == (2, 14)  # an all-ones mask is no padding


def test_beam_search_is_refused():
    model = tiny()
    with pytest.raises(NotImplementedError, match="not supported with a nanokv cache"):
        model.generate(ids(), num_beams=2, max_new_tokens=2, do_sample=False, past_key_values=nh.attach(model, "h2o", budget=8))


# ------------------------------------------------------------------ the README's section runs as written
def test_readme_transformers_section_runs():
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = text.split("## Use with transformers", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    scope = {}
    exec(compile(code, "README.md (Use with transformers)", "exec"), scope)
    assert scope["cache"].memory_bytes() < scope["full"].memory_bytes()


# ------------------------------------------------------------------ python -m nanokv.eval --model hf:DIR
def test_eval_runs_on_a_transformers_directory(tmp_path):
    from conftest import SHARED_GPT2

    import nanokv.eval as nkeval

    if not os.path.isfile(os.path.join(SHARED_GPT2, "encoder.json")):
        pytest.skip("GPT-2 tokenizer files not in ../shared/data")
    tok = transformers.GPT2Tokenizer(vocab=os.path.join(SHARED_GPT2, "encoder.json"),
                                     merges=os.path.join(SHARED_GPT2, "vocab.bpe"))
    tiny("llama", vocab_size=len(tok), bos_token_id=None, eos_token_id=None).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = nkeval.main([f"--model=hf:{tmp_path / 'model'}", "--context=128", "--methods=full,snapkv,streamingllm",
                        "--budgets=25%", "--tasks=passkey,ppl", "--samples=2", "--windows=1",
                        f"--out={tmp_path / 'out'}", "--no-plots", "--quiet"])
    got = {(r["method"], r["task"]): r for r in rows}
    assert set(got) == {(m, t) for m in ("full", "snapkv", "streamingllm") for t in ("passkey", "ppl")}
    assert got["full", "ppl"]["mem_fraction_of_full"] == 1.0
    assert got["snapkv", "ppl"]["mem_fraction_of_full"] == pytest.approx(32 / 127, abs=1e-3)  # 25% of 128, of 127 read
    assert 0 < got["full", "ppl"]["value"] < 10 * len(tok)  # a random model: about the vocabulary size
    with pytest.raises(SystemExit, match="tasks attn and persistence read nanokv's GPT"):
        nkeval.main([f"--model=hf:{tmp_path / 'model'}", "--tasks=attn", f"--out={tmp_path / 'out'}", "--quiet"])


# ------------------------------------------------------------------ against kvpress (optional)
def kvpress_kept(press, model, prompt):
    """{layer: (H_kv, T) bool} the prompt tokens kvpress keeps at prefill. A ScorerPress gathers
    the kept keys (matched back to their positions: rotated keys are distinct); AdaKVPress
    keeps every key and records the ones it masks."""
    from kvpress import AdaKVPress

    kept, cls = {}, type(press)
    original = cls.compress

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        out_k, out_v = original(self, module, hidden_states, keys, values, attentions, kwargs)
        B, H, T, _ = keys.shape
        if isinstance(self, AdaKVPress):
            mask = torch.ones(B, H, T, dtype=torch.bool)
            b, h, t = module.masked_key_indices
            mask[b, h, t] = False
        else:
            match = (out_k[:, :, :, None, :] == keys[:, :, None, :, :]).all(-1)  # (B, H, n_kept, T)
            mask = match.any(2)
        kept[module.layer_idx] = mask[0]
        return out_k, out_v

    cls.compress = compress
    try:
        with torch.no_grad(), press(model):
            model(prompt, past_key_values=transformers.DynamicCache(config=model.config))
    finally:
        cls.compress = original
    return kept


KVPRESS = {  # name: (kvpress press at compression ratio 1/2, nanokv method at the same kept count)
    "snapkv": ("SnapKVPress(compression_ratio=0.5, window_size=8, kernel_size=5)",
               lambda n: METHODS["snapkv"](budget=n, window=8, kernel=5, pool="avg")),
    "tova": ("TOVAPress(compression_ratio=0.5)", lambda n: METHODS["tova"](budget=n)),
    "knorm": ("KnormPress(compression_ratio=0.5)", lambda n: METHODS["knorm"](budget=n)),
    "streamingllm": ("StreamingLLMPress(compression_ratio=0.5, n_sink=4)",
                     lambda n: METHODS["streamingllm"](budget=n, n_sink=4)),
    "adakv": ("AdaKVPress(SnapKVPress(compression_ratio=0.5, window_size=8, kernel_size=5))",
              lambda n: METHODS["adakv"](budget=n, window=8, kernel=5, pool="avg")),
}


@pytest.mark.parametrize("name", sorted(KVPRESS))
def test_kept_sets_against_kvpress(name):
    """Prefill decisions of kvpress's presses and nanokv's methods on the same tiny Llama (4 query
    heads, 2 key-value heads, rotary): the share of kvpress's kept tokens nanokv keeps too.
    kvpress pins its own transformers: run in a separate environment (BENCHMARKS.md)."""
    kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (it pins its own transformers)")
    model, prompt = tiny("llama"), ids(T=64)
    theirs = kvpress_kept(eval(KVPRESS[name][0], vars(kvpress)), model, prompt)
    cache = nh.attach(model, KVPRESS[name][1](32))
    with torch.no_grad():
        model(prompt, past_key_values=cache)
    nh.detach(model)
    shares = []
    for i, mask in theirs.items():
        for h in range(mask.size(0)):
            mine = torch.zeros(64, dtype=torch.bool).index_fill(0, cache.kept_positions(i, 0, h), True)
            shares.append((mine & mask[h]).sum().item() / mask[h].sum().item())
    share = sum(shares) / len(shares)
    print(f"{name}: nanokv keeps {100 * share:.1f}% of the tokens kvpress keeps (min over heads {100 * min(shares):.1f}%)")
    # exact for the same rule, but for ties: a repeated token has the same key norm at every
    # position in layer 0 (nanokv gives ties to the more recent token, kvpress's top-k to either);
    # TOVA's press always keeps the newest token, nanokv's scores it like the others; Ada-KV's
    # safeguards differ by design (nanokv/methods/adakv.py)
    assert share >= {"adakv": 0.9, "tova": 0.95, "knorm": 0.98}.get(name, 1.0)
