"""
The GPU check: correctness of every kernel on the GPU against the torch reference, every
method end to end with backend="triton" against backend="torch", then the kernel benchmarks.
One prepared script for a few minutes of a lent GPU; it writes gpu.json and gpu.md.

    python bench_gpu.py --out results/gpu        # needs a CUDA GPU (not the interpreter)

Benchmarks (fp16, one query per head, bandwidth-bound sizes; CUDA-event timings by
triton.testing.do_bench, median):
  kernel 1   split-K decode attention, with and without the per-token probabilities;
             GB/s = bytes of K and V read (+ 4-byte scores written and read when returned) / time
  sdpa       torch scaled_dot_product_attention on the same full cache (no probabilities)
  eager      q k^T, softmax in fp32, p v, returning p: what libraries do for H2O-style scores
  kernel 2   decode over a 4-bit / 2-bit cache (per-token groups of 32, fp16 scale and zero):
             speed-up over kernel 1 against the reduction of bytes read
  kernel 4   quantize-and-pack throughput
  kernel 5   nearest class center (EMS, D2O) against the reference's (H, L, L) similarity matrices
  nanokv.hf  every method through transformers on both backends; a cache split over devices; decode
             speed of full against DynamicCache on a 1B-sized random Llama at 8k and 32k (check_hf)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from fast.decode import decode_attention, decode_attention_varlen  # noqa: E402
from fast.decode_quant import decode_attention_quant  # noqa: E402
from fast.merge import nearest_center as nearest_center_kernel  # noqa: E402
from fast.quant import quantize_pack  # noqa: E402
from nanokv.cache import reference_attention  # noqa: E402
from nanokv.method import nearest_center  # noqa: E402
from nanokv.quant import dequantize_packed, quantize_packed  # noqa: E402

PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def peak_bandwidth(name: str) -> float | None:
    return next((v for k, v in PEAK_GBS.items() if k in name), None)


def check_kernels(dev) -> list[dict]:
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for B, H, L, D in [(1, 1, 1, 16), (2, 3, 37, 64), (2, 4, 1000, 128), (1, 8, 4097, 128)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            q, k, v = (torch.randn(B, H, n, D, device=dev, generator=g).to(dtype) for n in (1, L, L))
            valid = torch.rand(B, H, L, device=dev, generator=g) < 0.6
            valid[..., -1] = True
            for val in (None, valid):
                out, probs = decode_attention(q, k, v, val)
                ro, rp = reference_attention(q.float(), k.float(), v.float(), torch.tensor([L], device=dev),
                                             torch.arange(L, device=dev).expand(B, H, L), val)
                rows.append({"kernel": "decode", "shape": [B, H, L, D], "dtype": str(dtype), "masked": val is not None,
                             "max_out_diff": (out.float() - ro).abs().max().item(),
                             "max_probs_diff": (probs - rp).abs().max().item()})
    for B, H, G, D in [(1, 8, 1, 128), (2, 4, 4, 128)]:  # ragged heads held flat (Ada-KV), grouped-query
        for dtype in (torch.float16, torch.bfloat16):
            n = torch.randint(1, 3000, (B * H,), device=dev, generator=g)
            caps = n + 15
            starts = torch.cumsum(caps, 0) - caps
            k, v = (torch.randn(int(caps.sum()), D, device=dev, generator=g).to(dtype) for _ in range(2))
            q = torch.randn(B, H * G, 1, D, device=dev, generator=g).to(dtype)
            out, probs = decode_attention_varlen(q, k, v, starts, n)
            Lmax = int(n.max())
            kp, vp = (torch.zeros(B * H, Lmax, D, device=dev) for _ in range(2))
            for i in range(B * H):
                kp[i, :n[i]], vp[i, :n[i]] = k[starts[i]:starts[i] + n[i]].float(), v[starts[i]:starts[i] + n[i]].float()
            valid = (torch.arange(Lmax, device=dev) < n[:, None]).view(B, H, Lmax).repeat_interleave(G, 1)
            kp, vp = (t.view(B, H, Lmax, D).repeat_interleave(G, 1) for t in (kp, vp))
            ro, rp = reference_attention(q.float(), kp, vp, torch.tensor([Lmax], device=dev),
                                         torch.arange(Lmax, device=dev).expand(B, H * G, Lmax), valid)
            rows.append({"kernel": "decode_varlen", "shape": [B, H, G, Lmax, D], "dtype": str(dtype),
                         "max_out_diff": (out.float() - ro).abs().max().item(),
                         "max_probs_diff": (probs - rp).abs().max().item()})
    for bits in (2, 3, 4, 8):
        x = torch.randn(64, 8, 128, device=dev, generator=g).half()
        got, ref = quantize_pack(x, bits, 32), quantize_packed(x, bits, 32)
        rows.append({"kernel": "quantize_pack", "bits": bits,
                     "differing": sum(int((a != b).sum()) for a, b in zip(got, ref))})
        B, H, LQ, LF, D = 2, 4, 777, 33, 128
        q = torch.randn(B, H, 1, D, device=dev, generator=g).half()
        kq, vq = (quantize_packed(torch.randn(B, H, LQ, D, device=dev, generator=g).half(), bits, 32) for _ in "kv")
        k, v = (torch.randn(B, H, LF, D, device=dev, generator=g).half() for _ in "kv")
        out, probs = decode_attention_quant(q, kq, vq, k, v, bits, 32)
        K = torch.cat([dequantize_packed(*kq, bits, D), k.float()], 2)
        V = torch.cat([dequantize_packed(*vq, bits, D), v.float()], 2)
        ro, rp = reference_attention(q.float(), K, V, torch.tensor([LQ + LF], device=dev),
                                     torch.arange(LQ + LF, device=dev).expand(B, H, LQ + LF))
        rows.append({"kernel": "decode_quant", "bits": bits, "max_out_diff": (out.float() - ro).abs().max().item(),
                     "max_probs_diff": (probs - rp).abs().max().item()})
        # KIVI's layout: keys per channel in chunks of 32 tokens, then a key residual of 9 tokens
        C, LQV = 24, 700
        keys, vals = (torch.randn(B, H, C * 32 + 9, D, device=dev, generator=g).half() for _ in "kv")
        codes, sc, ze = quantize_packed(keys[:, :, :C * 32].float().reshape(B, H, C, 32, D).transpose(-1, -2), bits, 32)
        vq = quantize_packed(vals[:, :, :LQV], bits, 32)
        out, probs = decode_attention_quant(q, (codes, sc[..., 0], ze[..., 0]), vq, keys[:, :, C * 32:],
                                            vals[:, :, LQV:], bits, 32, key_layout="channel")
        k_old = dequantize_packed(codes, sc, ze, bits, 32).transpose(-1, -2).reshape(B, H, C * 32, D)
        K = torch.cat([k_old, keys[:, :, C * 32:].float()], 2)
        V = torch.cat([dequantize_packed(*vq, bits, D), vals[:, :, LQV:].float()], 2)
        L = K.size(2)
        ro, rp = reference_attention(q.float(), K, V, torch.tensor([L], device=dev), torch.arange(L, device=dev).expand(B, H, L))
        rows.append({"kernel": "decode_quant_kivi", "bits": bits, "max_out_diff": (out.float() - ro).abs().max().item(),
                     "max_probs_diff": (probs - rp).abs().max().item()})
    for mode in ("keys", "kv"):  # kernel 5: D2O's and EMS's matching step
        B, H, L, D = 2, 8, 1500, 128
        k, v = (torch.randn(B, H, L, D, device=dev, generator=g).half() for _ in "kv")
        centers, rows_ = (torch.rand(B, H, L, device=dev, generator=g) < f for f in (0.25, 0.6))
        vv = None if mode == "keys" else v
        best, c = nearest_center_kernel(k, vv, centers, rows_)
        ref_best, ref_c = nearest_center(k, vv, centers, rows_)
        rows.append({"kernel": "nearest_center", "mode": mode, "max_best_diff": (best - ref_best)[rows_].abs().max().item(),
                     "centers_differing": int((c != ref_c)[rows_].sum()), "rows": int(rows_.sum())})
    return rows


def check_methods(dev) -> list[dict]:
    from gpt import GPT
    from nanokv import METHODS, KVCache

    model = GPT.from_pretrained("nanokv-tiny").to(dev).eval()
    prompt = torch.tensor([model.tokenizer.encode("The pass key is 48213. Remember it. " * 6)[:200]], device=dev)
    rows = []
    for name, cls in METHODS.items():
        res = {}
        for backend in ("torch", "triton"):
            cache = KVCache(model.config, cls.scaled(64) if cls.takes_budget else cls(), backend=backend)
            with torch.no_grad():
                logits, _ = model(prompt, cache=cache, last_logits_only=True)
                toks, lg = [], []
                for _ in range(32):
                    nxt = logits[:, -1].argmax(-1, keepdim=True)
                    toks.append(int(nxt))
                    lg.append(logits[:, -1])
                    logits, _ = model(nxt, cache=cache, last_logits_only=True)
            kept = [cache.kept_positions(i, 0, h).tolist() for i in range(4) for h in range(4)]
            res[backend] = (toks, torch.cat(lg), kept)
        rows.append({"method": name, "same_tokens": res["torch"][0] == res["triton"][0],
                     "same_kept": res["torch"][2] == res["triton"][2],
                     "max_logits_diff": (res["torch"][1] - res["triton"][1]).abs().max().item()})
    return rows


def check_hf(dev, quick: bool, backends=("torch", "triton"), big=None, contexts=None) -> dict:
    """nanokv.hf on this device: a tiny random Llama in fp16 through both backends, every method
    (same greedy tokens and kept sets?); a cache whose layers live on different devices (layer 0
    here, layer 1 on the CPU); decode speed and bytes of `full` against transformers' DynamicCache
    and of some compressed methods, on a 1B-sized random Llama (TinyLlama-1.1B's shape) at 8k-32k."""
    import transformers

    import nanokv.hf
    from nanokv import METHODS
    from nanokv.cache import CacheShape, KVCache

    out = {}
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(cfg).to(dev, dtype).eval()
    prompt = torch.randint(0, 1000, (1, 512), device=dev)
    rows = []
    for name, cls in METHODS.items():
        res = {}
        for backend in backends:
            cache = nanokv.hf.attach(model, cls.scaled(128) if cls.takes_budget else cls(), backend=backend)
            toks = model.generate(prompt, past_key_values=cache, max_new_tokens=32, do_sample=False)
            res[backend] = (toks[0].tolist(), [cache.kept_positions(i, 0, h).tolist() for i in range(4) for h in range(2)])
        first, last = res[backends[0]], res[backends[-1]]
        rows.append({"method": name, "same_tokens": first[0] == last[0], "same_kept": first[1] == last[1]})
    out["methods"] = rows
    split = KVCache(CacheShape(n_layer=2, n_head=8, head_dim=64, n_kv_head=2), "h2o", budget=64)
    for T in (100, 1, 1):
        for i, d in ((0, dev), (1, torch.device("cpu"))):
            q, k, v = torch.randn(1, 8, T, 64, device=d), torch.randn(1, 2, T, 64, device=d), torch.randn(1, 2, T, 64, device=d)
            split.attend(i, q, k, v)
    out["split"] = {"layer0": str(split.layers[0].fields["k"].device), "layer1": str(split.layers[1].fields["k"].device),
                    "lengths": [split.lengths(i).tolist() for i in range(2)]}
    big = big or dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=32768, **big)).to(dev, dtype).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    speed = []
    for ctx in contexts or ((8192,) if quick else (8192, 32768)):
        prompt = torch.randint(0, big["vocab_size"], (1, ctx), device=dev)
        budget = ctx // 8
        contenders = [("DynamicCache", lambda: transformers.DynamicCache(config=model.config)),
                      ("full torch", lambda: nanokv.hf.attach(model, "full")),
                      ("full triton", lambda: nanokv.hf.attach(model, "full", backend=backends[-1]))]
        for name in ("streamingllm", "snapkv", "h2o", "kivi", "mikv"):
            cls = METHODS[name]
            contenders.append((f"{name} {backends[-1]}", lambda cls=cls: nanokv.hf.attach(
                model, cls.scaled(budget) if cls.takes_budget else cls(), backend=backends[-1])))
        for label, make in contenders:
            try:
                cache = make()
                with torch.no_grad():
                    tok = model(prompt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(32):
                        tok = model(tok, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                    sync()
                    ms = 1e3 * (time.perf_counter() - t0) / 32
                held = (sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
                        if isinstance(cache, transformers.DynamicCache) else cache.memory_bytes())
                speed.append({"context": ctx, "cache": label, "ms_per_step": ms, "bytes": held})
            except Exception as e:  # keep the other rows (an out-of-memory prefill, ...)
                speed.append({"context": ctx, "cache": label, "error": repr(e)[:300]})
            print(json.dumps(speed[-1]), flush=True)
            del cache
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    out["speed"] = speed
    return out


def bench(dev, quick: bool) -> list[dict]:
    rows = []
    H, D = 32, 128
    shapes = [(1, 8192), (8, 8192), (4, 32768), (16, 16384), (1, 131072)] if not quick else [(1, 1024)]
    for B, L in shapes:
        q = torch.randn(B, H, 1, D, device=dev, dtype=torch.float16)
        k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.float16) for _ in "kv")
        kv_bytes = 2 * B * H * L * D * 2
        score_bytes = B * H * L * 4 * 3  # written by the partial pass, read and rewritten by the reduce
        t_np = do_bench(lambda: decode_attention(q, k, v, want_probs=False), return_mode="median")
        sweep = {}
        for block_n in (32, 64, 128):
            for chunk in (256, 1024, 4096):
                if chunk <= L:
                    sweep[(chunk, block_n)] = do_bench(
                        lambda: decode_attention(q, k, v, want_probs=False, chunk=chunk, block_n=block_n),
                        return_mode="median")
        best = min(sweep, key=sweep.get)
        t_p = do_bench(lambda: decode_attention(q, k, v, want_probs=True), return_mode="median")
        t_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), return_mode="median")

        def eager():
            p = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(D), -1)
            return p.half() @ v, p

        t_eager = do_bench(eager, return_mode="median")
        row = {"B": B, "H": H, "L": L, "D": D, "kv_MB": kv_bytes / 1e6,
               "k1_ms": t_np, "k1_GBs": kv_bytes / t_np / 1e6,
               "k1_best_chunk_block": list(best), "k1_best_GBs": kv_bytes / sweep[best] / 1e6,
               "k1_probs_ms": t_p, "k1_probs_GBs": (kv_bytes + score_bytes) / t_p / 1e6,
               "sdpa_ms": t_sdpa, "sdpa_GBs": kv_bytes / t_sdpa / 1e6,
               "eager_probs_ms": t_eager, "fused_vs_eager": t_eager / t_p}
        for bits in (4, 2):
            kq, vq = (quantize_packed(t, bits, 32) for t in (k, v))
            empty = torch.empty(B, H, 0, D, device=dev, dtype=torch.float16)
            t_q = do_bench(lambda: decode_attention_quant(q, kq, vq, empty, empty, bits, 32, want_probs=False),
                           return_mode="median")
            q_bytes = 2 * sum(t.numel() * t.element_size() for t in kq)
            row[f"k2_int{bits}_ms"] = t_q
            row[f"k2_int{bits}_byte_reduction"] = kv_bytes / q_bytes
            row[f"k2_int{bits}_speedup"] = t_np / t_q
            row[f"k2_int{bits}_GBs"] = q_bytes / t_q / 1e6
        rows.append(row)
        k = v = kq = vq = None  # free the GPU memory before the next size
        torch.cuda.empty_cache()
    for L in ((2048,) if quick else (2048, 8192)):  # kernel 5 against the reference's L x L matrices
        k, v = (torch.randn(1, H, L, D, device=dev, dtype=torch.float16) for _ in "kv")
        centers, asked = torch.rand(1, H, L, device=dev) < 0.25, torch.rand(1, H, L, device=dev) < 0.6
        t5 = do_bench(lambda: nearest_center_kernel(k, v, centers, asked), return_mode="median")
        t_ref = do_bench(lambda: nearest_center(k, v, centers, asked), return_mode="median")
        rows.append({"kernel5_H": H, "kernel5_L": L, "kernel5_ms": t5, "reference_ms": t_ref,
                     "speedup": t_ref / t5, "reference_GB_of_matrices": 3 * H * L * L * 4 / 1e9})
        k = v = None
        torch.cuda.empty_cache()
    for B, L in ((1, 2048),) if quick else ((1, 32768), (8, 8192)):  # Ada-KV's ragged heads: in place vs padded
        g = torch.Generator(device=dev).manual_seed(0)
        n = torch.randint(L // 4, 2 * L, (B * H,), device=dev, generator=g)  # per-head budgets averaging about L
        k, v = (torch.randn(int(n.sum()), D, device=dev, dtype=torch.float16) for _ in "kv")
        starts, q = torch.cumsum(n, 0) - n, torch.randn(B, H, 1, D, device=dev, dtype=torch.float16)
        Lmax = int(n.max())

        def padded():  # what the Triton backend did before: a padded (B, H, Lmax, D) copy and a mask
            kp, vp = (torch.zeros(B * H, Lmax, D, device=dev, dtype=torch.float16) for _ in "kv")
            mask = torch.arange(Lmax, device=dev) < n[:, None]
            kp[mask], vp[mask] = k, v
            return decode_attention(q, kp.view(B, H, Lmax, D), vp.view(B, H, Lmax, D), mask.view(B, H, Lmax))

        t_var = do_bench(lambda: decode_attention_varlen(q, k, v, starts, n, max_len=Lmax), return_mode="median")
        t_pad = do_bench(padded, return_mode="median")
        rows.append({"ragged_B": B, "ragged_H": H, "ragged_mean_L": int(n.float().mean()), "ragged_Lmax": Lmax,
                     "varlen_ms": t_var, "padded_ms": t_pad, "varlen_speedup": t_pad / t_var,
                     "varlen_GBs": 2 * k.numel() * 2 / t_var / 1e6})
        k = v = None
        torch.cuda.empty_cache()
    x = torch.randn(8 * 32 * 16384, D, device=dev, dtype=torch.float16)
    t = do_bench(lambda: quantize_pack(x, 4, 32), return_mode="median")
    rows.append({"kernel4_rows": x.size(0), "kernel4_ms": t, "kernel4_GBs": x.numel() * 2 / t / 1e6})
    return rows


def markdown(info, checks, methods, perf) -> str:
    peak = info["peak_GBs"]
    out = [f"GPU: {info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}; "
           f"peak HBM bandwidth taken as {peak} GB/s.", "",
           "| B x H x L x D | K+V MB | kernel 1 GB/s (% peak) | best (chunk, block) GB/s | + probs GB/s | SDPA GB/s "
           "| eager+probs / fused+probs | INT4: bytes / speed-up | INT2: bytes / speed-up |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in perf:
        if "B" not in r:
            continue
        pct = f" ({100 * r['k1_GBs'] / peak:.0f}%)" if peak else ""
        out.append(f"| {r['B']}x{r['H']}x{r['L']}x{r['D']} | {r['kv_MB']:.0f} | {r['k1_GBs']:.0f}{pct} | "
                   f"{tuple(r['k1_best_chunk_block'])} {r['k1_best_GBs']:.0f} | "
                   f"{r['k1_probs_GBs']:.0f} | {r['sdpa_GBs']:.0f} | {r['fused_vs_eager']:.2f}x | "
                   f"{r['k2_int4_byte_reduction']:.2f}x / {r['k2_int4_speedup']:.2f}x | "
                   f"{r['k2_int2_byte_reduction']:.2f}x / {r['k2_int2_speedup']:.2f}x |")
    k4 = next((r for r in perf if "kernel4_ms" in r), None)
    if k4:
        out += ["", f"kernel 4 (quantize + pack, 4-bit, groups of 32): {k4['kernel4_GBs']:.0f} GB/s of fp16 input."]
    for r in perf:
        if "kernel5_ms" in r:
            out.append(f"kernel 5 (nearest center, H={r['kernel5_H']}, L={r['kernel5_L']}): {r['kernel5_ms']:.2f} ms "
                       f"against {r['reference_ms']:.2f} ms for the reference ({r['speedup']:.1f}x), which builds "
                       f"{r['reference_GB_of_matrices']:.1f} GB of similarity matrices.")
        if "varlen_ms" in r:
            out.append(f"kernel 1 over ragged heads in place (Ada-KV, B={r['ragged_B']}, H={r['ragged_H']}, mean "
                       f"{r['ragged_mean_L']} and longest {r['ragged_Lmax']} tokens): {r['varlen_ms']:.3f} ms "
                       f"({r['varlen_GBs']:.0f} GB/s) against {r['padded_ms']:.3f} ms padding first "
                       f"({r['varlen_speedup']:.1f}x).")
    worst = max((r.get("max_out_diff", 0) for r in checks), default=0)
    out += ["", f"Kernel checks on the GPU: {len(checks)} cases, worst max|out diff| {worst:.2e}; quantize_pack "
            f"differing bytes: {sum(r.get('differing', 0) for r in checks)}.",
            f"Methods end to end (tiny model, prompt 200, 32 decode steps, budget 64): "
            f"{sum(r['same_tokens'] and r['same_kept'] for r in methods)}/{len(methods)} with the same tokens and "
            f"kept sets; worst max|logits diff| {max(r['max_logits_diff'] for r in methods):.2e}."]
    return "\n".join(out)


def hf_markdown(hf: dict) -> str:
    ok = sum(r["same_tokens"] and r["same_kept"] for r in hf["methods"])
    out = [f"nanokv.hf, random Llama in fp16, prompt 512, 32 new tokens: {ok}/{len(hf['methods'])} methods with the "
           f"same tokens and kept sets on both backends. Split cache: layer 0 on {hf['split']['layer0']}, layer 1 on "
           f"{hf['split']['layer1']}.", "", "| context | cache | ms / decode step | vs DynamicCache | bytes held |",
           "|---|---|---|---|---|"]
    base = {r["context"]: r["ms_per_step"] for r in hf["speed"] if r["cache"] == "DynamicCache" and "ms_per_step" in r}
    for r in hf["speed"]:
        if "error" in r:
            out.append(f"| {r['context']} | {r['cache']} | {r['error'][:60]} | | |")
        else:
            ratio = r["ms_per_step"] / base[r["context"]] if r["context"] in base else float("nan")
            out.append(f"| {r['context']} | {r['cache']} | {r['ms_per_step']:.2f} | {ratio:.2f}x | {r['bytes'] / 2**20:.1f} MiB |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="results/gpu", help="folder for the figures")
    p.add_argument("--quick", action="store_true", help="small sizes")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fast/gpu_bench.py needs a CUDA GPU")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    info = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "peak_GBs": peak_bandwidth(name)}
    os.makedirs(args.out, exist_ok=True)
    result = {"info": info}
    for key, fn in (("checks", lambda: check_kernels(dev)), ("methods", lambda: check_methods(dev)),
                    ("perf", lambda: bench(dev, args.quick)), ("hf", lambda: check_hf(dev, args.quick))):
        t0 = time.time()
        try:
            result[key] = fn()
        except Exception as e:  # keep what the other parts measured
            result[key] = [{"error": repr(e)}]
        print(f"{key}: {time.time() - t0:.1f} s", json.dumps(result[key])[:3000], flush=True)
        with open(os.path.join(args.out, "gpu.json"), "w") as f:
            json.dump(result, f, indent=1)
    try:
        md = markdown(info, result["checks"], result["methods"], result["perf"])
    except Exception as e:
        md = f"(no table: {e!r})"
    try:
        md += "\n\n" + hf_markdown(result["hf"])
    except Exception as e:
        md += f"\n\n(no nanokv.hf table: {e!r})"
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
