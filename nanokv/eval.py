"""
Evaluate KV-cache methods on the same work: retrieval, perplexity, attention loss and memory.

    python -m nanokv.eval                                   # quick comparison, tiny model, < 3 min
    python -m nanokv.eval --methods h2o,snapkv,ems --budgets 2%,5%,10% --tasks passkey --samples 50
    python -m nanokv.eval --methods "mikv(bits_lo=3),mikv(balancer=False)" --tasks lines
    python -m nanokv.eval --model hf:Qwen/Qwen2.5-0.5B --context 1024 --tasks passkey,ppl   # any transformers LM

Tasks (every row names its protocol)
  passkey      needle-in-a-haystack exact match at the model's full context, needle at any depth
  lines        line retrieval (MiKV's task) exact match
  needle       passkey over a grid of context lengths x needle depths (a heatmap); the budget is
               the same fraction of every length
  ppl          perplexity of the second half of held-out windows. protocol "stream": the first
               half is read token by token too, so decode-time methods compress as they go (the
               H2O / Scissorhands protocol); "prefill": the first half is prefilled (and
               compressed) at once. Methods that compress only at prefill always use "prefill".
  attn         attention loss over the same windows: the attention mass the full cache would put
               on tokens the method no longer holds, and each layer's relative output error
               (nanokv/probe.py)
  persistence  Scissorhands' persistence ratio per layer, this model against a random one (with
               the share of the prefix that is pivotal and how far attention is from uniform)
Retrieval protocols: "agnostic" [default] prefills the context, lets the method compress it,
then feeds the question as a continuation chunk; "aware" prefills context and question at once.
Every row also carries the memory of the method after reading a full context: bytes held (by
kind), bits per element, fraction of the full cache, and the peak held during the prefill.

Budgets are absolute tokens ("64") or a percentage of the context ("5%"). Windows and sinks are
scaled to small budgets by each method's `scaled(budget)`. Methods without a budget (full, rtn,
kivi, mikv) run once with their defaults. Output folder: config.json, samples.jsonl (one line
per episode or window), summary.json (one row per method x budget x task), summary.md, *.png.
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
from .episodes import greedy_answer, make_episode, words_from
from .probe import AttentionProbe, attention_maps, peak_over_uniform, persistence_ratio, pivotal_fraction

TASKS = ("passkey", "lines", "needle", "ppl", "attn", "persistence")
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------- parsing
def parse_budget(text: str, context: int) -> int:
    """'64' -> 64 tokens; '5%' -> 5% of the context, rounded (at least 1 token). A percentage
    must be in (0, 100]."""
    try:
        number = float(text[:-1]) if text.endswith("%") else int(text)
    except ValueError:
        raise ValueError(f"budget {text!r} is neither a token count nor a percentage like '5%'") from None
    if text.endswith("%"):
        if not 0 < number <= 100:
            raise ValueError(f"budget {text!r}: a percentage must be in (0%, 100%]")
        value = max(1, round(number / 100 * context))
    else:
        value = number
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
            value = value.strip()
            if value in ("inf", "-inf"):  # e.g. ems(tau=inf): merging off
                kwargs[key.strip()] = float(value)
                continue
            try:
                kwargs[key.strip()] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = value  # a bare word, e.g. inner=h2o
    if "budget" in kwargs:
        raise ValueError(f"method spec {spec!r}: the budget comes from --budgets (e.g. --budgets 64,10%), "
                         "not from the spec")
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


def new_cache(model, method):
    """A fresh cache: a KVCache for nanokv's GPT (or its config), an HFCache for a transformers
    model (nanokv.hf.CausalLM)."""
    return model.new_cache(method) if hasattr(model, "new_cache") else KVCache(getattr(model, "config", model), method)


def make_factory(model, name: str, budget: int | None, **kwargs):
    """A function returning a fresh cache for `name` at `budget`; model: nanokv's GPT or its
    config, or a nanokv.hf.CausalLM."""
    cls = METHODS[name]

    def factory():
        return new_cache(model, cls.scaled(budget, **kwargs) if cls.takes_budget else cls(**kwargs))

    try:
        factory()  # fail now, not in the middle of a run, if the parameters do not fit
    except TypeError as e:  # e.g. an unknown keyword: name the method
        raise ValueError(f"method {name!r} with {kwargs}: {e}") from None
    return factory


# ---------------------------------------------------------------------- tasks
def episodes(model, kind: str, n: int, length: int, text: str, seed: int, depth=None, qspace: bool = False):
    tok = model.tokenizer
    rng = random.Random(seed)
    filler, words = tok.encode(text), words_from(text)
    return [make_episode(kind, rng, tok, filler, words, length, depth, qspace=qspace) for _ in range(n)]


def retrieval(model, eps, factory, agnostic: bool) -> list[dict]:
    """One sample per episode: was the greedy answer exactly right?"""
    out = []
    for ep in eps:
        hit = greedy_answer(model, ep, factory(), question_agnostic=agnostic) == ep.answer
        out.append({"correct": int(hit), "depth": ep.depth, "length": ep.length})
    return out


def ppl_protocol(name: str, requested: str) -> str:
    """Methods that compress only at prefill would never compress a stream: prefill them."""
    return "prefill" if METHODS[name].compresses_at == "prefill" else requested


def windows(model, text: str, length: int, n: int, seed: int) -> list[torch.Tensor]:
    """n random windows of length + 1 tokens of `text` (the last one is only a target)."""
    ids = model.tokenizer.encode(text)
    if len(ids) < length + 2:
        raise ValueError(f"the text has {len(ids)} tokens; windows of {length + 1} need more")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - length - 1) for _ in range(n)]
    return [torch.tensor(ids[s:s + length + 1]) for s in starts]


@torch.no_grad()
def read_window(model, cache, seq: torch.Tensor, protocol: str) -> float:
    """Feed seq[:-1] through `cache`; return the summed negative log-likelihood of the second
    half's next tokens. protocol "stream" reads the first half one token at a time, "prefill"
    in one call; the second half is always read one token at a time."""
    seq = seq.to(next(model.parameters()).device)[None]  # (1, length + 1)
    length, half = seq.size(1) - 1, (seq.size(1) - 1) // 2
    if protocol == "stream":
        for t in range(half - 1):
            model(seq[:, t:t + 1], cache=cache, last_logits_only=True)
        logits, _ = model(seq[:, half - 1:half], cache=cache, last_logits_only=True)
    else:
        logits, _ = model(seq[:, :half], cache=cache, last_logits_only=True)
    nll = 0.0
    for t in range(half, length + 1):
        nll -= float(torch.log_softmax(logits[0, -1].float(), -1)[seq[0, t]])
        if t < length:
            logits, _ = model(seq[:, t:t + 1], cache=cache, last_logits_only=True)
    return nll


def perplexity(model, factory, text: str, length: int, n: int, seed: int, protocol: str = "prefill") -> float:
    """Perplexity of the second halves of n windows of `length` tokens (see read_window)."""
    wins = windows(model, text, length, n, seed)
    nll = sum(read_window(model, factory(), w, protocol) for w in wins)
    return math.exp(nll / (len(wins) * (length + 1 - length // 2)))


def attention_loss(model, factory, wins, protocol: str) -> dict:
    """Mean lost attention mass and per-layer relative output error over the windows."""
    reports = []
    for w in wins:
        probe = AttentionProbe(factory())
        read_window(model, probe, w, protocol)
        reports.append(probe.report())
    n = len(reports)
    out = {}
    for key, first in reports[0].items():
        if isinstance(first, list):  # per layer: average each layer over the windows
            out[key] = [sum(layer) / n for layer in zip(*(r[key] for r in reports))]
        else:
            out[key] = sum(r[key] for r in reports) / n
    return out


@torch.no_grad()
def memory(model, factory, seq: torch.Tensor) -> dict:
    """The cache after prefilling `seq` (a held-out window): its compression report, the peak
    bytes it held during the prefill (new tokens stored, not yet compressed) as a fraction of
    the full cache's bytes, and the largest fp32 score matrix the reference attention built."""
    dev = next(model.parameters()).device
    caches = {"method": factory(), "full": new_cache(model, "full")}
    for c in caches.values():
        getattr(c, "kv", c).track_peak = True  # an HFCache's nanokv cache is its .kv
        model(seq[None, :-1].to(dev), cache=c, last_logits_only=True)
    cache, full = (getattr(c, "kv", c) for c in (caches["method"], caches["full"]))
    return {**cache.compression_report(), "peak_bytes": cache.peak_bytes,
            "peak_fraction": cache.peak_bytes / full.memory_bytes(), "scores_bytes": cache.peak_scores_bytes}


@torch.no_grad()
def persistence(model, wins, min_share: float = 0.5, details: bool = False):
    """Per-layer persistence ratio, averaged over the windows where it is defined (None for a layer
    where it never is); with details=True a dict of per-layer lists: ratio, windows (how many
    windows the ratio averages), pivotal (pivotal_fraction) and peak (peak_over_uniform)."""
    per = {"ratio": [], "pivotal": [], "peak": []}  # per window: one value per layer
    for w in wins:  # one window's maps at a time
        maps = attention_maps(model, w[:-1])
        per["ratio"].append([persistence_ratio(p, min_share) for p in maps])
        if details:
            per["pivotal"].append([pivotal_fraction(p, min_share) for p in maps])
            per["peak"].append([peak_over_uniform(p) for p in maps])
    mean = {k: [sum(x) / len(x) for x in zip(*v)] for k, v in per.items() if k != "ratio"}
    defined = [[r for r in layer if not math.isnan(r)] for layer in zip(*per["ratio"])]  # per layer
    mean["ratio"] = [sum(d) / len(d) if d else None for d in defined]
    mean["windows"] = [len(d) for d in defined]
    return mean if details else mean["ratio"]


# ---------------------------------------------------------------------- the run
def plan_of(args, context):
    plan = []
    for spec in args.methods:
        name, kwargs = parse_method(spec)
        budgets = [parse_budget(b, context) for b in args.budgets] if METHODS[name].takes_budget else [None]
        for budget in budgets:
            plan.append((spec, name, kwargs, budget))
    return plan


def run(args) -> tuple[list[dict], list[dict]]:
    """Returns (summary rows, per-sample rows)."""
    from gpt import GPT

    torch.manual_seed(args.seed)
    if args.model.startswith("hf:"):  # a transformers model with its own tokenizer (nanokv.hf)
        from .hf import load

        model = load(args.model[3:], context=getattr(args, "context", None))
        if set(args.tasks) & {"attn", "persistence"}:
            raise ValueError("tasks attn and persistence read nanokv's GPT (its attention maps); with --model hf:... "
                             "use passkey, lines, needle, ppl")
    else:
        model = GPT.from_pretrained(args.model)
        block = model.config.block_size
        if getattr(args, "context", None) is not None and not 16 <= args.context <= block:
            raise ValueError(f"--context must be in [16, {block}] for this model (its block size), got {args.context}")
    if getattr(args, "gpt2_dir", None):
        model.tokenizer_dir = args.gpt2_dir  # GPT-2's tokenizer files, offline
    model.eval()
    context = getattr(args, "context", None) or model.config.block_size  # hf: already the model's block size
    plan = plan_of(args, context)  # budgets checked against the context before any work
    # every method built once before any work (a typo fails first, with the method named)
    factories = [make_factory(model, name, budget, **kwargs) for _, name, kwargs, budget in plan]
    text = file_text(args.text, "val") if args.text else builtin_text("val")
    length = context - 1
    wins = windows(model, text, length, args.windows, args.seed)
    eps = {k: episodes(model, k, args.samples, context, text, args.seed, qspace=args.qspace)
           for k in ("passkey", "lines") if k in args.tasks}
    needle_lengths = sorted({min(context, max(96, context // 4)), min(context, max(96, context // 2)), context})
    cells = [(n, d) for n in needle_lengths for d in NEEDLE_DEPTHS]
    per_cell = max(1, args.samples // 5)
    if "needle" in args.tasks:
        eps["needle"] = {cell: episodes(model, "passkey", per_cell, cell[0], text, args.seed + i, cell[1], args.qspace)
                         for i, cell in enumerate(cells)}
    rows, samples = [], []
    if "persistence" in args.tasks:
        torch.manual_seed(args.seed)
        random_model = GPT(model.config).eval()
        got, rnd = persistence(model, wins, details=True), persistence(random_model, wins, details=True)
        trained, rand = ([x for x in r["ratio"] if x is not None] for r in (got, rnd))  # layers with a ratio
        if not trained or not rand:
            raise ValueError(f"persistence: no layer has a pivotal token in any of the {len(wins)} windows "
                             f"(trained {len(trained)} layers, random {len(rand)}); pass more --windows")
        rows.append({"method": "-", "budget": None, "budget_frac": None, "task": "persistence", "protocol": "full",
                     "metric": "persistence_ratio", "value": sum(trained) / len(trained), "samples": len(wins),
                     "per_layer": got["ratio"], "random_per_layer": rnd["ratio"], "random_value": sum(rand) / len(rand),
                     "windows_per_layer": got["windows"], "random_windows_per_layer": rnd["windows"],
                     "pivotal_per_layer": got["pivotal"], "random_pivotal_per_layer": rnd["pivotal"],
                     "peak_per_layer": got["peak"], "random_peak_per_layer": rnd["peak"]})
    tasks = [t for t in args.tasks if t != "persistence"]
    for (spec, name, kwargs, budget), factory in tqdm(list(zip(plan, factories)), desc="eval", disable=args.quiet):
        mem = {f"mem_{k}": v for k, v in memory(model, factory, wins[0]).items()}
        for task in tasks:
            t0 = time.time()
            row = {"method": spec, "budget": budget, "budget_frac": None if budget is None else budget / context,
                   "task": task}
            if task in ("passkey", "lines"):
                got = retrieval(model, eps[task], factory, args.protocol == "agnostic")
                row.update(protocol=args.protocol, metric="exact_match")
            elif task == "needle":
                got, grid = [], []
                for (n, d) in cells:
                    cell_budget = None if budget is None else max(1, round(budget / context * n))
                    cell_factory = make_factory(model, name, cell_budget, **kwargs)
                    hits = retrieval(model, eps["needle"][(n, d)], cell_factory, args.protocol == "agnostic")
                    got += hits
                    grid.append(sum(h["correct"] for h in hits) / len(hits))
                row.update(protocol=args.protocol, metric="exact_match", lengths=needle_lengths,
                           depths=list(NEEDLE_DEPTHS), grid=grid)
            elif task == "ppl":
                proto = ppl_protocol(name, args.ppl_protocol)
                got = [{"nll": read_window(model, factory(), w, proto), "tokens": length + 1 - length // 2}
                       for w in wins]
                row.update(protocol=proto, metric="perplexity")
            else:  # attn
                proto = ppl_protocol(name, args.ppl_protocol)
                loss = attention_loss(model, factory, wins, proto)
                got = [{"lost_mass": loss["lost_mass"]}]
                row.update(protocol=proto, metric="lost_attention_mass", **{k: v for k, v in loss.items()
                                                                              if k != "lost_mass"})
            if task == "ppl":
                value = math.exp(sum(g["nll"] for g in got) / sum(g["tokens"] for g in got))
            elif task == "attn":
                value = got[0]["lost_mass"]
            else:
                value = sum(g["correct"] for g in got) / len(got)
            row.update(value=value, samples=len(got), **mem, seconds=round(time.time() - t0, 2))
            rows.append(row)
            samples += [{"method": spec, "budget": budget, "task": task, "i": i, **g} for i, g in enumerate(got)]
    return rows, samples


def summary_table(rows) -> str:
    lines = ["| method | budget | task | protocol | value | bits/elem | of full | peak prefill |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["task"] == "persistence":
            lines.append(f"| (model) | - | persistence | - | {r['value']:.3f} (random init {r['random_value']:.3f}) "
                         "| - | - | - |")
            continue
        budget = "-" if r["budget"] is None else f"{r['budget']} ({100 * r['budget_frac']:.0f}%)"
        lines.append(f"| {r['method']} | {budget} | {r['task']} | {r['protocol'] or '-'} | {r['value']:.3f} | "
                     f"{r['mem_bits_per_element']:.2f} | {r['mem_fraction_of_full']:.3f} | "
                     f"{r['mem_peak_fraction']:.2f} |")
    return "\n".join(lines)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="compare KV-cache methods on retrieval, perplexity, attention and memory",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="nanokv-tiny", help="checkpoint, GPT-2 directory or name; hf:NAME_OR_DIR for "
                   "any transformers Llama, Qwen, Mistral or GPT-2 with its own tokenizer (nanokv.hf)")
    p.add_argument("--context", type=int, help="context length of the episodes and windows (default: the model's "
                   "block size; with --model hf:... at most 2048)")
    p.add_argument("--methods", default="full,streamingllm,h2o,tova,scissorhands,snapkv,pyramidkv,adakv,knorm,"
                   "rtn,kivi,mikv,quantized,cam,d2o,ems", help="comma-separated method specs, e.g. mikv(bits_lo=3)")
    p.add_argument("--budgets", default="10%,25%,50%", help="tokens or %% of the context, comma-separated")
    p.add_argument("--tasks", default="passkey,lines", help=f"comma-separated from {list(TASKS)}")
    p.add_argument("--protocol", default="agnostic", choices=["agnostic", "aware"], help="retrieval protocol")
    p.add_argument("--ppl-protocol", default="stream", choices=["stream", "prefill"],
                   help="how ppl/attn read the first half of a window")
    p.add_argument("--samples", type=int, default=10, help="episodes per retrieval task (needle: per 5 cells)")
    p.add_argument("--windows", type=int, default=2, help="held-out windows for ppl, attn and persistence")
    p.add_argument("--text", help="held-out text file: episode filler and ppl windows (default: the built-in "
                                  "validation split)")
    p.add_argument("--gpt2-dir", help="offline GPT-2 tokenizer files for a GPT-2 model (else $NANOKV_GPT2_DIR)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes and windows")
    p.add_argument("--qspace", action="store_true", help="questions end with the space before the value "
                   "(the answer is the bare value; nanokv.episodes)")
    p.add_argument("--out", default="runs/eval", help="output folder (its earlier summary files are replaced)")
    p.add_argument("--no-plots", action="store_true", help="write no .png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.methods = split_methods(args.methods)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.budgets = [b for b in args.budgets.split(",") if b]
    for spec in args.methods:
        parse_method(spec)
    bad = [t for t in args.tasks if t not in TASKS]
    if bad or not args.tasks:
        raise ValueError(f"unknown tasks {bad}; valid tasks: {list(TASKS)}")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.windows < 1:
        raise ValueError(f"--windows must be >= 1, got {args.windows}")
    if args.text and not os.path.isfile(args.text):
        raise FileNotFoundError(f"text file {args.text!r} does not exist")
    return args


def write(out: str, args, rows, samples, plots: bool = True) -> list[str]:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    with open(os.path.join(out, "samples.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_table(rows) + "\n")
    if not plots:
        return []
    from .plots import plot_all

    return plot_all(rows, out)


OUTPUTS = ("config.json", "samples.jsonl", "summary.json", "summary.md")


def clear_outputs(out: str):
    """Remove what an earlier run wrote to `out`, so that a failed run leaves no stale summary."""
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        if name in OUTPUTS or name.endswith(".png"):
            os.remove(os.path.join(out, name))


def main(argv=None):
    try:
        args = get_args(argv)
        clear_outputs(args.out)
        rows, samples = run(args)
    except (ValueError, OSError) as e:  # bad arguments; a model or tokenizer not reachable offline
        sys.exit(f"nanokv.eval: error: {e}")
    pngs = write(args.out, args, rows, samples, plots=not args.no_plots)
    print(summary_table(rows))
    print(f"wrote {args.out}/: config.json, samples.jsonl, summary.json, summary.md" +
          (", " + ", ".join(os.path.basename(p) for p in pngs) if pngs else ""))
    return rows


if __name__ == "__main__":
    main()
