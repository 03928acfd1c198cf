"""fast/ against the reference: every kernel on random inputs under the Triton interpreter
(max differences printed, tolerances stated), every method end to end with backend="triton",
and every kernel compiled ahead of time for sm_80 and sm_90 (in a subprocess, without the
interpreter, which would turn the kernels into interpreted ones)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_method, peaked_model
from nanokv import METHODS, KVCache
from nanokv.cache import reference_attention

triton = pytest.importorskip("triton")
from fast.decode import decode_attention  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # out: fp16 rounding of the output itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, H, L, D", [(1, 1, 1, 16), (2, 3, 37, 64), (1, 4, 300, 32), (2, 2, 513, 48),
                                        (1, 2, 1000, 128)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_reference(B, H, L, D, dtype, masked):
    g = torch.Generator().manual_seed(L * D)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (1, L, L))
    valid = None
    if masked:  # ragged heads: a random subset, the newest entry always valid
        valid = torch.rand(B, H, L, generator=g) < 0.6
        valid[..., -1] = True
    out, probs = decode_attention(q, k, v, valid)
    ref_out, ref_probs = reference_attention(q.float(), k.float(), v.float(), torch.tensor([L]),
                                             torch.arange(L).expand(B, H, L), valid)
    d_out, d_p = (out.float() - ref_out).abs().max().item(), (probs - ref_probs).abs().max().item()
    print(f"decode B={B} H={H} L={L} D={D} {dtype} masked={masked}: max|out diff| {d_out:.2e}, "
          f"max|probs diff| {d_p:.2e}")
    assert out.dtype == dtype and probs.dtype == torch.float32
    assert d_out <= TOL[dtype] and d_p <= 1e-6
    if masked:
        assert (probs[~valid[:, :, None, :]] == 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(B, H, 1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, H, G, D", [(1, 3, 1, 16), (2, 2, 2, 64), (1, 4, 1, 32)])
def test_decode_attention_varlen_reads_ragged_heads_where_they_are(B, H, G, D, dtype):
    """Kernel 1 over heads of different lengths held flat with spare rows (Ada-KV's layout):
    the same as the reference over the padded heads, probabilities 0 past each head's end,
    G query heads per key-value head read without a copy."""
    from fast.decode import decode_attention_varlen

    g = torch.Generator().manual_seed(D * H + G)
    n = torch.randint(1, 90, (B * H,), generator=g)  # entries of each key-value head
    caps = n + torch.randint(0, 5, (B * H,), generator=g)  # its run of rows (spare rows after them)
    starts = torch.cumsum(caps, 0) - caps
    k, v = (torch.randn(int(caps.sum()), D, generator=g).to(dtype) for _ in range(2))  # spare rows hold junk
    q = torch.randn(B, H * G, 1, D, generator=g).to(dtype)
    Lmax = int(n.max())
    kp, vp = (torch.zeros(B * H, Lmax, D, dtype=dtype) for _ in range(2))
    for i in range(B * H):
        kp[i, :n[i]], vp[i, :n[i]] = k[starts[i]:starts[i] + n[i]], v[starts[i]:starts[i] + n[i]]
    valid = (torch.arange(Lmax) < n[:, None]).view(B, H, Lmax)
    kp, vp = (t.view(B, H, Lmax, D).repeat_interleave(G, 1).float() for t in (kp, vp))
    ref_out, ref_probs = reference_attention(q.float(), kp, vp, torch.tensor([Lmax]),
                                             torch.arange(Lmax).expand(B, H * G, Lmax), valid.repeat_interleave(G, 1))
    out, probs = decode_attention_varlen(q, k, v, starts, n, chunk=32, block_n=16)
    d_out, d_p = (out.float() - ref_out).abs().max().item(), (probs - ref_probs).abs().max().item()
    print(f"varlen decode B={B} H={H} G={G} D={D} {dtype}: max|out diff| {d_out:.2e}, max|probs diff| {d_p:.2e}")
    assert out.shape == (B, H * G, 1, D) and probs.shape == (B, H * G, 1, Lmax)
    assert d_out <= TOL[dtype] and d_p <= 1e-6
    assert (probs[~valid.repeat_interleave(G, 1)[:, :, None, :]] == 0).all()
    out2, none = decode_attention_varlen(q, k, v, starts, n, max_len=Lmax, want_probs=False)
    assert none is None and (out2.float() - out.float()).abs().max() <= TOL[dtype]
    with pytest.raises(ValueError, match="one query per head"):
        decode_attention_varlen(q.expand(B, H * G, 2, D), k, v, starts, n)
    with pytest.raises(ValueError, match="starts and lengths"):
        decode_attention_varlen(q, k, v, starts[:-1], n)
    if B > 1:  # one batch row's heads for two batch rows of queries
        with pytest.raises(ValueError, match="starts and lengths"):
            decode_attention_varlen(q, k, v, starts[:1], n[:1])


def test_decode_attention_split_sizes_agree():
    """The same answer whatever the chunking (one program per head, or many small chunks)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for n in (1, 200, 200))
    outs = [decode_attention(q, k, v, chunk=c, block_n=16) for c in (16, 48, 256)]
    for o, p in outs[1:]:
        assert (o - outs[0][0]).abs().max() < 1e-6 and (p - outs[0][1]).abs().max() < 1e-7


def run(model, method, backend, prompt, steps, after_prefill=None):
    """Prefill then `steps` greedy decode steps; returns tokens, last logits, kept positions."""
    cache = KVCache(model.config, method, backend=backend)
    tokens, logits_all = [], []
    with torch.no_grad():
        logits, _ = model(prompt, cache=cache, last_logits_only=True)
        if after_prefill:
            after_prefill()
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            logits_all.append(logits[:, -1])
            logits, _ = model(nxt, cache=cache, last_logits_only=True)
    kept = [[cache.kept_positions(i, 0, h).tolist() for h in range(model.config.n_head)]
            for i in range(model.config.n_layer)]
    return tokens, torch.cat(logits_all), kept


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_end_to_end_triton_equals_torch(name, small_chunks):
    """Prefill 48 tokens and decode 32 with both backends: same tokens, same kept sets,
    logits within 1e-4 (the kernel accumulates in another order than the reference). Decode
    kernels run in 16-token chunks, so even the 24-token budget spans two programs per head."""
    model = peaked_model(n_layer=2, n_head=2, n_embd=32, block_size=128)
    prompt = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    budget = 24
    ref = run(model, make_method(name, budget), "torch", prompt, 32)
    fast = run(model, make_method(name, budget), "triton", prompt, 32)
    diff = (ref[1] - fast[1]).abs().max().item()
    print(f"{name}: max|logits diff| {diff:.2e} over 32 decode steps")
    assert fast[0] == ref[0]
    assert fast[2] == ref[2]
    assert diff <= 1e-4


def test_triton_backend_refuses_cpu_without_interpreter():
    code = ("import torch; from gpt import GPT, GPTConfig; from nanokv import KVCache\n"
            "m = GPT(GPTConfig.preset('nano'))\n"
            "try:\n    KVCache(m.config, 'h2o', backend='triton', budget=8)\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "ERR backend='triton' needs a CUDA GPU, or TRITON_INTERPRET=1" in out.stdout, out.stderr


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_ahead_of_time(arch):
    """Every kernel through Triton's real compiler (to PTX) for a GPU target, no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "fast", "aot.py"), str(arch)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled" in out.stdout


@pytest.mark.parametrize("mode", ["keys", "kv_nonneg", "kv"])
@pytest.mark.parametrize("B, H, L, D, dtype", [(1, 1, 1, 16, torch.float32), (2, 3, 37, 64, torch.float32),
                                               (1, 2, 300, 48, torch.float16), (1, 4, 129, 32, torch.float32)])
def test_nearest_center_kernel_matches_reference(B, H, L, D, dtype, mode):
    """Kernel 5 (the merging methods' matching step) against nanokv.method.nearest_center."""
    from fast.merge import nearest_center as kernel
    from nanokv.method import nearest_center

    g = torch.Generator().manual_seed(L * D + len(mode))
    k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(2))
    centers = torch.rand(B, H, L, generator=g) < 0.3
    rows = torch.rand(B, H, L, generator=g) < 0.7
    if L > 2:
        centers[0, 0, :2] = True
        k[0, 0, 1], v[0, 0, 1] = k[0, 0, 0], v[0, 0, 0]  # two equal centers: the lower slot wins
        centers[-1, -1] = False  # a head without centers
    vv = None if mode == "keys" else v
    ref_best, ref_c = nearest_center(k, vv, centers, rows, nonneg=mode == "kv_nonneg")
    best, c = kernel(k, vv, centers, rows, nonneg=mode == "kv_nonneg")
    # the reference similarity of the kernel's choice must be the best one, within float rounding
    kn = torch.nn.functional.normalize(k.float(), dim=-1)
    sim = kn @ kn.transpose(-1, -2)
    if vv is not None:
        vn = torch.nn.functional.normalize(v.float(), dim=-1)
        sim = sim.clamp(min=0) * (vn @ vn.transpose(-1, -2)).clamp(min=0) if mode == "kv_nonneg" \
            else sim * (vn @ vn.transpose(-1, -2))
    sim = sim.masked_fill(~centers[:, :, None, :], float("-inf"))
    has = rows & centers.any(-1, keepdim=True)
    got_sim = sim.gather(-1, c[..., None])[..., 0]
    diff = (best - ref_best)[has].abs().max().item() if has.any() else 0.0
    top2 = sim.topk(min(2, L), dim=-1).values
    clear = has & ((top2[..., 0] - top2[..., -1]) > 1e-5) if L > 1 else has
    print(f"nearest_center {mode} B={B} H={H} L={L} D={D} {dtype}: max |best diff| {diff:.2e}, "
          f"{int((c != ref_c)[clear].sum())} different centers among {int(clear.sum())} clear rows")
    assert diff <= 1e-6
    assert torch.all(centers.gather(-1, c)[has]) and (got_sim - ref_best)[has].abs().max() <= 1e-6 if has.any() else True
    assert torch.equal(c[clear], ref_c[clear])
    assert torch.all(best[~has] == float("-inf")) and torch.all(c[~rows] == 0)  # not asked, or no center
    if L > 2:
        assert not rows[0, 0, 1] or c[0, 0, 1] == 0  # the tie went to slot 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_pack_kernel_is_bit_exact(bits, dtype):
    from fast.quant import quantize_pack
    from nanokv.quant import quantize_packed

    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 5, 128, generator=g) * 3).to(dtype)
    x[0, 0, :32] = 0.7  # a constant group: scale 0, codes 0, no NaN
    x[1, 1, :32] = torch.tensor([1e4] + [-1e4] * 31, dtype=dtype)  # an extreme group
    for group in (8, 32, 128):
        got, ref = quantize_pack(x, bits, group), quantize_packed(x, bits, group)
        n_diff = sum(int((a != b).sum()) for a, b in zip(got, ref))
        print(f"quantize_pack bits={bits} group={group} {dtype}: {n_diff} differing bytes/scales/zeros")
        assert n_diff == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("LQ, LF, D, group, dtype", [(37, 5, 32, 32, torch.float32), (100, 0, 64, 32, torch.float16),
                                                     (1, 1, 16, 16, torch.float32), (0, 20, 32, 8, torch.float32),
                                                     (130, 17, 128, 64, torch.float16)])
def test_quantized_decode_attention_matches_reference(bits, LQ, LF, D, group, dtype):
    """Kernel 2 against the reference over [dequantized low-bit tokens, full-precision tokens]."""
    from fast.decode_quant import decode_attention_quant
    from nanokv.quant import dequantize_packed, quantize_packed

    B, H = 2, 2
    g = torch.Generator().manual_seed(LQ + D + bits)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    kq, vq = (quantize_packed(torch.randn(B, H, LQ, D, generator=g).to(dtype), bits, group) for _ in range(2))
    k, v = (torch.randn(B, H, LF, D, generator=g).to(dtype) for _ in range(2))
    out, probs = decode_attention_quant(q, kq, vq, k, v, bits, group)
    K = torch.cat([dequantize_packed(*kq, bits, D), k.float()], 2)
    V = torch.cat([dequantize_packed(*vq, bits, D), v.float()], 2)
    L = LQ + LF
    ref_out, ref_probs = reference_attention(q.float(), K, V, torch.tensor([L]), torch.arange(L).expand(B, H, L))
    d_out, d_p = (out.float() - ref_out).abs().max().item(), (probs - ref_probs).abs().max().item()
    print(f"decode_quant bits={bits} LQ={LQ} LF={LF} D={D} group={group} {dtype}: max|out diff| {d_out:.2e}, "
          f"max|probs diff| {d_p:.2e}")
    assert d_out <= TOL[dtype] and d_p <= 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("C, G, LFK, LQV, D, dtype", [(3, 8, 5, 20, 32, torch.float32), (1, 16, 0, 16, 16, torch.float32),
                                                      (0, 32, 7, 0, 64, torch.float16), (4, 32, 19, 100, 64, torch.float16),
                                                      (2, 4, 1, 3, 8, torch.float32)])
def test_kivi_decode_attention_matches_reference(bits, C, G, LFK, LQV, D, dtype):
    """Kernel 2 with KIVI's layout: keys per channel (C chunks of G tokens) then a key residual,
    values per token then a value residual, the two split points different."""
    from fast.decode_quant import decode_attention_quant
    from nanokv.quant import dequantize_packed, quantize_packed

    B, H, L = 2, 3, C * G + LFK
    g = torch.Generator().manual_seed(C + G + bits)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    keys, vals = (torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(2))
    chunks = keys[:, :, :C * G].float().reshape(B, H, C, G, D).transpose(-1, -2)  # (B, H, C, D, G)
    codes, scale, zero = quantize_packed(chunks, bits, G)
    kq = (codes, scale[..., 0], zero[..., 0])
    vq = quantize_packed(vals[:, :, :LQV], bits, G)  # value groups: G channels (G <= D)
    out, probs = decode_attention_quant(q, kq, vq, keys[:, :, C * G:], vals[:, :, LQV:], bits, G, key_layout="channel")
    k_old = dequantize_packed(codes, scale, zero, bits, G).transpose(-1, -2).reshape(B, H, C * G, D)
    K = torch.cat([k_old, keys[:, :, C * G:].float()], 2)
    V = torch.cat([dequantize_packed(*vq, bits, D), vals[:, :, LQV:].float()], 2)
    ref_out, ref_probs = reference_attention(q.float(), K, V, torch.tensor([L]), torch.arange(L).expand(B, H, L))
    d_out, d_p = (out.float() - ref_out).abs().max().item(), (probs - ref_probs).abs().max().item()
    print(f"decode_quant KIVI bits={bits} C={C} G={G} LFK={LFK} LQV={LQV} D={D} {dtype}: max|out diff| {d_out:.2e}, "
          f"max|probs diff| {d_p:.2e}")
    assert d_out <= TOL[dtype] and d_p <= 1e-6


@pytest.mark.parametrize("T, L0, D, dtype, window", [(5, 0, 16, torch.float32, 2), (37, 10, 32, torch.float32, 8),
                                                     (70, 0, 64, torch.float16, 32), (1, 20, 48, torch.float32, 1),
                                                     (33, 31, 128, torch.float16, 0)])
@pytest.mark.parametrize("masked", [False, True])
def test_prefill_attention_and_column_sums_match_reference(T, L0, D, dtype, window, masked):
    """Kernel 3: output, and per-key probability sums over all queries and the last `window`,
    against the reference's materialized probabilities (L0 earlier tokens already cached)."""
    from fast.prefill import prefill_attention

    B, H, L = 2, 2, L0 + T
    g = torch.Generator().manual_seed(T + L0 + D)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (T, L, L))
    q_pos, k_pos = torch.arange(L0, L), torch.arange(L).expand(B, H, L)
    valid = None
    if masked:
        valid = torch.rand(B, H, L, generator=g) < 0.7
        valid[..., L0:] = True  # this call's own tokens are always there
    out, colsum, colwin, rows = prefill_attention(q, k, v, q_pos, k_pos, valid, window)
    ref_out, ref_p = reference_attention(q.float(), k.float(), v.float(), q_pos, k_pos, valid)
    d_out = (out.float() - ref_out).abs().max().item()
    d_sum = (colsum - ref_p.sum(2)).abs().max().item()
    d_win = (colwin - ref_p[:, :, T - window:].sum(2)).abs().max().item() if window else colwin.abs().max().item()
    d_rows = (rows - ref_p[:, :, T - window:]).abs().max().item() if window else 0.0  # the last rows, kept
    assert rows.shape == (B, H, window, L)
    print(f"prefill T={T} L={L} D={D} {dtype} masked={masked}: max|out diff| {d_out:.2e}, max|colsum diff| "
          f"{d_sum:.2e}, max|window colsum diff| {d_win:.2e}")
    assert d_out <= {torch.float32: 1e-5, torch.float16: 2e-3}[dtype] and d_sum <= 1e-5 and d_win <= 1e-5
    assert d_rows <= 1e-6


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"scissorhands"}))
def test_triton_backend_routes_prefill_and_decode_to_the_kernels(monkeypatch, name):
    """Neither prefill (kernel 3, with column sums and the last rows the method reads) nor decode
    (kernel 1; kernel 2 for packed low-bit tokens: RTN, KIVI, MiKV, Quantized, whose decode steps
    then never use kernel 1; Ada-KV's ragged heads: kernel 1 on the flat store, never a padded
    copy) touches the reference attention. Scissorhands is the exception: a
    prompt is recorded query by query (every row), so Quantized's prompt, whose inner method is
    Scissorhands, uses the reference attention too; its decode steps may not.
    The merging methods that match tokens to centers (EMS, D2O) do it with kernel 5."""
    import fast.decode
    import fast.merge
    import nanokv.cache

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference attention (or kernel 1 over dequantized tokens) was called")

    model = peaked_model(n_layer=2, n_head=2, n_embd=32, block_size=128)
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    ref = run(model, make_method(name, 16), "torch", prompt, 8)
    no_reference = lambda: monkeypatch.setattr(nanokv.cache, "reference_attention", forbidden)  # noqa: E731
    no_kernel_1 = lambda: monkeypatch.setattr(fast.decode, "decode_attention", forbidden)  # noqa: E731
    if name != "quantized":
        no_reference()
    if name in ("rtn", "kivi", "mikv", "adakv"):  # (Ada-KV: kernel 1 on the flat ragged heads, not padded)
        no_kernel_1()
    calls, kernel_5 = [], fast.merge.nearest_center
    monkeypatch.setattr(fast.merge, "nearest_center", lambda *a, **kw: calls.append(1) or kernel_5(*a, **kw))
    varlen, kernel_1v = [], fast.decode.decode_attention_varlen
    monkeypatch.setattr(fast.decode, "decode_attention_varlen", lambda *a, **kw: varlen.append(1) or kernel_1v(*a, **kw))
    def after_prefill():  # Quantized(Scissorhands): its decode steps use neither
        no_reference()
        no_kernel_1()

    out = run(model, make_method(name, 16), "triton", prompt, 8, after_prefill if name == "quantized" else None)
    assert out[0] == ref[0] and out[2] == ref[2] and (out[1] - ref[1]).abs().max() <= 1e-4
    assert bool(calls) == (name in ("ems", "d2o")), f"kernel 5 called {len(calls)} times"
    assert len(varlen) == (2 * 8 if name == "adakv" else 0)  # every decode step of both layers
