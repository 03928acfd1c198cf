"""
Evaluate KV-cache methods on the same work: retrieval accuracy, perplexity and memory.

    python -m nanokv.eval                                   # quick comparison on the tiny model
    python -m nanokv.eval --methods h2o,snapkv,ems --budgets 2%,5%,10% --tasks passkey --samples 50
    python -m nanokv.eval --methods "mikv(bits_lo=3),mikv(balancer=False)" --tasks lines

Tasks
  passkey   needle-in-a-haystack exact match at the model's full context, needle at any depth
  lines     line retrieval (MiKV's task) exact match
  ppl       prefill-then-continue perplexity: the first half of a held-out text is prefilled
            (and compressed), the second half is read through the cache one token at a time
Protocols for retrieval (named in every result): "agnostic" [default] prefills the context,
lets the method compress it, then feeds the question as a continuation chunk; "aware"
prefills context and question at once.

Budgets are absolute tokens ("64") or a percentage of the context ("5%"). Windows and sinks
are scaled to small budgets by each method's `scaled(budget)`. Methods without a budget
(full, rtn, kivi, mikv) run once with their defaults. Output: a folder with config.json,
results.jsonl (one row per method x budget x task), summary.md (a markdown table).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from . import METHODS, KVCache
from .corpus import builtin_text, file_text
from .episodes import exact_match, make_episode, words_from

TASKS = ("passkey", "lines", "ppl")


def parse_budget(text: str, context: int) -> int:
    """'64' -> 64 tokens; '5%' -> 5% of the context (at least 1 token)."""
    try:
        if text.endswith("%"):
            value = max(1, round(float(text[:-1]) / 100 * context))
        else:
            value = int(text)
    except ValueError:
        raise ValueError(f"budget {text!r} is neither a token count nor a percentage like '5%'") from None
    if not 1 <= value <= context:
        raise ValueError(f"budget {text!r} = {value} tokens must be in [1, context={context}]")
    return value


def parse_method(spec: str) -> tuple[str, dict]:
    """'mikv' -> ('mikv', {}); 'mikv(bits_lo=3,balancer=False)' -> ('mikv', {...})."""
    spec = spec.strip()
    name, _, rest = spec.partition("(")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}")
    kwargs = {}
    if rest:
        if not rest.endswith(")"):
            raise ValueError(f"method spec {spec!r} must look like name(key=value,...)")
        for item in filter(None, rest[:-1].split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"method spec {spec!r}: {item!r} is not key=value")
            try:
                kwargs[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = value.strip()  # a bare word, e.g. inner=h2o
    return name, kwargs


def split_methods(text: str) -> list[str]:
    """Split a comma list of method specs, keeping commas inside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [m for m in out + [cur] if m.strip()]


def make_factory(config, name: str, budget: int | None, **kwargs):
    """A function returning a fresh KVCache for `name` at `budget`."""
    cls = METHODS[name]

    def factory():
        return KVCache(config, cls.scaled(budget, **kwargs) if cls.takes_budget else cls(**kwargs))

    factory()  # fail now, not in the middle of a run, if the parameters do not fit
    return factory


def episodes(model, kind: str, n: int, length: int, text: str, seed: int):
    tok = model.tokenizer
    rng = random.Random(seed)
    filler, words = tok.encode(text), words_from(text)
    return [make_episode(kind, rng, tok, filler, words, length) for _ in range(n)]


@torch.no_grad()
def perplexity(model, factory, text: str, length: int, n: int, seed: int) -> float:
    """Prefill-then-continue perplexity over n windows of `length` tokens of `text`."""
    ids = model.tokenizer.encode(text)
    rng = random.Random(seed)
    nll, count = 0.0, 0
    dev = next(model.parameters()).device
    for _ in range(n):
        start = rng.randrange(0, len(ids) - length - 1)
        seq = torch.tensor([ids[start:start + length + 1]], device=dev)
        cache, half = factory(), length // 2
        logits, _ = model(seq[:, :half], cache=cache, last_logits_only=True)
        for t in range(half, length):
            logp = torch.log_softmax(logits[0, -1].float(), -1)
            nll -= float(logp[seq[0, t]])
            count += 1
            logits, _ = model(seq[:, t:t + 1], cache=cache, last_logits_only=True)
    return math.exp(nll / count)


def memory_fraction(model, factory, length: int) -> dict:
    """Compression report of one cache after reading `length` tokens."""
    cache = factory()
    with torch.no_grad():
        model(torch.zeros(1, length, dtype=torch.long, device=next(model.parameters()).device), cache=cache)
    return cache.compression_report()


def run(args) -> list[dict]:
    from gpt import GPT

    torch.manual_seed(args.seed)
    model = GPT.from_pretrained(args.model)
    context = model.config.block_size
    text = file_text(args.text, "val") if args.text else builtin_text("val")
    rows = []
    plan = []
    for spec in args.methods:
        name, kwargs = parse_method(spec)
        budgets = [parse_budget(b, context) for b in args.budgets] if METHODS[name].takes_budget else [None]
        for budget in budgets:
            for task in args.tasks:
                plan.append((spec, name, kwargs, budget, task))
    eps = {k: episodes(model, k, args.samples, context, text, args.seed) for k in ("passkey", "lines") if k in args.tasks}
    for spec, name, kwargs, budget, task in tqdm(plan, desc="eval", disable=args.quiet):
        factory = make_factory(model.config, name, budget, **kwargs)
        t0 = time.time()
        row = {"method": spec, "budget": budget, "budget_frac": None if budget is None else budget / context,
               "task": task, "protocol": None, "samples": args.samples}
        if task == "ppl":
            row["value"] = perplexity(model, factory, text, context - 1, max(1, args.samples // 10), args.seed)
            row["metric"] = "perplexity"
        else:
            row["protocol"] = args.protocol
            row["value"] = exact_match(model, eps[task], factory, question_agnostic=args.protocol == "agnostic")
            row["metric"] = "exact_match"
        row.update({f"mem_{k}": v for k, v in memory_fraction(model, factory, context - 1).items()})
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
    return rows


def summary_table(rows) -> str:
    lines = ["| method | budget | task | protocol | value | bits/elem | of fp16 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']} ({100 * r['budget_frac']:.0f}%)"
        lines.append(f"| {r['method']} | {budget} | {r['task']} | {r['protocol'] or '-'} | {r['value']:.3f} | "
                     f"{r['mem_bits_per_element']:.2f} | {r['mem_fraction_of_fp16']:.3f} |")
    return "\n".join(lines)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="compare KV-cache methods on retrieval, perplexity and memory")
    p.add_argument("--model", default="nanokv-tiny", help="checkpoint, HF directory or name [nanokv-tiny]")
    p.add_argument("--methods", default="full,streamingllm,h2o,tova,scissorhands,snapkv,pyramidkv,adakv,knorm,"
                   "rtn,kivi,mikv,quantized,cam,d2o,ems")
    p.add_argument("--budgets", default="5%,10%,25%")
    p.add_argument("--tasks", default="passkey,lines")
    p.add_argument("--protocol", default="agnostic", choices=["agnostic", "aware"])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--text", help="held-out text file (default: the built-in validation split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.methods = split_methods(args.methods)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.budgets = [b for b in args.budgets.split(",") if b]
    for spec in args.methods:
        parse_method(spec)
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown tasks {bad}; valid tasks: {list(TASKS)}")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.text and not os.path.isfile(args.text):
        raise FileNotFoundError(f"text file {args.text!r} does not exist")
    return args


def main(argv=None):
    try:
        args = get_args(argv)
        rows = run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"nanokv.eval: error: {e}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table = summary_table(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
