"""
Decode-speed benchmark: our GPT with the full cache against Hugging Face transformers'
GPT-2 `generate` on the same randomly initialised weights, on this machine's CPU.

    python bench.py                      # GPT-2 124M and a tiny config, prompt 512, 128 new tokens
    python bench.py --sizes tiny --new 64
    python bench.py --methods --threads 1   # every method's decode step against the full cache's, at
                                            # GPT-2 124M's shape and on the tiny model; rooflines
    python bench.py --hf --threads 1        # nanokv.hf's full cache against transformers' DynamicCache on
                                            # a tiny random Llama, and every method's step and memory beside

Everything is measured side by side in one run and printed as ratios. Also printed: the
memory-bandwidth roofline (bytes a decode step must read / bandwidth measured here) and the
KV-cache bytes per token of every GPT-2 size.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig
from nanokv import KVCache

SIZES = {
    "gpt2": GPTConfig.preset("gpt2"),
    "tiny": GPTConfig.preset("tiny", block_size=1024),  # room for prompt + new tokens
}


def measure_bandwidth(nbytes=512 * 2**20, repeats=5):
    """Read bandwidth in bytes/s: the best of a few passes of torch.sum over a large tensor."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def best_of(fn, repeats):
    return best_of_each([fn], repeats)[0]


def best_of_each(fns, repeats):
    """The best time of each function over `repeats` rounds, the functions taking turns within
    a round (so a slow spell of a shared machine hits all of them, not one)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def decode_bytes_per_step(n_params, config, context, dtype_bytes=4):
    """Bytes one decode step must read: every weight once (the tied embedding once, as the
    output projection) plus the keys and values of `context` cached tokens."""
    kv = 2 * config.n_layer * context * config.n_embd * dtype_bytes
    return n_params * dtype_bytes + kv


def plain_generate(model, prompt, n_new):
    """The same greedy decode as one plain loop: preallocated keys and values, PyTorch's fused
    attention, no cache object, no method hooks, no checks. Not part of nanokv: it shows what an
    eager decode of these weights costs at least, so the table shows what the pluggable cache and
    its shared reference attention cost on top (the "cache cost" column)."""
    c, tr = model.config, model.transformer
    B, T = prompt.shape
    H, D = c.n_head, c.n_embd // c.n_head
    K = torch.empty(c.n_layer, B, H, T + n_new, D)  # every layer's keys, preallocated
    V = torch.empty_like(K)
    idx, out, n = prompt, [prompt], 0  # n: tokens already in K and V
    for _ in range(n_new):
        t = idx.size(1)
        x = tr.wte(idx) + tr.wpe.weight[n : n + t]
        for i, block in enumerate(tr.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).view(B, t, 3, H, D).permute(2, 0, 3, 1, 4)
            K[i, :, :, n : n + t], V[i, :, :, n : n + t] = k, v
            y = F.scaled_dot_product_attention(q, K[i, :, :, : n + t], V[i, :, :, : n + t], is_causal=t > 1)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, t, c.n_embd))
            x = x + block.mlp(block.ln_2(x))
        idx = model.lm_head(tr.ln_f(x[:, -1:])).argmax(-1)  # (B, 1)
        out.append(idx)
        n += t
    return torch.cat(out, 1)


def bench_size(name, config, prompt_len, n_new, repeats, bandwidth):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                        n_positions=config.block_size, vocab_size=config.vocab_size,
                        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = GPT.from_pretrained(d)  # the very same weights
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)

    def run_ours():
        return ours.generate(prompt, n_new, temperature=0)

    def run_hf():
        return hf.generate(prompt, attention_mask=mask, max_new_tokens=n_new, do_sample=False)

    def run_plain():
        with torch.inference_mode():
            return plain_generate(ours, prompt, n_new)

    def prefill_ours():
        with torch.inference_mode():  # as generate() runs without a cache of the caller's
            ours(prompt, cache=KVCache(ours.config), last_logits_only=True)

    with torch.no_grad():
        tokens = run_ours()  # also the warm-ups
        same = torch.equal(tokens, run_hf()) and torch.equal(tokens, run_plain())
        t_ours, t_hf, t_plain, t_prefill = best_of_each([run_ours, run_hf, run_plain, prefill_ours], repeats)
    step = (t_ours - t_prefill) / (n_new - 1)  # one decode step (the first token comes from the prefill)
    need = decode_bytes_per_step(ours.num_params(non_embedding=False), config, prompt_len + n_new // 2)
    return {
        "size": name, "params_M": ours.num_params(non_embedding=False) / 1e6, "same_tokens": same,
        "ours_s": t_ours, "hf_s": t_hf, "speedup": t_hf / t_ours, "plain_s": t_plain, "ours_tok_s": n_new / t_ours,
        "hf_tok_s": n_new / t_hf, "decode_ms": 1e3 * step, "roofline_ms": 1e3 * need / bandwidth,
    }


def decode_step_times(model, prompt, methods, budget, steps, repeats):
    """Seconds per decode step of each method, prefill excluded: every method prefills the same
    prompt once; then each round clones each prefilled cache and times `steps` greedy decode
    steps, the methods taking turns (best of `repeats` rounds)."""
    prefilled = []
    with torch.no_grad():
        for cls in methods:
            cache = KVCache(model.config, cls.scaled(budget) if cls.takes_budget else cls())
            logits, _ = model(prompt, cache=cache, last_logits_only=True)
            prefilled.append((cache, logits[:, -1].argmax(-1, keepdim=True)))

    def timed(cache, first):
        def run():
            c, tok = cache.clone(), first
            t = time.perf_counter()
            for _ in range(steps):
                logits, _ = model(tok, cache=c, last_logits_only=True)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t
        return run

    runs = [timed(c, t) for c, t in prefilled]
    best = [float("inf")] * len(runs)
    with torch.no_grad():
        for r in runs:  # warm-up
            r()
        for _ in range(repeats):
            for i, r in enumerate(runs):
                best[i] = min(best[i], r())
    return [b / steps for b in best]


def bench_methods(budget_frac: float, prompt_len: int, n_new: int, repeats: int, bandwidth: float,
                  steps: int = 16, gpt2_prompt: int = 896):
    """Every registered method's decode step against the full cache's, measured side by side at
    GPT-2 124M's shape (random weights, prompt `gpt2_prompt`) and on the committed tiny model;
    and, on the tiny model, its KV size against an fp16 full cache."""
    from nanokv import METHODS

    methods = list(METHODS.values())
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    big = GPT(GPTConfig.preset("gpt2")).eval()
    big_budget = max(1, round(budget_frac * gpt2_prompt))
    big_prompt = torch.randint(0, big.config.vocab_size, (1, gpt2_prompt), generator=gen)
    big_times = decode_step_times(big, big_prompt, methods, big_budget, steps, repeats)
    del big
    model = GPT.from_pretrained("nanokv-tiny").eval()
    model_fp16 = GPT.from_pretrained("nanokv-tiny").half().eval()  # sizes as an fp16 model holds them
    budget = max(1, round(budget_frac * prompt_len))
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    tiny_times = decode_step_times(model, prompt, methods, budget, steps, repeats)
    rows = []
    for cls, tb, tt in zip(methods, big_times, tiny_times):
        with torch.no_grad():
            half = KVCache(model.config, cls.scaled(budget) if cls.takes_budget else cls())
            model_fp16(torch.cat([prompt, prompt[:, :n_new]], 1), cache=half)  # its size in an fp16 model
        rows.append({"method": cls.name, "gpt2_step_ms": 1e3 * tb, "tiny_step_ms": 1e3 * tt,
                     "fraction_of_fp16": half.compression_report()["fraction_of_fp16"]})
    full = next(r for r in rows if r["method"] == "full")
    print(f"\ndecode step of every method against the full cache's, {steps} steps after the prefill, best of "
          f"{repeats}, budget {100 * budget_frac:.0f}% of the prompt where a method takes one")
    print(f"  GPT-2 124M shape (random weights): prompt {gpt2_prompt}, budget {big_budget}")
    print(f"  tiny model: prompt {prompt_len}, budget {budget}")
    print(f"{'method':14} {'gpt2 ms':>8} {'vs full':>8} {'tiny ms':>8} {'vs full':>8} {'KV size vs fp16':>16}")
    for r in rows:
        r["gpt2_ratio"] = r["gpt2_step_ms"] / full["gpt2_step_ms"]
        r["tiny_ratio"] = r["tiny_step_ms"] / full["tiny_step_ms"]
        print(f"{r['method']:14} {r['gpt2_step_ms']:8.2f} {r['gpt2_ratio']:7.2f}x {r['tiny_step_ms']:8.2f} "
              f"{r['tiny_ratio']:7.2f}x {r['fraction_of_fp16']:15.3f}")
    # roofline: a decode step reads every weight once and the cache it holds
    c = GPTConfig.preset("gpt2")
    weights = 124.4e6 * 2  # fp16 GPT-2 124M
    print("\nroofline, GPT-2 124M in fp16, one sequence: ms per decode step = (weights + KV held) / bandwidth")
    print(f"{'method':14} " + " ".join(f"{'ctx ' + str(n):>18}" for n in (1024, 8192, 65536)))
    for r in rows:
        cells = []
        for n in (1024, 8192, 65536):
            kv = 2 * c.n_layer * c.n_embd * n * 2 * r["fraction_of_fp16"]
            cells.append(f"{1e3 * (weights + kv) / bandwidth:7.2f} / {1e3 * (weights + kv) / 4.8e12:6.3f}")
        print(f"{r['method']:14} " + " ".join(f"{x:>18}" for x in cells))
    print(f"(each cell: at this machine's {bandwidth / 1e9:.0f} GB/s / at an H200's 4.8 TB/s; the KV share "
          "grows with the context)")
    return rows


def bench_hf(prompt_len: int, steps: int, repeats: int, budget_frac: float):
    """The decode step through nanokv.hf against transformers' own DynamicCache on a tiny random
    grouped-query Llama (CPU, fp32), side by side, prefill excluded; then every method's step and
    the bytes its cache holds, at `budget_frac` of the prompt."""
    import copy

    import transformers

    import nanokv.hf
    from nanokv import METHODS

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    budget = max(1, round(budget_frac * prompt_len))

    def prefilled(cache):
        with torch.no_grad():
            return cache, model(prompt, past_key_values=cache).logits[:, -1:].argmax(-1)

    def timed(cache, first, clone):
        def run():
            c, tok = clone(cache), first
            t = time.perf_counter()
            with torch.no_grad():
                for _ in range(steps):
                    tok = model(tok, past_key_values=c).logits[:, -1:].argmax(-1)
            return (time.perf_counter() - t) / steps
        return run

    names = ["full"] + [n for n in METHODS if n != "full"]
    contenders = [timed(*prefilled(transformers.DynamicCache(config=config)), copy.deepcopy)]
    caches = []
    for name in names:
        cls = METHODS[name]
        cache, first = prefilled(nanokv.hf.attach(model, cls.scaled(budget) if cls.takes_budget else cls()))
        caches.append(cache)
        contenders.append(timed(cache, first, lambda c: c.clone()))
    for run in contenders:  # warm-up
        run()
    best = [float("inf")] * len(contenders)
    for _ in range(repeats):  # the contenders take turns; each run returns its time per step
        for i, run in enumerate(contenders):
            best[i] = min(best[i], run())
    dyn, full = best[0], best[1]
    print(f"\nnanokv.hf on a random Llama (4 layers, 4 query heads, 2 key-value heads, head dim 32), fp32, prompt "
          f"{prompt_len}, {steps} decode steps after the prefill, best of {repeats}, budget {budget} where one is taken")
    print(f"  transformers DynamicCache  {1e3 * dyn:7.3f} ms/step")
    print(f"  nanokv.hf full             {1e3 * full:7.3f} ms/step   {full / dyn:5.2f}x DynamicCache")
    print(f"{'method':14} {'ms/step':>8} {'vs full':>8} {'vs Dynamic':>11} {'bytes held':>11} {'vs full':>8}")
    full_bytes = caches[0].memory_bytes()
    rows = []
    for name, t, cache in zip(names, best[1:], caches):
        rows.append({"method": name, "step_ms": 1e3 * t, "vs_full": t / full, "vs_dynamic": t / dyn,
                     "bytes": cache.memory_bytes()})
        print(f"{name:14} {1e3 * t:8.3f} {t / full:7.2f}x {t / dyn:10.2f}x {cache.memory_bytes():11d} "
              f"{cache.memory_bytes() / full_bytes:7.2f}x")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="decode speed: nanokv GPT vs transformers GPT-2", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="gpt2,tiny", help=f"comma list from {list(SIZES)}")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="tokens generated")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = default)")
    p.add_argument("--methods", action="store_true", help="every method's decode step at GPT-2 124M's shape and on the tiny model instead")
    p.add_argument("--budget", type=float, default=0.25, help="with --methods or --hf: budget as a fraction of the prompt")
    p.add_argument("--hf", action="store_true", help="nanokv.hf's full cache against transformers' DynamicCache on a tiny random Llama, every method beside")
    args = p.parse_args(argv)
    sizes = args.sizes.split(",")
    for s in sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r}; valid sizes: {list(SIZES)}")
    if args.new < 2:
        p.error("--new must be >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = measure_bandwidth()
    print(f"threads: {torch.get_num_threads()}   measured read bandwidth: {bw / 1e9:.1f} GB/s")
    if args.hf:
        return bench_hf(args.prompt, 32, args.repeats, args.budget)
    if args.methods:
        return bench_methods(args.budget, min(args.prompt, 448), min(args.new, 64), args.repeats, bw)
    print(f"prompt {args.prompt} tokens, {args.new} new tokens, greedy, fp32, best of {args.repeats}\n")
    print(f"{'size':6} {'params':>8} {'ours s':>8} {'HF s':>8} {'speedup':>8} {'ours tok/s':>11} "
          f"{'HF tok/s':>9} {'step ms':>8} {'roofline ms':>12} {'% of roofline':>14} {'plain s':>8} "
          f"{'cache cost':>11} same")
    for s in sizes:
        r = bench_size(s, SIZES[s], args.prompt, args.new, args.repeats, bw)
        print(f"{r['size']:6} {r['params_M']:7.1f}M {r['ours_s']:8.2f} {r['hf_s']:8.2f} {r['speedup']:7.2f}x "
              f"{r['ours_tok_s']:11.1f} {r['hf_tok_s']:9.1f} {r['decode_ms']:8.2f} {r['roofline_ms']:12.2f} "
              f"{100 * r['roofline_ms'] / r['decode_ms']:13.0f}% {r['plain_s']:8.2f} "
              f"{r['ours_s'] / r['plain_s']:10.2f}x {r['same_tokens']}")
    print("plain: the same decode as one plain loop with fused attention and no cache object "
          "(plain_generate; the eager floor); cache cost = ours / plain; same: identical tokens from all three")
    print("\nKV-cache bytes per token (keys + values, all layers; + int32 positions per head in nanokv):")
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        c = GPTConfig.preset(name)
        kv16 = 2 * c.n_layer * c.n_embd * 2
        print(f"  {name:12} fp16 {kv16 / 1024:7.1f} KiB   fp32 {2 * kv16 / 1024:7.1f} KiB   "
              f"positions {4 * c.n_layer * c.n_head} B   at 1024 tokens fp16: {kv16 * 1024 / 2**20:6.1f} MiB")


if __name__ == "__main__":
    main()
