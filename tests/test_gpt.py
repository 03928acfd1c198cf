"""Our GPT against Hugging Face GPT-2, cached against uncached, loading (bad input: test_bad_input.py)."""

import os

import pytest
import torch

from gpt import GPT, GPTConfig
from nanokv import KVCache

from conftest import peaked_model


def hf_model(tmp_path, seed=0):
    """A random transformers GPT-2 saved to tmp_path (skips only the tests that need it)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=300)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf


def test_hf_parity_logits_and_greedy(tmp_path):
    hf = hf_model(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    diff = (ref - got).abs().max().item()
    print(f"max |logits diff| vs transformers: {diff:.3g}")
    assert diff < 1e-5
    prompt = idx[:1, :10]
    ref_tokens = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(prompt))
    got_tokens = ours.generate(prompt, 20, temperature=0)
    assert torch.equal(ref_tokens, got_tokens)


def test_hf_pytorch_bin_dir(tmp_path):
    hf = hf_model(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max() < 1e-5


def test_cached_equals_uncached():
    m = peaked_model()
    idx = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = m(idx)
        cache = KVCache(m.config, "full")
        logits = [m(idx[:, :40], cache=cache)[0]]
        logits.append(m(idx[:, 40:45], cache=cache)[0])  # a continuation chunk
        for t in range(45, 60):
            logits.append(m(idx[:, t:t + 1], cache=cache)[0])
    diff = (torch.cat(logits, 1) - full).abs().max().item()
    print(f"max |cached - uncached| = {diff:.3g}")
    assert diff < 1e-5
    assert torch.equal(torch.cat(logits, 1).argmax(-1), full.argmax(-1))


def test_generate_with_and_without_cache_agree():
    m = peaked_model()
    prompt = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    a = m.generate(prompt, 25, temperature=0)  # its own cache, under torch.inference_mode
    cache = KVCache(m.config)
    b = m.generate(prompt, 20, cache=cache, temperature=0)  # the caller's cache, under torch.no_grad
    seq = prompt
    with torch.no_grad():  # uncached greedy recomputation
        for _ in range(25):
            seq = torch.cat([seq, m(seq)[0][:, -1:].argmax(-1)], 1)
        # the caller's cache goes on outside generate (its tensors are not inference tensors)
        b = torch.cat([b, m.generate(b[:, -1:], 5, cache=cache, temperature=0)[:, 1:]], 1)
    assert torch.equal(a, b) and torch.equal(a, seq)
    assert not a.is_inference() and not any(layer.fields["k"].is_inference() for layer in cache.layers)
    a[0, 0] = 7  # generate's result is an ordinary tensor: in-place writes work


def test_bench_plain_loop_generates_what_generate_does():
    """bench.py's plain loop (the eager floor it compares against) decodes the same tokens."""
    import bench

    m = peaked_model()
    prompt = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(bench.plain_generate(m, prompt, 12), m.generate(prompt, 12, temperature=0))


def test_sampling_is_seeded():
    m = peaked_model()
    p = torch.zeros(1, 5, dtype=torch.long)
    a = m.generate(p, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(5))
    b = m.generate(p, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(5))
    c = m.generate(p, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)  # same seed repeats, another seed differs


def sample_next(m, prompt, n, **kw):
    """n independent draws of the token after prompt (one batch of n identical rows)."""
    rows = prompt.expand(n, -1)
    return m.generate(rows, 1, generator=torch.Generator().manual_seed(7), **kw)[:, -1]


@pytest.mark.parametrize("temperature,top_k", [(0.5, None), (2.0, None), (1.0, 5), (3.0, 3)])
def test_sampling_follows_the_tempered_distribution(temperature, top_k):
    """Empirical next-token frequencies over 4000 draws against softmax(logits / T) restricted to
    the top k, on the 6 most likely tokens plus "the rest" (total variation < 0.04; the draws' own
    noise is about 0.01), and far from the distribution of another temperature."""
    m = peaked_model()
    with torch.no_grad():  # sharpen the random model's near-uniform logits (ln_f is not tied)
        m.transformer.ln_f.weight.mul_(6.0)
    prompt = torch.arange(5)[None]
    with torch.no_grad():
        logits = m(prompt)[0][0, -1].double()
    top = torch.topk(logits, 6).indices

    def grouped(p):  # (V,) -> (7,): the 6 most likely tokens, then everything else
        return torch.cat([p[top], (1 - p[top].sum()).clamp_min(0)[None]])

    def tempered(t, k):
        z = logits.clone()
        if k is not None:
            z[z < torch.topk(z, k).values[-1]] = -float("inf")
        return torch.softmax(z / t, -1)

    want = tempered(temperature, top_k)
    draws = sample_next(m, prompt, 4000, temperature=temperature, top_k=top_k)
    got = torch.bincount(draws, minlength=want.numel()).double() / 4000
    tv = 0.5 * (grouped(got) - grouped(want)).abs().sum().item()
    other = tempered(1.0 if temperature != 1.0 else 2.5, top_k)
    gap = 0.5 * (grouped(want) - grouped(other)).abs().sum().item()
    print(f"T={temperature} top_k={top_k}: total variation {tv:.3f}; another temperature is {gap:.3f} away")
    assert tv < 0.04
    assert gap > 0.15  # the check can tell this temperature from another one
    if top_k is not None:  # never a token outside the top k
        assert set(draws.tolist()) <= set(torch.topk(logits, top_k).indices.tolist())


def test_top_k_one_is_greedy():
    m = peaked_model()
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(8))
    greedy = m.generate(prompt, 15, temperature=0)
    for t in (0.7, 5.0):
        sampled = m.generate(prompt, 15, temperature=t, top_k=1, generator=torch.Generator().manual_seed(9))
        assert torch.equal(sampled, greedy)


def test_presets_and_param_count():
    assert GPTConfig.preset("gpt2").n_embd == 768
    m = GPT(GPTConfig.preset("gpt2"))
    assert m.num_params(non_embedding=False) == 124_439_808  # GPT-2 small with tied embeddings
    assert m.lm_head.weight is m.transformer.wte.weight


def test_bias_off_and_tie():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=256, bias=False))
    assert m.transformer.h[0].attn.c_attn.bias is None
    idx = torch.tensor([[3, 1, 4, 1]])
    with torch.no_grad():
        out, _ = m(idx)
        assert out.shape == (1, 4, 256)
        # tied: the output projection is the token embedding, so writing one changes the other
        assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
        x = m.transformer.ln_f(m.transformer.h[0](m.transformer.wte(idx) + m.transformer.wpe.weight[:4]))
        assert torch.allclose(out, x @ m.transformer.wte.weight.t(), atol=1e-6)
        m.transformer.wte.weight[7].zero_()
        assert (m(idx)[0][..., 7] == 0).all()


def test_own_checkpoint_roundtrip(tmp_path):
    m = peaked_model()
    path = tmp_path / "m.pt"
    m.save_checkpoint(str(path))
    m2 = GPT.from_pretrained(str(path))
    idx = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        assert torch.equal(m(idx)[0], m2(idx)[0])
    assert m2.tokenizer_name == "byte" and m2.tokenizer.decode(m2.tokenizer.encode("hé")) == "hé"


def test_weight_layouts_survive_loading_and_casting():
    """gpt.column_major: c_attn, attn.c_proj, c_fc and the tied embedding / lm_head are stored
    column-major (the faster decode layout on CPU), mlp.c_proj row-major; loading a checkpoint and
    casting keep the layouts and the tying."""
    for m in (GPT.from_pretrained("nanokv-tiny"), GPT.from_pretrained("nanokv-tiny").half()):
        assert m.transformer.wte.weight is m.lm_head.weight
        block = m.transformer.h[0]
        for lin in (m.lm_head, block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc):
            assert lin.weight.stride() == (1, lin.weight.size(0)), lin
        assert block.mlp.c_proj.weight.is_contiguous()


@pytest.mark.parametrize("field,value", [("layer_norm_epsilon", 1e-3), ("activation_function", "gelu_pytorch_tanh"),
                                         ("n_inner", 256), ("scale_attn_weights", True)])
def test_hf_config_fields_we_accept_give_parity(tmp_path, field, value):
    """Every GPT2Config value that loads computes what transformers computes (logits within 1e-5);
    the values that would not are refused (the catalogue in test_bad_input.py)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=300, **{field: value})
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    print(f"{field}={value}: max |logits diff| {diff:.2g}")
    assert diff < 1e-5


def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, whatever this machine has."""
    import gpt

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(gpt.socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2"])
def test_hub_name_offline_fails_fast_with_the_local_route(monkeypatch, tmp_path, name):
    pytest.importorskip("transformers")
    offline(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    os.makedirs("gpt2")  # a local folder named like the model, holding only tokenizer files, does not shadow it
    open("gpt2/vocab.json", "w").close()
    import time

    t0 = time.time()
    with pytest.raises(OSError, match=r"cannot download .*not reachable.*save_pretrained\(DIR\).*GPT.from_pretrained\(DIR\)"):
        GPT.from_pretrained(name)
    assert time.time() - t0 < 10


def test_gpt2_tokenizer_offline_names_the_local_route(monkeypatch):
    import tiktoken

    from nanokv.tokenizer import get_tokenizer

    def no_network(name):
        raise ConnectionError("Max retries exceeded")

    monkeypatch.delenv("NANOKV_GPT2_DIR", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(ConnectionError, match=r"NANOKV_GPT2_DIR \(or gpt2_dir=, or --gpt2-dir\)"):
        get_tokenizer("gpt2")


def test_hf_gpt2_directory_brings_its_own_tokenizer(tmp_path):
    """A save_pretrained GPT-2 directory with the tokenizer's vocab.json + merges.txt: the model's
    tokenizer reads them, offline, and is GPT-2's BPE."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from conftest import SHARED_GPT2

    if not os.path.isfile(os.path.join(SHARED_GPT2, "encoder.json")):
        pytest.skip("GPT-2 tokenizer files not in ../shared/data")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)  # vocabulary 50257
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    shutil.copy(os.path.join(SHARED_GPT2, "encoder.json"), tmp_path / "vocab.json")
    shutil.copy(os.path.join(SHARED_GPT2, "vocab.bpe"), tmp_path / "merges.txt")
    model = GPT.from_pretrained(str(tmp_path))
    assert model.tokenizer_name == "gpt2" and model.tokenizer.encode("Hello world") == [15496, 995]


def test_a_cache_outside_no_grad_holds_no_graph():
    """model(prompt, cache=cache) with autograd on: after 50 decode steps the cache holds no tensor
    that requires grad (its memory does not grow with a graph) and clone() works."""
    m = peaked_model()
    cache = KVCache(m.config, "h2o", budget=16)
    logits, _ = m(torch.randint(0, 256, (1, 20)), cache=cache)
    for _ in range(50):
        logits, _ = m(logits[:, -1:].argmax(-1), cache=cache)
    held = [t for layer in cache.layers for t in layer.fields.values()]
    assert held and not any(t.requires_grad or t.grad_fn is not None for t in held)
    twin = cache.clone()
    assert torch.equal(twin.kept_positions(0, 0, 0), cache.kept_positions(0, 0, 0))


def test_a_cache_serves_one_model():
    a, b = peaked_model(seed=0), peaked_model(seed=1)
    cache = KVCache(a.config, "full")
    with torch.no_grad():
        a(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="another model's keys and values"):
            b(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        cache.reset()  # a reset cache may serve another model
        b(torch.zeros(1, 3, dtype=torch.long), cache=cache)
