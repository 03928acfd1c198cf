"""Our GPT against Hugging Face GPT-2, cached against uncached, loading (bad input: test_bad_input.py)."""

import os

import pytest
import torch

from gpt import GPT, GPTConfig
from nanokv import KVCache

from conftest import peaked_model

transformers = pytest.importorskip("transformers")


def hf_model(tmp_path, seed=0):
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
    assert torch.equal(a, b)


def test_presets_and_param_count():
    assert GPTConfig.preset("gpt2").n_embd == 768
    m = GPT(GPTConfig.preset("gpt2"))
    assert m.num_params(non_embedding=False) == 124_439_808  # GPT-2 small with tied embeddings
    assert m.lm_head.weight is m.transformer.wte.weight


def test_bias_off_and_tie():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=256, bias=False))
    assert m.transformer.h[0].attn.c_attn.bias is None
    out, _ = m(torch.zeros(1, 4, dtype=torch.long))
    assert out.shape == (1, 4, 256)


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
