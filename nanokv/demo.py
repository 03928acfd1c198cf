"""
Demo: generate text through a KV cache and print what the cache holds.

    python -m nanokv.demo                                  # the committed tiny model, H2O at half the prompt
    python -m nanokv.demo --method streamingllm --budget 32 --new 100

Runs the same prompt through the full cache and through the chosen method, prints both
continuations, and the bytes each cache holds (with the breakdown). Needs no download:
the default model is the tiny byte-level checkpoint shipped in nanokv/assets/ (a random
tiny model when that file is absent).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from gpt import GPT, TINY_CHECKPOINT, GPTConfig
from nanokv import METHODS, KVCache
from nanokv.eval import parse_budget

DEFAULT_PROMPT = (
    "The \"with\" statement\n******************\n\nThe \"with\" statement is used to wrap the execution "
    "of a block with methods defined by a context manager. This allows common"
)


def main(argv=None):
    p = argparse.ArgumentParser(description="generate through a compressed KV cache and print its memory",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="nanokv-tiny", help="checkpoint, HF directory or name")
    p.add_argument("--method", default="h2o", help=f"one of {sorted(METHODS)}")
    p.add_argument("--budget", default="50%", help="tokens kept per head: a count, or a percentage of the prompt")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    p.add_argument("--new", type=int, default=120, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="torch seed")
    p.add_argument("--gpt2-dir", help="offline GPT-2 tokenizer files for a GPT-2 model (else $NANOKV_GPT2_DIR)")
    args = p.parse_args(argv)
    if args.method not in METHODS:
        p.error(f"unknown method {args.method!r}; valid methods: {sorted(METHODS)}")
    if not args.prompt:
        p.error("--prompt is empty: give some text to continue")
    if args.new < 1:
        p.error(f"--new must be >= 1, got {args.new}")
    torch.manual_seed(args.seed)
    try:
        if args.model == "nanokv-tiny" and not os.path.isfile(TINY_CHECKPOINT):
            print("(no committed checkpoint found: using a random tiny model)", file=sys.stderr)
            model = GPT(GPTConfig.preset("tiny")).eval()
        else:
            model = GPT.from_pretrained(args.model)
        if args.gpt2_dir:
            model.tokenizer_dir = args.gpt2_dir  # GPT-2's tokenizer files, offline
        tok = model.tokenizer
    except (ValueError, OSError) as e:  # an unknown model, a missing tokenizer offline
        p.error(str(e))
    idx = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    if idx.size(1) + args.new > model.config.block_size:
        p.error(f"prompt ({idx.size(1)} tokens) + --new ({args.new}) exceeds block_size {model.config.block_size}")
    caches = {"full": KVCache(model.config, "full")}
    if args.method != "full":
        try:
            budget = parse_budget(args.budget, idx.size(1))  # relative to the prompt, so the demo compresses
            caches[args.method] = KVCache(model.config, METHODS[args.method].scaled(budget))
        except (ValueError, TypeError) as e:
            p.error(str(e))
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers x "
          f"{model.config.n_head} heads, tokenizer {model.tokenizer_name}")
    print(f"prompt ({idx.size(1)} tokens): {args.prompt!r}\n")
    for name, cache in caches.items():
        out = model.generate(idx, args.new, cache=cache, temperature=0)
        text = tok.decode(out[0, idx.size(1):].tolist())
        b = cache.memory_breakdown()
        detail = ", ".join(f"{k} {v:,}" for k, v in b.items() if v)
        print(f"--- {cache.method!r}\n{text!r}\n    holds {cache.memory_bytes():,} bytes ({detail}); "
              f"{int(cache.lengths(0)[0].float().mean())} of {cache.seq_len} tokens per head\n")


if __name__ == "__main__":
    main()
