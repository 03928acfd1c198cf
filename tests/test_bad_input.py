"""The catalogue of bad input: every entry is something a user can get wrong, the error type it
must raise, and a pattern the message must match (it names the argument and what is allowed).
Never a silent wrong answer, never a NaN. One parametrized test; add a row for every new check."""

import os
import random
import tempfile
from unittest import mock

import pytest
import torch

import train_tiny
from gpt import GPT, GPTConfig, state_digest
from nanokv import METHODS, KVCache, Method
from nanokv import eval as nkeval
from nanokv.episodes import lines_episode, make_episode, passkey_episode
from nanokv.quant import pack, quantize
from nanokv.tokenizer import get_tokenizer

from conftest import peaked_model

TINY_ARGS = ["--preset", "nano", "--block-size", "128", "--curriculum", "128", "--batch-size", "4",
             "--eval-episodes", "1", "--threads", "1"]


def tmpdir():
    return tempfile.mkdtemp(prefix="nanokv-bad-")


def started(method="full", model=None, batch=2, n=5, **kw):
    """A model and a cache that has seen a prompt of n tokens."""
    m = model or peaked_model()
    cache = KVCache(m.config, method, **kw)
    m(torch.zeros(batch, n, dtype=torch.long), cache=cache)
    return m, cache


def method(name, **kw):
    return lambda: METHODS[name](**kw)


def cache_with(name, **kw):
    return lambda: KVCache(peaked_model().config, name, **kw)


def edited_checkpoint(edit):
    """A valid checkpoint of a small model with one edit applied to its state dict."""
    path = os.path.join(tmpdir(), "m.pt")
    peaked_model().save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["model"])
    ckpt["digest"] = state_digest(ckpt["model"])  # a consistent file: the key checks are what is tested
    torch.save(ckpt, path)
    return lambda: GPT.from_pretrained(path)


def damaged_checkpoint():
    """A checkpoint whose weights changed after saving (bytes flipped on disk): the digest refuses it."""
    path = os.path.join(tmpdir(), "m.pt")
    peaked_model().save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"].view(torch.int32)[0, 0] ^= 1 << 30
    torch.save(ckpt, path)
    return GPT.from_pretrained(path)


def nan_weight(where):
    m = peaked_model()
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    if where == "checkpoint":
        path = os.path.join(tmpdir(), "m.pt")
        m.save_checkpoint(path)
        return GPT.from_pretrained(path)
    return m.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)


def grad_cache_clone():
    """Outside no_grad the cache stores detached tensors: clone works, the logits' graph stays local."""
    m = peaked_model()
    cache = KVCache(m.config, "h2o", budget=8)
    for t in range(12):
        logits, _ = m(torch.full((1, 1), t, dtype=torch.long), cache=cache)
    assert not any(f.requires_grad for layer in cache.layers for f in layer.fields.values())
    cache.clone()
    raise ValueError("clone ok")  # the catalogue expects an error; this one marks success


def another_model():
    a, b = peaked_model(seed=0), peaked_model(seed=1)  # same config, different weights
    cache = KVCache(a.config, "full")
    a(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    b(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def eval_leaves_no_stale_summary():
    out = tmpdir()
    for name in ("summary.json", "summary.md", "passkey.png"):
        open(os.path.join(out, name), "w").close()
    try:
        nkeval.main(["--model", "nanokv-tiny", "--methods", "h2o,h2o(recnt=3)", "--out", out])
    except SystemExit as e:
        left = sorted(os.listdir(out))
        raise SystemExit(f"{e.code} | left: {left}") from None


def file_with(data: bytes, name="f.pt"):
    path = os.path.join(tmpdir(), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def train_with(argv):
    return lambda: train_tiny.train(train_tiny.get_args(TINY_ARGS + argv))


def resume_bigger():
    out = os.path.join(tmpdir(), "t.pt")
    train_tiny.train(train_tiny.get_args(TINY_ARGS + ["--steps", "1", "--eval-interval", "0", "--out", out]))
    args = TINY_ARGS[:2] + ["--block-size", "256", "--curriculum", "256", "--batch-size", "2", "--resume", out,
                            "--steps", "2"]
    return train_tiny.train(train_tiny.get_args(args))


HF_CONFIG = '{"n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300}'


def hf_dir(config_json, weights=None):
    """GPT.from_pretrained on a save_pretrained-style directory with this config (and weights)."""
    d = tmpdir()
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write(config_json)
    if weights is not None:
        file_with(weights, os.path.join(d, "model.safetensors"))
    return GPT.from_pretrained(d)


def episode_ingredients():
    tok = get_tokenizer("byte")
    text = "the quick brown fox jumps over the lazy dog " * 40
    return tok, tok.encode(text), text.split()


def other_layers():  # a cache built for a 3-layer config used on a 2-layer model
    m = peaked_model()
    other = GPTConfig(**{**m.config.to_dict(), "n_layer": 3})
    m(torch.zeros(1, 4, dtype=torch.long), cache=KVCache(other, "full"))


def other_block_size():
    m = peaked_model()
    other = GPTConfig(**{**m.config.to_dict(), "block_size": 512})
    m(torch.zeros(1, 4, dtype=torch.long), cache=KVCache(other, "h2o", budget=8))


def no_interpreter():
    with mock.patch("fast.interpreting", return_value=False), mock.patch("torch.cuda.is_available", return_value=False):
        KVCache(peaked_model().config, "full", backend="triton")


def triton_on_cpu_without_interpreter():
    m = peaked_model()
    cache = KVCache(m.config, "full", backend="triton")
    with mock.patch("fast.interpreting", return_value=False):
        m(torch.zeros(1, 4, dtype=torch.long), cache=cache)


def decode_attention(*shapes):
    from fast.decode import decode_attention as fn

    return lambda: fn(*(torch.randn(*s) for s in shapes))


def quantize_pack(bits, group):
    from fast.quant import quantize_pack as fn

    return lambda: fn(torch.randn(2, 32), bits, group)


E = ValueError
CASES = [
    # ---------------------------------------------------------------- method parameters
    ("budget 0", method("knorm", budget=0), E, r"budget must be >= 1, got 0"),
    ("budget negative", method("h2o", budget=-4), E, r"budget must be >= 1"),
    ("budget float", method("knorm", budget=2.5), TypeError, r"budget must be an int"),
    ("budget bool", method("h2o", budget=True), TypeError, r"budget must be an int"),
    ("budget string", method("tova", budget="64"), TypeError, r"budget must be an int"),
    ("window negative", method("knorm", budget=8, window=-1), E, r"window must be >= 0"),
    ("sinks + window over budget", method("knorm", budget=8, window=6, n_sink=4), E,
     r"n_sink \+ window \(4 \+ 6\) must be <= budget \(8\)"),
    ("streamingllm sinks fill budget", method("streamingllm", budget=4, n_sink=4), E, r"n_sink \(4\) must be < budget \(4\)"),
    ("h2o recent over budget", method("h2o", budget=8, recent=9), E, r"must be <= budget"),
    ("h2o sinks + recent over budget", method("h2o", budget=8, recent=4, n_sink=5), E, r"n_sink \+ window \(5 \+ 4\)"),
    ("tova head_reduce", method("tova", budget=8, head_reduce="max"), E, r"head_reduce must be 'mean' or 'none'"),
    ("scissorhands recent over budget", method("scissorhands", budget=8, recent=10), E, r"must be <= budget"),
    ("scissorhands drop 0", method("scissorhands", budget=20, drop=0), E, r"drop must be \[1, "),
    ("scissorhands history 0", method("scissorhands", budget=20, history=0), E, r"history must be >= 1"),
    ("scissorhands threshold", method("scissorhands", budget=20, threshold="0.1"), E, r"threshold must be"),
    ("snapkv window over budget", method("snapkv", budget=16), E, r"n_sink \+ window \(0 \+ 32\) must be <= budget \(16\)"),
    ("snapkv even kernel", method("snapkv", budget=64, kernel=4), E, r"kernel must be odd"),
    ("snapkv pool", method("snapkv", budget=64, pool="median"), E, r"pool must be"),
    ("pyramidkv beta", method("pyramidkv", budget=64, beta=0.5), E, r"beta must be >= 1"),
    ("pyramidkv beta string", method("pyramidkv", budget=64, beta="20"), TypeError, r"beta must be a number"),
    ("pyramidkv budget it cannot fit", cache_with("pyramidkv", budget=2, window=0, beta=20), E, r"top layer's budget"),
    ("adakv alpha", method("adakv", budget=64, alpha=1.5), E, r"alpha must be in \[0, 1\]"),
    ("rtn bits 5", method("rtn", bits=5), E, r"bits must be one of \(2, 3, 4, 8\)"),
    ("rtn group 0", method("rtn", bits=4, group=0), E, r"group must be None or a positive int"),
    ("rtn group not dividing head dim", cache_with("rtn", group=5), E, r"must be a positive divisor of head_dim \(16\)"),
    ("kivi bits 1", method("kivi", bits=1), E, r"bits must be one of"),
    ("kivi residual not a multiple", method("kivi", group=32, residual=40), E,
     r"residual \(40\) must be a multiple of group \(32\)"),
    ("kivi group not dividing head dim", cache_with("kivi", group=5, residual=10), E, r"positive divisor of head_dim"),
    ("mikv rho 0", method("mikv", rho=0.0), E, r"rho must be in \(0, 1\]"),
    ("mikv rho 1.5", method("mikv", rho=1.5), E, r"rho must be in \(0, 1\]"),
    ("mikv rho NaN", method("mikv", rho=float("nan")), E, r"rho must be in \(0, 1\]"),
    ("mikv rho string", method("mikv", rho="0.2"), TypeError, r"rho must be a number, got str"),
    ("mikv bits_lo 6", method("mikv", bits_lo=6), E, r"bits_lo must be one of"),
    ("mikv bits_hi 2", method("mikv", bits_hi=2), E, r"bits_hi must be None \(the model dtype\), 8 or 4"),
    ("mikv demotion that raises precision", method("mikv", bits_lo=None, bits_hi=8), E,
     r"bits_lo \(None\) must be below bits_hi \(8\)"),
    ("mikv bits_lo above bits_hi", method("mikv", bits_lo=8, bits_hi=4), E, r"bits_lo \(8\) must be below bits_hi \(4\)"),
    ("mikv recent string", method("mikv", recent="half"), TypeError, r"recent must be a number"),
    ("mikv group not dividing", cache_with("mikv", group=7), E, r"positive divisor of head_dim"),
    ("quantized unknown inner", method("quantized", inner="nope", budget=8), E, r"unknown method 'nope'"),
    ("quantized bits 7", method("quantized", inner="h2o", budget=8, bits=7), E, r"bits must be one of"),
    ("quantized kwargs with an instance", lambda: METHODS["quantized"](inner=METHODS["h2o"](8), budget=8), TypeError,
     r"inner must be a method name"),
    ("quantized group not dividing", cache_with("quantized", inner="h2o", budget=8, group=3), E, r"positive divisor"),
    ("ems window fills budget", method("ems", budget=8, window=8), E, r"window \(8\) must be < budget \(8\)"),
    ("ems mass 0", method("ems", budget=64, mass=0.0), E, r"mass must be in \(0, 1\]"),
    ("ems mass 1.2", method("ems", budget=64, mass=1.2), E, r"mass must be in \(0, 1\]"),
    ("ems tau -2", method("ems", budget=64, tau=-2), E, r"tau must be >= -1"),
    ("ems key_merge", method("ems", budget=64, key_merge="sum"), E, r"key_merge must be 'mean' or 'direction'"),
    ("ems head_budgets", method("ems", budget=64, head_budgets="layer"), E, r"head_budgets must be"),
    ("ems interval 0", method("ems", budget=64, interval=0), E, r"interval must be >= 1"),
    ("cam m 0", method("cam", budget=16, m=0), E, r"m \(merge window\) must be an int >= 1"),
    ("cam max_prob 1.5", method("cam", budget=16, max_prob=1.5), E, r"max_prob must be in \[0, 1\]"),
    ("cam recent over budget", method("cam", budget=4, recent=8), E, r"must be <= budget"),
    ("d2o alpha 2", method("d2o", budget=16, alpha=2.0), E, r"alpha must be in \[0, 1\]"),
    ("d2o threshold -3", method("d2o", budget=16, threshold=-3.0), E, r"threshold must be >= -1"),
    ("d2o sinks + recent over budget", method("d2o", budget=6), E, r"n_sink \+ window \(4 \+ 3\) must be <= budget \(6\)"),
    # ---------------------------------------------------------------- the cache
    ("unknown method name", cache_with("h3o"), E, r"unknown method 'h3o'; valid methods: .*'full'"),
    ("unknown backend", cache_with("full", backend="cuda"), E, r"backend must be one of"),
    ("grow_by 0", cache_with("full", grow_by=0), E, r"grow_by must be an int >= 1"),
    ("config not a GPTConfig", lambda: KVCache({"n_layer": 2}, "full"), TypeError, r"config must be a GPTConfig"),
    ("method not a Method", lambda: KVCache(peaked_model().config, 3), TypeError, r"method must be a name or a nanokv.Method"),
    ("kwargs with a method instance", lambda: KVCache(peaked_model().config, Method(), budget=3), TypeError,
     r"keyword arguments are only accepted"),
    ("batch size changes", lambda: (lambda m, c: m(torch.zeros(1, 1, dtype=torch.long), cache=c))(*started()), E,
     r"batch size 1 differs"),
    ("dtype changes", lambda: (lambda m, c: m.double()(torch.zeros(2, 1, dtype=torch.long), cache=c))(*started()),
     TypeError, r"dtype torch.float64 differs"),
    ("device changes", lambda: (lambda m, c: m.to("meta")(torch.zeros(2, 1, dtype=torch.long, device="meta"), cache=c))(
        *started()), E, r"layer 0 got meta tensors; its cache lives on cpu"),
    ("cache for other heads", lambda: peaked_model(n_head=2)(torch.zeros(1, 3, dtype=torch.long),
                                                             cache=KVCache(peaked_model().config)), E,
     r"another model config"),
    ("cache for other layers", other_layers, E, r"this cache was built for another model config"),
    ("cache for other block size", other_block_size, E, r"this cache was built for another model config"),
    ("empty cache introspection", lambda: KVCache(peaked_model().config).kept_positions(0), RuntimeError, r"cache is empty"),
    ("layer out of range", lambda: started()[1].kept_positions(5), E, r"layer_idx must be in \[0, 2\), got 5"),
    ("head out of range", lambda: started()[1].kept_positions(0, 0, 4), E, r"head must be in \[0, 4\), got 4"),
    ("batch row out of range", lambda: started()[1].kept_positions(0, 2, 0), E,
     r"batch must be in \[0, 2\), got 2"),
    ("triton without GPU or interpreter", no_interpreter, RuntimeError, r"needs a CUDA GPU, or TRITON_INTERPRET=1"),
    ("triton on CPU tensors", triton_on_cpu_without_interpreter, E, r"use backend='torch' on a CPU"),
    # ---------------------------------------------------------------- the model
    ("prompt past block size", lambda: peaked_model(block_size=32)(torch.zeros(1, 33, dtype=torch.long)), E,
     r"past the model's block_size 32"),
    ("decode past block size", lambda: (lambda m, c: m(torch.zeros(1, 3, dtype=torch.long), cache=c))(
        *started(model=peaked_model(block_size=32), batch=1, n=30)), E, r"positions 30..32\) is past the model's block_size"),
    ("generate past block size", lambda: peaked_model(block_size=32).generate(torch.zeros(1, 30, dtype=torch.long), 5), E,
     r"past block_size 32"),
    ("idx not a (B, T) int tensor", lambda: peaked_model()(torch.zeros(4)), TypeError, r"idx must hold integer token ids"),
    ("idx empty", lambda: peaked_model()(torch.zeros(1, 0, dtype=torch.long)), E, r"at least one token"),
    ("max_new_tokens negative", lambda: peaked_model().generate(torch.zeros(1, 2, dtype=torch.long), -1), E, r"max_new_tokens"),
    ("temperature negative", lambda: peaked_model().generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=-1), E,
     r"temperature must be >= 0"),
    ("top_k 0", lambda: peaked_model().generate(torch.zeros(1, 2, dtype=torch.long), 1, top_k=0), E, r"top_k must be"),
    ("config n_layer 0", lambda: GPTConfig(n_layer=0), E, r"n_layer"),
    ("config heads not dividing", lambda: GPTConfig(n_embd=10, n_head=3), E, r"divisible"),
    ("config dropout 1.5", lambda: GPTConfig(dropout=1.5), E, r"dropout"),
    ("config block_size negative", lambda: GPTConfig(block_size=-1), E, r"block_size"),
    ("unknown preset", lambda: GPTConfig.preset("huge"), E, r"unknown preset"),
    ("unknown model name", lambda: GPT.from_pretrained("gpt5"), E, r"unknown model 'gpt5'.*gpt2-medium"),
    ("corrupt checkpoint", lambda: GPT.from_pretrained(file_with(b"not a checkpoint")), E, r"cannot read checkpoint"),
    ("not a nanokv checkpoint", lambda: (torch.save({"hello": 1}, p := os.path.join(tmpdir(), "o.pt")),
                                         GPT.from_pretrained(p)), E, r"not a nanokv checkpoint"),
    ("checkpoint missing a tensor", lambda: edited_checkpoint(lambda s: s.pop("transformer.ln_f.weight"))(), E,
     r"missing tensors: \['transformer.ln_f.weight'\]"),
    ("checkpoint with an unexpected tensor", lambda: edited_checkpoint(
        lambda s: s.__setitem__("transformer.extra", torch.zeros(1)))(), E, r"unexpected tensors: \['transformer.extra'\]"),
    ("checkpoint with a mis-shaped tensor", lambda: edited_checkpoint(
        lambda s: s.__setitem__("transformer.wpe.weight", torch.zeros(3, 3)))(), E,
     r"transformer.wpe.weight: expected \(256, 64\), got \(3, 3\)"),
    ("hf config.json lacking a field", lambda: hf_dir("{}"), E, r"config.json lacks the GPT-2 field 'n_positions'"),
    ("hf directory without weights", lambda: hf_dir(HF_CONFIG), E, r"no model.safetensors or pytorch_model.bin"),
    ("hf weights unreadable", lambda: hf_dir(HF_CONFIG, b"garbage"), E, r"cannot read the weights"),
    ("model name not a string", lambda: GPT.from_pretrained(3), TypeError, r"name_or_path must be a str"),
    # ---------------------------------------------------------------- tokenizers, episodes, quantization, kernels
    ("unknown tokenizer", lambda: get_tokenizer("bpe"), E, r"unknown tokenizer 'bpe'"),
    ("gpt2 files missing", lambda: get_tokenizer("gpt2", gpt2_dir=tmpdir()), FileNotFoundError, r"neither gpt2.tiktoken"),
    ("episode depth 1.5", lambda: passkey_episode(random.Random(0), *episode_ingredients()[:2], 300, depth=1.5),
     E, r"depth must be in \[0, 1\]"),
    ("episode too short", lambda: lines_episode(random.Random(0), *episode_ingredients(), 10), E,
     r"length must be an int >= 48"),
    ("unknown episode kind", lambda: make_episode("qa", random.Random(0), *episode_ingredients(), 100), E,
     r"unknown episode kind"),
    ("quantize bits 5", lambda: quantize(torch.randn(2, 16), bits=5, group=4), E, r"bits must be one of \(2, 3, 4, 8\), got 5"),
    ("quantize group 5", lambda: quantize(torch.randn(2, 16), bits=4, group=5), E,
     r"group size 5 must be a positive divisor of the quantized dimension \(16\)"),
    ("quantize group 0", lambda: quantize(torch.randn(2, 16), bits=4, group=0), E, r"group size 0 must be a positive divisor"),
    ("pack bits 5", lambda: pack(torch.zeros(2, 4, dtype=torch.uint8), 5), E, r"bits must be one of"),
    ("decode kernel with T=2", decode_attention((1, 2, 2, 16), (1, 2, 5, 16), (1, 2, 5, 16)), E, r"one query per head, got T=2"),
    ("decode kernel k, v mismatch", decode_attention((1, 2, 1, 16), (1, 2, 5, 16), (1, 2, 4, 16)), E,
     r"k, v must be \(B, H, L, D\)"),
    ("quantize kernel 3-bit group 4", quantize_pack(3, 4), E, r"group \(4\) to be a multiple of 8 at 3 bits"),
    ("quantize kernel bits 5", quantize_pack(5, 8), E, r"must be one of"),
    # ---------------------------------------------------------------- command lines and data files
    ("eval unknown method", lambda: nkeval.get_args(["--methods", "full,h3o"]), E, r"unknown method 'h3o'; valid methods"),
    ("eval method spec", lambda: nkeval.get_args(["--methods", "mikv(rho)"]), E, r"'rho' is not key=value"),
    ("eval unknown task", lambda: nkeval.get_args(["--tasks", "qa"]), E, r"unknown tasks \['qa'\]; valid tasks"),
    ("eval no task", lambda: nkeval.get_args(["--tasks", ""]), E, r"unknown tasks \[\]; valid tasks"),
    ("eval samples 0", lambda: nkeval.get_args(["--samples", "0"]), E, r"--samples must be >= 1"),
    ("eval windows 0", lambda: nkeval.get_args(["--windows", "0"]), E, r"--windows must be >= 1"),
    ("eval budget over context", lambda: nkeval.parse_budget("600", 512), E,
     r"budget '600' = 600 tokens must be in \[1, context=512\]"),
    ("eval budget not a number", lambda: nkeval.parse_budget("ten", 512), E, r"neither a token count nor a percentage"),
    ("eval missing text file", lambda: nkeval.get_args(["--text", os.path.join(tmpdir(), "none.txt")]), FileNotFoundError,
     r"does not exist"),
    ("train episode ratio 1.5", lambda: train_tiny.get_args(TINY_ARGS + ["--episode-ratio", "1.5"]), E,
     r"--episode-ratio must be in \[0, 1\]"),
    ("train lines share negative", lambda: train_tiny.get_args(TINY_ARGS + ["--lines-share", "-0.1"]), E,
     r"--lines-share must be in \[0, 1\]"),
    ("train repeat ratio 2", lambda: train_tiny.get_args(TINY_ARGS + ["--repeat-ratio", "2"]), E, r"--repeat-ratio must be in"),
    ("train curriculum past block size", lambda: train_tiny.get_args(TINY_ARGS + ["--curriculum", "256"]), E,
     r"--curriculum lengths must be in \[8, --block-size=128\]"),
    ("train steps 0", lambda: train_tiny.get_args(TINY_ARGS + ["--steps", "0"]), E, r"--steps and --batch-size must be >= 1"),
    ("train ema 1", lambda: train_tiny.get_args(TINY_ARGS + ["--ema", "1"]), E, r"--ema must be in \[0, 1\)"),
    ("train missing data file", train_with(["--data", os.path.join(tempfile.gettempdir(), "nanokv-none.txt")]),
     FileNotFoundError, r"does not exist"),
    ("train empty data file", lambda: train_with(["--data", file_with(b"", "empty.txt")])(), E, r"empty or too short"),
    ("train block size past the resumed model's", resume_bigger, E, r"larger than the model's block_size 128"),
    # ---------------------------------------------------------------- a new user's first hour (issue 18)
    ("hf tie_word_embeddings false", lambda: hf_dir(HF_CONFIG[:-1] + ', "tie_word_embeddings": false}'), E,
     r"unsupported GPT-2 config: tie_word_embeddings=False"),
    ("hf scale_attn_weights false", lambda: hf_dir(HF_CONFIG[:-1] + ', "scale_attn_weights": false}'), E,
     r"scale_attn_weights=False"),
    ("hf scale by inverse layer idx", lambda: hf_dir(HF_CONFIG[:-1] + ', "scale_attn_by_inverse_layer_idx": true}'), E,
     r"scale_attn_by_inverse_layer_idx=True"),
    ("hf reorder and upcast", lambda: hf_dir(HF_CONFIG[:-1] + ', "reorder_and_upcast_attn": true}'), E,
     r"reorder_and_upcast_attn=True"),
    ("hf n_inner", lambda: hf_dir(HF_CONFIG[:-1] + ', "n_inner": 100}'), E, r"n_inner=100 \(nanokv's MLP is 4 \* n_embd = 256"),
    ("hf exact gelu", lambda: hf_dir(HF_CONFIG[:-1] + ', "activation_function": "gelu"}'), E,
     r"activation_function='gelu'"),
    ("hf cross attention", lambda: hf_dir(HF_CONFIG[:-1] + ', "add_cross_attention": true}'), E, r"add_cross_attention=True"),
    ("hf another architecture", lambda: hf_dir(HF_CONFIG[:-1] + ', "model_type": "llama"}'), E, r"'llama' model; .* GPT-2 only"),
    ("hf vocabulary without a nanokv tokenizer", lambda: GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16,
     vocab_size=1000)).tokenizer, E, r"no nanokv tokenizer matches this model's vocabulary of 1000"),
    ("damaged checkpoint", damaged_checkpoint, E, r"is damaged: its weights do not match the SHA-256 digest"),
    ("checkpoint with a NaN weight", lambda: nan_weight("checkpoint"), E, r"holds NaN or inf weights in \['transformer.h.0.mlp.c_fc.weight'\]"),
    ("generate from a NaN weight", lambda: nan_weight("model"), FloatingPointError, r"non-finite logits at generation step 0"),
    ("eval budget 0%", lambda: nkeval.parse_budget("0%", 512), E, r"budget '0%': a percentage must be in \(0%, 100%\]"),
    ("eval budget -5%", lambda: nkeval.parse_budget("-5%", 512), E, r"budget '-5%': a percentage must be in"),
    ("eval budget 150%", lambda: nkeval.parse_budget("150%", 512), E, r"a percentage must be in"),
    ("eval budget inside a spec", lambda: nkeval.parse_method("h2o(budget=64)"), E, r"the budget comes from --budgets"),
    ("eval second method misspelt: nothing run, no stale summary", eval_leaves_no_stale_summary, SystemExit,
     r"method 'h2o' with \{'recnt': 3\}: .*unexpected keyword.* \| left: \[\]"),
    ("rtn group 1 holds more than fp16", method("rtn", bits=4, group=1), E,
     r"group=1 at 4 bits stores 36 bits per value .* use group >= 3"),
    ("kivi group 2 at 8 bits", method("kivi", bits=8, group=2, residual=8), E, r"group=2 at 8 bits stores 24 bits per value"),
    ("quantized group 1", method("quantized", inner="h2o", budget=8, group=1), E, r"group=1 at 4 bits"),
    ("mikv group 2 at 2 bits", method("mikv", bits_lo=2, group=2), E, r"group=2 at 2 bits stores 18 bits per value"),
    ("rtn bits 4.0", method("rtn", bits=4.0), TypeError, r"bits must be an int, one of \(2, 3, 4, 8\), got float 4.0"),
    ("mikv bits_lo True", method("mikv", bits_lo=True), TypeError, r"bits_lo must be an int"),
    ("budget a float", method("h2o", budget=64.0), TypeError, r"budget must be an int, got float 64.0"),
    ("budget a 1-element list", method("h2o", budget=[64]), TypeError, r"budget must be an int, got list"),
    ("quantized without a budget", method("quantized"), TypeError,
     r"quantized\(inner='scissorhands'\) needs budget=N"),
    ("budget given as the backend", lambda: KVCache(peaked_model().config, "h2o", 64), E,
     r"backend must be one of \('torch', 'triton'\), got 64; .* KVCache\(config, 'h2o', budget=64\)"),
    ("cache used by another model", another_model, E, r"this cache holds another model's keys and values"),
    ("cache outside no_grad holds no graph and clones", grad_cache_clone, E, r"^clone ok$"),
    ("1-D prompt", lambda: peaked_model().generate(torch.zeros(5, dtype=torch.long), 2), E,
     r"idx must be 2-D \(B, T\), got shape \(5,\) \(one sequence: idx\[None\]\)"),
    ("list prompt", lambda: peaked_model().generate([[1, 2, 3]], 2), TypeError,
     r"idx must be a \(B, T\) tensor of token ids, e.g. torch.tensor\(\[ids\]\); got list"),
    ("float prompt", lambda: peaked_model()(torch.zeros(1, 3)), TypeError, r"idx must hold integer token ids"),
    ("token id past the vocabulary", lambda: peaked_model()(torch.tensor([[1, 256]])), E,
     r"token ids must be in \[0, 256\) \(the vocabulary\), got ids from 1 to 256"),
    ("negative token id", lambda: peaked_model().generate(torch.tensor([[-1, 3]]), 2), E, r"got ids from -1 to 3"),
    ("max_new_tokens 2.5", lambda: peaked_model().generate(torch.zeros(1, 3, dtype=torch.long), 2.5), TypeError,
     r"max_new_tokens must be an int, got float 2.5"),
    ("train data is a directory", lambda: train_tiny.get_args(TINY_ARGS + ["--data", tmpdir()]), E,
     r"--data .* is a directory; pass one text file"),
    ("train on cuda without cuda", lambda: train_tiny.get_args(TINY_ARGS + ["--device", "cuda"]), E,
     r"--device cuda: CUDA is not available here"),
    ("train curriculum below episodes' minimum", train_with(["--curriculum", "32"]), E,
     r"--curriculum lengths \[32\] are too short for a retrieval episode with the byte tokenizer \(at least \d+ tokens\)"),
]


@pytest.mark.parametrize("thunk, error, pattern", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_gives_a_named_error(thunk, error, pattern):
    with pytest.raises(error, match=pattern):
        thunk()


def test_the_catalogue_is_large_and_unique():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 40, len(names)


def test_integral_numpy_and_tensor_arguments_are_accepted():
    """budget=np.int64(64) or a 0-d integer tensor (what a numpy or torch computation yields) is an
    int; floats are not (their rows are in the catalogue above)."""
    import numpy as np

    m = peaked_model()
    for budget in (np.int64(16), np.int32(16), torch.tensor(16)):
        method = METHODS["h2o"](budget=budget)
        assert type(method.budget) is int and method.budget == 16
        cache = KVCache(m.config, method)
        with torch.no_grad():
            m(torch.zeros(1, 20, dtype=torch.long), cache=cache)
        assert (cache.lengths(0) == 16).all()
    assert METHODS["rtn"](bits=np.int64(4)).bits == 4
    assert m.generate(torch.zeros(1, 3, dtype=torch.long), np.int64(2), temperature=0).shape == (1, 5)
