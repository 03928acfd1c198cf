"""
Regenerate RESULTS.md: the papers' claims, in miniature, on the committed tiny checkpoint.

    python -m nanokv.results              # about 15 minutes on 2 CPU cores
    python -m nanokv.results --quick      # smaller samples (minutes), for a look or a test

Each experiment is one nanokv.eval run (its folder under results/ holds summary.json,
samples.jsonl and the plots); RESULTS.md holds the tables, the plots and, for every claim,
what the numbers say, computed from them (not written by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from . import eval as nkeval

ALL = "full,streamingllm,h2o,tova,scissorhands,snapkv,pyramidkv,adakv,knorm,rtn,kivi,mikv,quantized,cam,d2o,ems"
BUDGETED = "streamingllm,h2o,tova,scissorhands,snapkv,pyramidkv,adakv,knorm,cam,d2o,ems"
IMPORTANCE = ("h2o", "tova", "scissorhands", "snapkv", "ems")  # issue 17's "importance beats recency" set
# foreign filler for the miniature's acceptance (not the training corpus): --foreign, else this file if present
SHAKESPEARE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "shared", "data", "tinyshakespeare.txt")

# name -> (nanokv.eval arguments, samples, windows); --quick divides samples and windows
EXPERIMENTS = {
    # retrieval only: perplexity has its own runs below (ppl20, scissorhands, ems); a streamed window per
    # method x budget costs minutes on 2 cores
    "overview": (["--methods", ALL, "--budgets", "10%,25%,50%", "--tasks", "passkey,lines"], 30, 1),
    # the miniature's acceptance (issue 17): 200 episodes per cell, seeds never used to choose the model
    "agnostic200": (["--methods", "full,streamingllm," + ",".join(IMPORTANCE), "--budgets", "25%,50%",
                     "--tasks", "passkey,lines"], 200, 1),
    # target 1 on ten times the episodes (the 200 of aware200 and 1800 more): a figure from 200 episodes
    # is uncertain by about 2 points near 0.90, from 2000 by about 0.7
    "full2000": (["--methods", "full", "--tasks", "passkey,lines", "--protocol", "aware"], 2000, 1),
    "aware200": (["--methods", "full,streamingllm,snapkv", "--budgets", "10%,25%", "--tasks", "passkey,lines",
                  "--protocol", "aware"], 200, 1),
    "ppl20": (["--methods", "full," + BUDGETED, "--budgets", "20%", "--tasks", "ppl"], 1, 4),
    "foreign_aware": (["--methods", "full,snapkv", "--budgets", "25%", "--tasks", "passkey,lines",
                       "--protocol", "aware", "--text", "FOREIGN"], 200, 1),
    "foreign_agnostic": (["--methods", "streamingllm,h2o", "--budgets", "50%", "--tasks", "passkey,lines",
                          "--text", "FOREIGN"], 200, 1),
    "scissorhands": (["--methods", "full,scissorhands,quantized(inner=scissorhands,bits=4)",
                      "--budgets", "10%,20%,30%,50%,75%", "--tasks", "ppl"], 1, 4),
    "persistence": (["--methods", "full", "--tasks", "persistence"], 1, 4),
    "mikv": (["--methods", "full,h2o,mikv(bits_lo=2,balancer=False),mikv(bits_lo=2),mikv(bits_lo=3)",
              "--budgets", "20%", "--tasks", "lines"], 200, 1),
    "ems": (["--methods", "ems,ems(tau=inf),h2o,snapkv,streamingllm", "--budgets", "2%,5%,10%",
             "--tasks", "passkey,ppl"], 100, 2),
    "needle": (["--methods", "full,streamingllm,snapkv", "--budgets", "10%,25%", "--tasks", "needle",
                "--protocol", "aware"], 20, 1),
}


def run_experiments(out: str, quick: bool, seed: int, foreign: str | None = None,
                    model: str = "nanokv-tiny") -> dict[str, list[dict]]:
    results = {}
    for name, (argv, samples, wins) in EXPERIMENTS.items():
        if "FOREIGN" in argv:
            if not foreign:
                print(f"{name}: skipped (no foreign text: pass --foreign FILE)", flush=True)
                continue
            argv = [foreign if a == "FOREIGN" else a for a in argv]
        if quick:
            samples, wins = max(1, samples // 10), 1
        t0 = time.time()
        args = nkeval.get_args(argv + ["--model", model, "--samples", str(samples), "--windows", str(wins), "--seed", str(seed),
                                       "--out", os.path.join(out, name), "--quiet"])
        rows, samples_rows = nkeval.run(args)
        nkeval.write(args.out, args, rows, samples_rows)
        results[name] = rows
        print(f"{name}: {len(rows)} rows in {time.time() - t0:.0f} s", flush=True)
    return results


def pick(rows, method, task, budget_frac=None):
    for r in rows:
        if r["method"] == method and r["task"] == task and (
                budget_frac is None or r["budget_frac"] is not None and abs(r["budget_frac"] - budget_frac) < 0.01):
            return r["value"]
    raise KeyError((method, task, budget_frac))


def verdict(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold here**"


def ratio_text(x) -> str:
    """A per-layer persistence ratio; None where no window of the layer had one."""
    return "n/a" if x is None else f"{x:.2f}"


def uniform_noise(p) -> str:
    """What the persistence ratios mean, from the persistence row's pivotal shares and peaks (if recorded)."""
    if "random_peak_per_layer" not in p:
        return ""
    rp, tp = p["random_peak_per_layer"], p["peak_per_layer"]
    rs, ts = p["random_pivotal_per_layer"], p["pivotal_per_layer"]

    low = min(range(len(ts)), key=lambda i: ts[i])  # the layer with the smallest pivotal set
    counted = p.get("windows_per_layer")
    left_out = ""
    if counted and counted[low] < p["samples"]:
        left_out = (f"; in {p['samples'] - counted[low]} of the {p['samples']} windows no head of that layer has a "
                    f"pivotal token, so the ratio is undefined there and that layer's {ratio_text(p['per_layer'][low])} "
                    f"averages the other {counted[low]}")

    def span(xs, fmt):
        return f"{min(xs):{fmt}}-{max(xs):{fmt}}"

    return (f" What the two ratios measure differs. The trained model's pivotal set (S2, nanokv/probe.py) is "
            f"{span([100 * x for x in ts], '.1f')}% of the prefix, as the paper finds (much smaller than the "
            f"prefix; layer {low} (from 0) holds {100 * ts[low]:.1f}%{left_out}); the random "
            f"model's is {span([100 * x for x in rs], '.0f')}%: its attention is nearly uniform (a query's largest "
            f"share is on average {span(rp, '.2f')} times the uniform share 1/(t+1), t counted from 0; the trained "
            f"model's {span(tp, '.0f')} times), so \"above the average\" puts about half of its prefix in the pivotal "
            f"set, and mostly the same half for both halves of the queries. The ratio counts that consistency as "
            f"persistence, so it is high for both models; the verdict keeps the statistic as chosen before "
            f"measuring (min_share 0.5).")


def claims(res) -> list[str]:
    """One paragraph per seed-paper claim, its verdict computed from the numbers."""
    out = []
    s = res["scissorhands"]
    full = pick(s, "full", "ppl")
    sc = {f: pick(s, "scissorhands", "ppl", f) for f in (0.1, 0.2, 0.3, 0.5, 0.75)}
    q = {f: pick(s, "quantized(inner=scissorhands,bits=4)", "ppl", f) for f in (0.1, 0.2, 0.3, 0.5, 0.75)}
    close = sc[0.5] <= 1.05 * full
    degrades = sc[0.2] > sc[0.5]
    int4 = all(q[f] <= 1.05 * sc[f] for f in q)
    out.append(
        f"**Scissorhands** (perplexity close to the full cache down to about 50% budget, degrading near 20%; "
        f"INT4 on top costs little). Streaming perplexity: full {full:.3f}; Scissorhands at 75/50/30/20/10%: "
        + "/".join(f"{sc[f]:.3f}" for f in (0.75, 0.5, 0.3, 0.2, 0.1))
        + "; with INT4: " + "/".join(f"{q[f]:.3f}" for f in (0.75, 0.5, 0.3, 0.2, 0.1))
        + f". Within 5% of full at 50%: {verdict(close)}; worse at 20% than at 50%: {verdict(degrades)}; "
        f"INT4 within 5% of the same budget without it: {verdict(int4)}.")
    p = res["persistence"][0]
    out.append(
        f"**Persistence of importance** (high in a trained model, absent at random init): per-layer ratio "
        f"trained {', '.join(map(ratio_text, p['per_layer']))} against random init "
        f"{', '.join(map(ratio_text, p['random_per_layer']))}; trained above random on average: "
        f"{verdict(p['value'] > p['random_value'])}." + uniform_noise(p))
    m = res["mikv"]
    v = {k: pick(m, k, "lines", f) for k, f in [("full", None), ("h2o", 0.2), ("mikv(bits_lo=2,balancer=False)", None),
                                                ("mikv(bits_lo=2)", None), ("mikv(bits_lo=3)", None)]}
    order = v["h2o"] < v["mikv(bits_lo=2,balancer=False)"] < v["mikv(bits_lo=2)"] <= v["mikv(bits_lo=3)"]
    out.append(
        f"**MiKV** (at 20% importance ratio: H2O far below INT2, INT2 + balancer above INT2 without, INT3 close "
        f"to full). Line retrieval: full {v['full']:.2f}, H2O {v['h2o']:.2f}, MiKV INT2 without balancer "
        f"{v['mikv(bits_lo=2,balancer=False)']:.2f}, INT2 {v['mikv(bits_lo=2)']:.2f}, INT3 {v['mikv(bits_lo=3)']:.2f}. "
        f"Order H2O < INT2 no balancer < INT2 <= INT3: {verdict(order)}; INT3 within 0.1 of full: "
        f"{verdict(v['mikv(bits_lo=3)'] >= v['full'] - 0.1)}.")
    e = res["ems"]
    fr = (0.02, 0.05, 0.1)
    ems = {f: pick(e, "ems", "passkey", f) for f in fr}
    evict = {f: pick(e, "ems(tau=inf)", "passkey", f) for f in fr}
    h2o = {f: pick(e, "h2o", "passkey", f) for f in fr}
    snap = {f: pick(e, "snapkv", "passkey", f) for f in fr}
    ppl = {k: {f: pick(e, k, "ppl", f) for f in fr} for k in ("ems", "ems(tau=inf)", "h2o", "snapkv", "streamingllm")}
    gl = all(ppl["ems"][f] <= ppl["h2o"][f] * 1.01 for f in fr)
    merge = all(ppl["ems"][f] <= ppl["ems(tau=inf)"][f] * 1.01 for f in fr)
    out.append(
        "**EMS** (Global-Local score at least matches global-only (H2O-like) and local-only (SnapKV-like) "
        "scoring at small budgets; evict-then-merge at least matches evict-only; passkey retrieval at a budget "
        "of 5% or less). Perplexity at 2/5/10%: " + "; ".join(
            f"{k} " + "/".join(f"{ppl[k][f]:.2f}" for f in fr) for k in ppl)
        + ". Passkey at 2/5/10%: EMS " + "/".join(f"{ems[f]:.2f}" for f in fr)
        + ", evict-only " + "/".join(f"{evict[f]:.2f}" for f in fr)
        + ", H2O " + "/".join(f"{h2o[f]:.2f}" for f in fr) + ", SnapKV " + "/".join(f"{snap[f]:.2f}" for f in fr)
        + f". GL perplexity within 1% of global-only (H2O, same streaming protocol) or better: {verdict(gl)}; "
        f"merging within 1% of evict-only or better: {verdict(merge)}; passkey at <= 5%: "
        f"{verdict(max(ems[0.02], ems[0.05]) >= 0.5)}. SnapKV's perplexity is not at the same memory: it compresses "
        "only the prefilled half, then keeps every token it reads (its cache grows by 256 tokens), so it is "
        "listed, not compared.")
    n = res["needle"]
    deep = {}
    for r in n:
        if r["method"] in ("streamingllm", "snapkv"):
            D = r["depths"]
            shallow_rows = [r["grid"][i * len(D) + j] for i in range(len(r["lengths"])) for j in range(len(D))
                            if D[j] <= 0.25]
            deep[(r["method"], round(r["budget_frac"], 2))] = sum(shallow_rows) / len(shallow_rows)
    ok = all(deep[("snapkv", b)] > deep[("streamingllm", b)] for b in (0.1, 0.25))
    succeeds = deep[("snapkv", 0.25)] >= 0.5
    out.append(
        "**StreamingLLM against SnapKV** (StreamingLLM fails a deep needle at small budgets; SnapKV, which sees "
        "the question, succeeds). Question-aware needle test, accuracy for needles in the first quarter of the "
        "context (the deepest, farthest from the question) at 10/25% budget: StreamingLLM "
        f"{deep[('streamingllm', 0.1)]:.2f}/{deep[('streamingllm', 0.25)]:.2f}, SnapKV "
        f"{deep[('snapkv', 0.1)]:.2f}/{deep[('snapkv', 0.25)]:.2f}. SnapKV above StreamingLLM: {verdict(ok)}; "
        f"SnapKV retrieves most deep needles (>= 50% at 25%): {verdict(succeeds)}.")
    return out


def acceptance(res) -> list[str]:
    """Issue 17's acceptance figures for the miniature, each with its target and verdict."""
    a, w = res["agnostic200"], res["aware200"]
    out = []
    def full_of(rows):  # the full cache's accuracies, and whether they meet target 1
        f = {t: pick(rows, "full", t) for t in ("passkey", "lines")}
        return f, f["passkey"] >= 0.97 and f["lines"] >= 0.90

    full, ok = full_of(w)
    m = next(r["samples"] for r in w if r["method"] == "full")  # 200 (20 in a --quick run)
    more = ""
    if "full2000" in res:  # the larger sample must meet the targets too (both samples decide)
        big, big_ok = full_of(res["full2000"])
        ok &= big_ok
        n = res["full2000"][0]["samples"]
        more = (f"; on {n} episodes each (those {m} and {n - m} more, `results/full2000`): passkey "
                f"{big['passkey']:.4f}, lines {big['lines']:.4f}; both samples must meet the targets")
    out.append(f"1. Full cache ({m} episodes each, question-aware): passkey {full['passkey']:.3f} (target >= 0.97), lines "
               f"{full['lines']:.3f} (target >= 0.90){more}: {verdict(ok)}.")
    snap = pick(w, "snapkv", "passkey", 0.25)
    out.append(f"2. SnapKV, question-aware, 25% of the context: passkey {snap:.3f} (target >= 0.90; StreamingLLM "
               f"{pick(w, 'streamingllm', 'passkey', 0.25):.3f}; at 10%: SnapKV {pick(w, 'snapkv', 'passkey', 0.1):.3f}): "
               f"{verdict(snap >= 0.90)}.")
    for frac, gap in ((0.5, 0.25), (0.25, 0.15)):
        parts, ok = [], True
        for t in ("passkey", "lines"):
            best = max(IMPORTANCE, key=lambda m: pick(a, m, t, frac))
            b, r = pick(a, best, t, frac), pick(a, "streamingllm", t, frac)
            ok &= b >= r + gap
            parts.append(f"{t}: best {best} {b:.3f} against StreamingLLM {r:.3f} ({100 * (b - r):+.1f} points)")
        out.append(f"3. Importance beats recency, question-agnostic, {frac:.0%} (target +{100 * gap:.0f} points): "
                   + "; ".join(parts) + f": {verdict(ok)}.")
    s = res["scissorhands"]
    full_ppl, sc50 = pick(s, "full", "ppl"), pick(s, "scissorhands", "ppl", 0.5)
    p20 = [r for r in res["ppl20"] if r["method"] != "full"]
    best = min(p20, key=lambda r: r["value"])
    ref20 = pick(res["ppl20"], "full", "ppl")
    out.append(f"4. Streaming perplexity: Scissorhands at 50% {sc50:.3f} against full {full_ppl:.3f} "
               f"({100 * (sc50 / full_ppl - 1):+.1f}%, target within 5%): {verdict(sc50 <= 1.05 * full_ppl)}; best at 20%: "
               f"{best['method']} {best['value']:.3f} against full {ref20:.3f} ({100 * (best['value'] / ref20 - 1):+.1f}%, "
               f"target within 10%): {verdict(best['value'] <= 1.10 * ref20)}.")
    p = res["persistence"][0]
    out.append(f"5. Persistence ratio, trained {p['value']:.3f} against random init {p['random_value']:.3f} "
               f"({p['value'] - p['random_value']:+.3f}, target +0.15, i.e. trained >= {p['random_value'] + 0.15:.3f}; a ratio is "
               f"at most 1): {verdict(p['value'] - p['random_value'] >= 0.15)}"
               + (f" (random init's attention is nearly uniform, so about half of its prefix counts as pivotal: "
                  f"{100 * min(p['random_pivotal_per_layer']):.0f}-{100 * max(p['random_pivotal_per_layer']):.0f}% "
                  f"against the trained model's {100 * min(p['pivotal_per_layer']):.1f}-"
                  f"{100 * max(p['pivotal_per_layer']):.1f}%; see the claim above)." if "random_peak_per_layer" in p else "."))
    m = res["mikv"]
    v = [pick(m, k, "lines", f) for k, f in [("h2o", 0.2), ("mikv(bits_lo=2,balancer=False)", None),
                                            ("mikv(bits_lo=2)", None), ("mikv(bits_lo=3)", None), ("full", None)]]
    out.append("6. MiKV's ordering, line retrieval: H2O {:.3f} < INT2 without balancer {:.3f} < INT2 {:.3f} < INT3 {:.3f} "
               "~ full {:.3f}: {}.".format(*v, verdict(v[0] < v[1] < v[2] <= v[3] and v[3] >= v[4] - 0.1)))
    if "foreign_aware" in res:
        fa, fg = res["foreign_aware"], res["foreign_agnostic"]
        pairs = [("full", None, "passkey", fa, w), ("full", None, "lines", fa, w),
                 ("snapkv", 0.25, "passkey", fa, w), ("snapkv", 0.25, "lines", fa, w),
                 ("h2o", 0.5, "passkey", fg, a), ("h2o", 0.5, "lines", fg, a),
                 ("streamingllm", 0.5, "passkey", fg, a), ("streamingllm", 0.5, "lines", fg, a)]
        diffs = [(m, f, t, pick(fr, m, t, f), pick(br, m, t, f)) for m, f, t, fr, br in pairs]
        ok = all(abs(x - y) <= 0.05 for *_, x, y in diffs)
        out.append("7. Foreign filler (Shakespeare, not the training corpus) against the built-in filler: " + "; ".join(
            f"{m}{'' if f is None else f' {f:.0%}'} {t} {x:.3f} / {y:.3f}" for m, f, t, x, y in diffs)
            + f"; all within 5 points: {verdict(ok)}.")
    else:
        out.append("7. Foreign filler: not run (no --foreign text).")
    return out


MODELS = {"nanokv-tiny": "the committed tiny checkpoint (`nanokv/assets/tiny.pt`: bytes plus digit pairs, "
                          "4 layers, 4 heads, context 512)",
          "nanokv-tiny-byte": "the byte-level tiny checkpoint (`nanokv/assets/tiny-byte.pt`, `nanokv-tiny-byte`: "
                               "4 layers, 4 heads, context 512), which the committed `nanokv-tiny` was widened from"}


def write_results(path: str, out: str, res, seconds: float, quick: bool, model: str = "nanokv-tiny", seed: int = 1):
    rel = os.path.relpath(out, os.path.dirname(os.path.abspath(path)) or ".")
    lines = [
        "# Results: the seed papers' claims in miniature",
        "",
        f"Generated by `python -m nanokv.results` (do not edit by hand) on {MODELS.get(model, '`' + model + '`')}, "
        "with the built-in held-out text. "
        f"{'QUICK RUN (small samples). ' if quick else ''}"
        f"Took {seconds / 60:.0f} min on {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}. Budgets are % of the 512-token context; memory is what the cache "
        "holds over what the full (fp32) cache holds for the same tokens. Retrieval uses the question-agnostic "
        "protocol unless stated; perplexity streams the first half of each window token by token (methods that "
        "compress only at prefill prefill it). A tiny model is not a 7B one: where the miniature disagrees with "
        "a paper it says so.",
        "",
        "## Claims",
        "",
    ]
    lines += [f"- {c}" for c in claims(res)]
    n_cell = {name: rows[0].get("samples") for name, rows in res.items() if rows}  # a --quick page has fewer
    lines += ["", "## The miniature's acceptance (issue 17)", ""]
    if "agnostic200" in res:
        chosen = "; the committed checkpoint was chosen on seeds 0, 7 and 100-104" if model == "nanokv-tiny" else ""
        lines += [f"Greedy exact match on {n_cell['agnostic200']} held-out episodes per cell"
                  + (f", {n_cell['full2000']} in `full2000`" if n_cell.get("full2000") else "") + f" (seed {seed}{chosen}); "
                  "one standard error is about 2 points near 0.9 and 3.5 points near 0.5 at 200 episodes, 0.7 points "
                  "near 0.9 at 2000. Tables: `results/full2000`, `results/agnostic200`, `results/aware200`, "
                  "`results/ppl20`, `results/foreign_*`.", ""]
        lines += acceptance(res)
    else:
        lines += ["Not in this page: its runs predate the experiments that measure it (`python -m nanokv.results` "
                  "runs them; the closing notes of issue 17 give the figures measured so far)."]
    ov = res["overview"]
    fracs = sorted({round(100 * r["budget_frac"]) for r in ov if r["budget_frac"] is not None})
    tasks = [t for t in ("passkey", "lines", "ppl", "attn") if any(r["task"] == t for r in ov)]
    pngs = ["retrieval"] + [t for t in ("ppl", "attn") if t in tasks] + (["attn_error"] if "attn" in tasks else [])
    lines += ["", f"## Overview: every method at {', '.join(f'{f}%' for f in fracs)} ({', '.join(tasks)})", "",
              " ".join(f"![{p}]({rel}/overview/{p}.png)" for p in pngs), "",
              nkeval.summary_table(ov), ""]
    for name, title, pngs in [("scissorhands", "Scissorhands and INT4: streaming perplexity", ["ppl"]),
                              ("persistence", "Persistence of importance per layer", ["persistence"]),
                              ("mikv", "MiKV: line retrieval at 20% importance ratio", ["lines"]),
                              ("ems", "EMS: Global-Local score and evict-then-merge at small budgets",
                               ["passkey", "ppl"]),
                              ("needle", "Needle in a haystack, question-aware: StreamingLLM against SnapKV",
                               ["needle"])]:
        lines += [f"## {title}", "", " ".join(f"![{p}]({rel}/{name}/{p}.png)" for p in pngs), "",
                  nkeval.summary_table(res[name]), ""]
    for name, title in [("full2000", f"The full cache, {n_cell.get('full2000')} episodes"),
                        ("agnostic200", f"Importance against recency, question-agnostic, {n_cell.get('agnostic200')} episodes"),
                        ("aware200", f"SnapKV question-aware, {n_cell.get('aware200')} episodes"),
                        ("ppl20", "Streaming perplexity at 20%"),
                        ("foreign_aware", "Foreign filler, question-aware"),
                        ("foreign_agnostic", "Foreign filler, question-agnostic")]:
        if name in res:
            lines += [f"## {title}", "", nkeval.summary_table(res[name]), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description="regenerate RESULTS.md and its plots", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="results", help="folder for the runs and plots")
    p.add_argument("--md", default="RESULTS.md", help="the page to write")
    p.add_argument("--quick", action="store_true", help="small samples: minutes, not a result")
    p.add_argument("--seed", type=int, default=1, help="seed of the episodes and windows")
    p.add_argument("--foreign", default=SHAKESPEARE if os.path.isfile(SHAKESPEARE) else None,
                   help="plain-text file used as foreign episode filler (acceptance 7); default: "
                        "../shared/data/tinyshakespeare.txt when present, else that experiment is skipped")
    p.add_argument("--model", default="nanokv-tiny", help="the model the runs use (and the page names)")
    p.add_argument("--from-saved", type=float, metavar="MINUTES",
                   help="rewrite RESULTS.md from the summaries already in --out (MINUTES: the recorded run time)")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.from_saved is not None:
        from .plots import plot_all

        res = {name: json.load(open(os.path.join(args.out, name, "summary.json"))) for name in EXPERIMENTS
               if os.path.isfile(os.path.join(args.out, name, "summary.json"))}
        for name, rows in res.items():
            plot_all(rows, os.path.join(args.out, name))
        write_results(args.md, args.out, res, 60 * args.from_saved, args.quick, args.model, args.seed)
    else:
        res = run_experiments(args.out, args.quick, args.seed, args.foreign, args.model)
        write_results(args.md, args.out, res, time.time() - t0, args.quick, args.model, args.seed)
    print(f"wrote {args.md} and {args.out}/")


if __name__ == "__main__":
    main()
