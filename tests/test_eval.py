"""The evaluation harness on a tiny random model: it runs end to end and writes its files;
at a budget that keeps everything every method's perplexity equals the full cache's."""

import json
import math

import pytest
import torch

from gpt import GPT, GPTConfig
from nanokv import METHODS, KVCache, eval as nkeval


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "nano.pt"
    GPT(GPTConfig.preset("nano", block_size=128)).save_checkpoint(str(path))
    return str(path)


ROW_FIELDS = {"method", "budget", "budget_frac", "task", "protocol", "metric", "value", "samples", "seconds",
              "mem_kv_bytes", "mem_bits_per_element", "mem_fraction_of_full", "mem_fraction_of_fp16",
              "mem_total_bytes", "mem_peak_bytes", "mem_peak_fraction", "mem_scores_bytes"}


def test_cli_runs_and_writes_every_file(ckpt, tmp_path):
    out = tmp_path / "run"
    rows = nkeval.main(["--model", ckpt, "--methods", "full,h2o,snapkv,mikv(bits_lo=3)", "--budgets", "10%,64",
                        "--tasks", "passkey,lines,needle,ppl,attn,persistence", "--samples", "3", "--windows", "1",
                        "--out", str(out), "--quiet"])
    assert {p.name for p in out.iterdir()} == {
        "config.json", "samples.jsonl", "summary.json", "summary.md", "retrieval.png", "passkey.png", "lines.png",
        "ppl.png", "attn.png", "attn_error.png", "needle.png", "persistence.png"}
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(rows))
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    # one row per method x budget x task (budget-free methods once), plus the model's persistence row
    assert len(rows) == (1 + 2 + 2 + 1) * 5 + 1
    for r in rows[1:]:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["samples"] == sum(s["method"] == r["method"] and s["budget"] == r["budget"] and
                                   s["task"] == r["task"] for s in samples)
        assert 0.0 <= r["value"] <= 1.0 or r["task"] == "ppl"
        assert r["protocol"] == {"ppl": "prefill" if r["method"] == "snapkv" else "stream",
                                 "attn": "prefill" if r["method"] == "snapkv" else "stream"}.get(r["task"], "agnostic")
        assert 0 < r["mem_peak_bytes"] and 0 < r["mem_peak_fraction"] <= 1.0
    needle = next(r for r in rows if r["task"] == "needle")
    assert len(needle["grid"]) == len(needle["lengths"]) * len(needle["depths"]) == 2 * 5
    full = {r["task"]: r for r in rows if r["method"] == "full"}
    assert full["attn"]["value"] == 0.0 and full["attn"]["rel_error_per_layer"] == [0.0, 0.0]
    assert full["passkey"]["mem_fraction_of_full"] == 1.0 and full["passkey"]["mem_peak_fraction"] == 1.0
    h2o = next(r for r in rows if r["method"] == "h2o" and r["budget"] == 13 and r["task"] == "passkey")
    assert h2o["mem_fraction_of_full"] < 0.2 and h2o["mem_peak_fraction"] < 1.0  # layer by layer
    persist = rows[0]
    assert persist["task"] == "persistence" and len(persist["per_layer"]) == len(persist["random_per_layer"]) == 2
    for key in ("pivotal_per_layer", "random_pivotal_per_layer", "peak_per_layer", "random_peak_per_layer"):
        assert len(persist[key]) == 2, key
    assert all(0.0 <= x <= 1.0 for x in persist["pivotal_per_layer"] + persist["random_pivotal_per_layer"])
    assert all(x >= 1.0 - 1e-6 for x in persist["peak_per_layer"] + persist["random_peak_per_layer"])
    assert all(0.0 <= x <= 1.0 for x in persist["per_layer"] + persist["random_per_layer"])


@pytest.mark.parametrize("protocol", ["stream", "prefill"])
def test_full_budget_perplexity_and_attention_equal_full_cache(ckpt, protocol):
    model = GPT.from_pretrained(ckpt)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ref = nkeval.perplexity(model, nkeval.make_factory(model.config, "full", None), text, 64, 1, 0, protocol)
    wins = nkeval.windows(model, text, 64, 1, 0)
    for name, cls in METHODS.items():
        if cls.takes_budget and not cls.lossy:
            factory = nkeval.make_factory(model.config, name, 128)
            ppl = nkeval.perplexity(model, factory, text, 64, 1, 0, protocol)
            assert ppl == ref, name
            loss = nkeval.attention_loss(model, factory, wins, protocol)
            assert loss["lost_mass"] == 0.0 and loss["rel_error"] == 0.0, name


def independent_ppl(model, wins):
    """exp(mean cross-entropy) of the windows' second halves from one uncached forward each:
    no cache, no read loop. A window holds length + 1 tokens; the targets are tokens
    half..length (half = length // 2), predicted by the logits at positions half-1..length-1."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            length = w.numel() - 1
            half = length // 2
            logits, _ = model(w[None, :-1])
            ce = torch.nn.functional.cross_entropy(logits[0, half - 1:].double(), w[half:], reduction="sum")
            nll, n = nll + float(ce), n + length + 1 - half
    return math.exp(nll / n)


@pytest.mark.parametrize("protocol", ["stream", "prefill"])
def test_perplexity_equals_uncached_cross_entropy(protocol):
    """The perplexity RESULTS.md publishes (read_window through a full cache, token by token)
    equals exp(mean cross-entropy) of a plain forward pass, on the trained tiny model, where a
    target shifted by one token would change it by far more than the tolerance."""
    from nanokv.corpus import builtin_text

    model = GPT.from_pretrained("nanokv-tiny")
    text = builtin_text("val")[:20000]
    wins = nkeval.windows(model, text, 96, 3, 0)
    got = nkeval.perplexity(model, nkeval.make_factory(model.config, "full", None), text, 96, 3, 0, protocol)
    want = independent_ppl(model, wins)
    print(f"{protocol}: perplexity {got:.6f}, uncached {want:.6f}, rel diff {abs(got / want - 1):.2g}")
    assert abs(got / want - 1) < 1e-4
    assert want < 8  # a trained model: a misaligned target would cost a factor, not a rounding


def layer0_attention(model, ids):
    """(H, T, T) float64 causal attention of layer 0, computed from the weights directly (its
    inputs are the embeddings, whatever cache later layers run on)."""
    tr = model.transformer
    with torch.no_grad():
        T = ids.numel()
        x = tr.wte(ids) + tr.wpe.weight[:T]
        q, k, _ = tr.h[0].attn.c_attn(tr.h[0].ln_1(x)).double().split(model.config.n_embd, dim=-1)
        H = model.config.n_head
        q, k = (t.view(T, H, -1).transpose(0, 1) for t in (q, k))  # (H, T, D)
        att = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(att, -1)


def test_lost_attention_mass_is_the_sum_over_evicted_positions(ckpt):
    """Layer 0's lost mass under StreamingLLM against an explicit sum: before query t's call the
    cache holds the sinks 0..s-1 and the newest b-s positions, so the lost mass of query t is
    sum over s <= j < t-(b-s) of a_t[j], averaged over heads, then over queries and windows."""
    from nanokv.methods.streamingllm import StreamingLLM

    model = GPT.from_pretrained(ckpt)
    text = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 20
    wins = nkeval.windows(model, text, 64, 2, 0)
    budget, n_sink = 12, 2
    factory = lambda: KVCache(model.config, StreamingLLM(budget, n_sink=n_sink))  # noqa: E731
    got = nkeval.attention_loss(model, factory, wins, "stream")["lost_mass_per_layer"][0]
    per_window = []
    for w in wins:
        a = layer0_attention(model, w[:-1])  # (H, T, T)
        evicted_end = [max(n_sink, t - (budget - n_sink)) for t in range(a.size(1))]  # evicted: n_sink..end-1
        lost = [float(a[:, t, n_sink:evicted_end[t]].sum(-1).mean()) for t in range(1, a.size(1))]
        per_window.append(sum(lost) / len(lost))
    want = sum(per_window) / len(per_window)
    print(f"layer 0 lost mass {got:.6f}, explicit sum {want:.6f}")
    assert want > 0.05 and abs(got - want) < 1e-6


def test_attention_loss_is_a_probability_mass(ckpt):
    model = GPT.from_pretrained(ckpt)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    wins = nkeval.windows(model, text, 64, 1, 0)
    for name, budget in [("streamingllm", 8), ("h2o", 16), ("rtn", None), ("ems", 8), ("quantized", 16)]:
        loss = nkeval.attention_loss(model, nkeval.make_factory(model.config, name, budget), wins, "stream")
        assert all(0.0 <= x <= 1.0 for x in loss["lost_mass_per_layer"]), (name, loss)
        if name == "rtn":  # quantization holds every position: no mass lost, but an output error
            assert loss["lost_mass"] == 0.0 and loss["rel_error"] > 0.0
        else:
            assert loss["lost_mass"] > 0.0 and loss["rel_error"] > 0.0, name


def test_persistence_ratio_on_known_maps():
    T = 8
    probs = torch.zeros(1, T, T)
    probs[0, :, 0] = 1.0  # every query looks only at token 0: it is the one pivotal token, always
    assert nkeval.persistence_ratio(probs) == 1.0
    probs = torch.zeros(1, T, T)  # first half looks at token 0, second half at token 1
    probs[0, :4, 0] = 1.0
    probs[0, 4:, 1] = 1.0
    assert nkeval.persistence_ratio(probs) == 0.0
    t = torch.arange(T, dtype=torch.float32)  # uniform attention: nothing is pivotal, the ratio is undefined
    uniform = (torch.tril(torch.ones(T, T)) / (t + 1)[:, None])[None]
    assert math.isnan(nkeval.persistence_ratio(uniform))


def test_persistence_leaves_out_windows_without_a_ratio(monkeypatch):
    """A layer's ratio averages only the windows where it is defined, and says how many."""
    T = 8
    t = torch.arange(T, dtype=torch.float32)
    uniform = (torch.tril(torch.ones(T, T)) / (t + 1)[:, None])[None]  # no pivotal token: no ratio
    keeps = torch.zeros(1, T, T)
    keeps[0, :, 0] = 1.0  # token 0 pivotal throughout: ratio 1
    moves = torch.zeros(1, T, T)
    moves[0, :4, 0], moves[0, 4:, 1] = 1.0, 1.0  # ratio 0
    maps = {0: [keeps, uniform], 1: [moves, uniform]}  # window -> per-layer maps
    monkeypatch.setattr(nkeval, "attention_maps", lambda model, ids: maps[int(ids[0])])
    wins = [torch.tensor([0, 5, 5]), torch.tensor([1, 5, 5])]
    got = nkeval.persistence(None, wins, details=True)
    print(got)
    assert got["ratio"] == [0.5, None] and got["windows"] == [2, 0]
    assert nkeval.persistence(None, wins) == [0.5, None]


def test_pivotal_fraction_and_peak_over_uniform_on_known_maps():
    from nanokv.probe import peak_over_uniform, pivotal_fraction

    T = 8
    t = torch.arange(T, dtype=torch.float32)
    uniform = torch.tril(torch.ones(T, T)) / (t + 1)[:, None]  # every query spreads evenly: nothing is pivotal
    uniform = uniform[None].repeat(2, 1, 1)
    print(peak_over_uniform(uniform), pivotal_fraction(uniform))
    assert abs(peak_over_uniform(uniform) - 1.0) < 1e-6 and pivotal_fraction(uniform) == 0.0
    one = torch.zeros(2, T, T)
    one[:, :, 0] = 1.0  # all attention on token 0: one pivotal token out of T/2, peak t + 1
    assert pivotal_fraction(one) == 1 / (T // 2)
    assert abs(peak_over_uniform(one) - float((t[1:] + 1).mean())) < 1e-6
    one[1] = uniform[1]  # a uniform head halves the shares
    assert pivotal_fraction(one) == 0.5 / (T // 2)
    late = uniform.clone()  # token 1 pivotal only for the second-half queries: in S2, not in S1
    late[:, T // 2:, 1] *= 2
    late = late / late.sum(-1, keepdim=True)
    assert pivotal_fraction(late) == 1 / (T // 2)


def test_method_specs():
    assert nkeval.split_methods("full,mikv(bits_lo=3,balancer=False),quantized(inner=h2o)") == [
        "full", "mikv(bits_lo=3,balancer=False)", "quantized(inner=h2o)"]
    assert nkeval.parse_method("mikv(bits_lo=3,balancer=False)") == ("mikv", {"bits_lo": 3, "balancer": False})
    assert nkeval.parse_method("quantized(inner=h2o)") == ("quantized", {"inner": "h2o"})
    assert nkeval.parse_method("ems(tau=inf)") == ("ems", {"tau": float("inf")})


def test_parse_budget():  # bad budgets are in test_bad_input.py
    assert nkeval.parse_budget("5%", 512) == 26
    assert nkeval.parse_budget("64", 512) == 64


def test_budget_above_context_fails_before_work(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"budget '999' = 999 tokens must be in \[1, context=128\]"):
        nkeval.main(["--model", ckpt, "--methods", "h2o", "--budgets", "999", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_context_shorter_than_the_block(ckpt, tmp_path):
    """--context runs nanokv's GPT on shorter episodes and windows: budgets are a share of it, every
    episode has that length; beyond the block size (or below 16) it is refused before any work."""
    out = tmp_path / "short"
    rows = nkeval.main(["--model", ckpt, "--context", "96", "--methods", "full,h2o", "--budgets", "25%",
                        "--tasks", "passkey,lines,ppl", "--samples", "2", "--windows", "1", "--out", str(out),
                        "--quiet", "--no-plots"])
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    lengths = {s["length"] for s in samples if s["task"] in ("passkey", "lines")}
    print("episode lengths", lengths, "h2o budget", [r["budget"] for r in rows if r["method"] == "h2o"])
    assert lengths == {96}
    assert all(r["budget"] == 24 for r in rows if r["method"] == "h2o")
    for bad in ("129", "8"):
        with pytest.raises(SystemExit, match=rf"--context must be in \[16, 128\] for this model \(its block size\), got {bad}"):
            nkeval.main(["--model", ckpt, "--context", bad, "--methods", "full", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_results_page_from_the_committed_summaries(tmp_path):
    """RESULTS.md's text is computed from the saved runs: every claim gets a verdict."""
    import os

    from nanokv import results

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
    # the page is written from the runs that are committed (the acceptance runs may not be yet)
    res = {name: json.load(open(os.path.join(root, name, "summary.json"))) for name in results.EXPERIMENTS
           if os.path.isfile(os.path.join(root, name, "summary.json"))}
    claims = results.claims(res)
    assert len(claims) == 5 and all("**holds**" in c or "**does not hold here**" in c for c in claims)
    md = tmp_path / "RESULTS.md"
    results.write_results(str(md), root, res, 60.0, quick=False)
    text = md.read_text()
    assert text.startswith("# Results") and "| method | budget | task |" in text
    assert "on 200 held-out episodes per cell, 2000 in `full2000`" in text and "## The full cache, 2000 episodes" in text
    # a --quick page (a tenth of the episodes) states its own counts, read from the rows
    small = {name: [dict(r, samples=max(1, r["samples"] // 10)) for r in rows] for name, rows in res.items()}
    results.write_results(str(md), root, small, 60.0, quick=True)
    text = md.read_text()
    assert "on 20 held-out episodes per cell, 200 in `full2000`" in text and "## The full cache, 200 episodes" in text \
        and "question-agnostic, 20 episodes" in text and "2000 in" not in text


def test_acceptance_verdicts_follow_the_numbers():
    """The miniature's seven acceptance lines (issue 17) compute their verdicts from the rows: a
    set of rows that meets every target holds everywhere, and lowering one figure below its
    target turns exactly that line's verdict."""
    from nanokv import results

    def row(method, task, frac, value, **kw):
        return {"method": method, "task": task, "budget_frac": frac, "value": value, **kw}

    def rows(snap25=0.95, lines2000=0.93, passkey2000=0.99, lines200=0.99):
        agn = [row(m, t, None if m == "full" else f, v) for t in ("passkey", "lines") for f in (0.25, 0.5)
               for m, v in (("full", 1.0), ("streamingllm", 0.3), ("h2o", 0.8), ("tova", 0.2),
                            ("scissorhands", 0.3), ("snapkv", 0.1), ("ems", 0.6))]
        aware = [row("full", "passkey", None, 0.99, samples=200), row("full", "lines", None, lines200, samples=200)] + [
            row(m, t, f, v) for t in ("passkey", "lines") for f in (0.1, 0.25)
            for m, v in (("streamingllm", 0.2), ("snapkv", snap25))]
        foreign_aware = [row("full", "passkey", None, 0.98), row("full", "lines", None, lines200 - 0.01)] + [
            row("snapkv", t, 0.25, snap25 - 0.02) for t in ("passkey", "lines")]
        foreign_agn = [row(m, t, 0.5, v) for t in ("passkey", "lines") for m, v in (("h2o", 0.78), ("streamingllm", 0.3))]
        return {"agnostic200": agn, "aware200": aware,
                "full2000": [row("full", "passkey", None, passkey2000, samples=2000),
                             row("full", "lines", None, lines2000, samples=2000)],
                "foreign_aware": foreign_aware, "foreign_agnostic": foreign_agn,
                "scissorhands": [row("full", "ppl", None, 3.0), row("scissorhands", "ppl", 0.5, 3.1)],
                "ppl20": [row("full", "ppl", None, 3.0), row("h2o", "ppl", 0.2, 3.2), row("tova", "ppl", 0.2, 3.5)],
                "persistence": [row("-", "persistence", None, 0.95, random_value=0.7)],
                "mikv": [row("h2o", "lines", 0.2, 0.1), row("mikv(bits_lo=2,balancer=False)", "lines", None, 0.4),
                         row("mikv(bits_lo=2)", "lines", None, 0.7), row("mikv(bits_lo=3)", "lines", None, 0.9),
                         row("full", "lines", None, 0.95)]}

    good = results.acceptance(rows())
    assert [t[:2] for t in good] == ["1.", "2.", "3.", "3.", "4.", "5.", "6.", "7."]  # 3: at 50% and at 25%
    assert all("**holds**" in t and "does not hold" not in t for t in good), good
    bad = results.acceptance(rows(snap25=0.85))  # SnapKV at 25% below its 0.90 target
    print(bad[1])
    assert "does not hold" in bad[1] and all("does not hold" not in t for i, t in enumerate(bad) if i != 1)
    for kw in ({"lines2000": 0.89}, {"passkey2000": 0.96}, {"lines200": 0.89}):  # either sample below a target
        bad = results.acceptance(rows(**kw))
        print(kw, bad[0])
        assert "**does not hold here**" in bad[0] and all("does not hold" not in t for t in bad[1:])
    assert "on 2000 episodes each (those 200 and 1800 more" in good[0]
    res = rows()
    del res["full2000"]  # summaries saved before that run: the 200-episode figures decide
    assert "**holds**" in results.acceptance(res)[0] and "2000" not in results.acceptance(res)[0]
    # a persistence row with the pivotal shares and peaks says what its ratios mean, with its own figures
    res = rows()
    res["persistence"][0].update(per_layer=[0.9, 0.75], pivotal_per_layer=[0.12, 0.004],
                                 random_pivotal_per_layer=[0.47, 0.49], peak_per_layer=[61.0, 20.0],
                                 random_peak_per_layer=[1.13, 1.12], samples=4, windows_per_layer=[4, 3])
    five = results.acceptance(res)[5]
    print(five)
    assert "**holds**" in five and "47-49%" in five and "0.4-12.0%" in five and "trained >= 0.850" in five
    why = results.uniform_noise(res["persistence"][0])
    assert "0.4-12.0% of the prefix" in why and "layer 1 (from 0) holds 0.4%" in why and "in 1 of the 4 windows" in why \
        and "0.75 averages the other 3" in why and "1.12-1.13 times" in why
    assert results.uniform_noise(rows()["persistence"][0]) == ""  # older summaries: no explanation, no error


def test_budget_plot_axes_reference_line_and_no_hidden_markers():
    """Accuracy axes span [0, 1]; the full cache is a horizontal reference line; two methods with
    the same (memory, accuracy) point are drawn apart."""
    import matplotlib.pyplot as plt

    from nanokv.plots import budget_axes

    rows = [{"task": "passkey", "method": "full", "mem_fraction_of_full": 1.0, "value": 0.9},
            {"task": "passkey", "method": "h2o", "mem_fraction_of_full": 0.25, "value": 0.5},
            {"task": "passkey", "method": "tova", "mem_fraction_of_full": 0.25, "value": 0.5},
            {"task": "passkey", "method": "h2o", "mem_fraction_of_full": 0.5, "value": 0.7}]
    fig, ax = budget_axes(rows, "passkey")
    lo, hi = ax.get_ylim()
    assert lo <= 0.0 and hi >= 1.0
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    ref = lines["full cache (0.9)"]
    assert list(ref.get_ydata()) == [0.9, 0.9] and ref.get_linestyle() == "--"
    h2o_x, tova_x = lines["h2o"].get_xdata()[0], lines["tova"].get_xdata()[0]
    assert h2o_x != tova_x and abs(tova_x / h2o_x - 1) < 0.1  # apart, but still near 0.25
    assert lines["h2o"].get_marker() != lines["tova"].get_marker()
    plt.close(fig)


def test_needle_visibility_on_a_known_map():
    """Two heads, 6 tokens, the value at position 1, window 2 (queries 4 and 5): head 0 looks at the
    value from both window queries, head 1 never does."""
    from nanokv.probe import visibility_from_maps

    T = 6
    probs = torch.zeros(2, T, T)
    probs[0, :, 0] = 1.0
    probs[0, 4:, :] = 0.0
    probs[0, 4:, 1] = 1.0  # head 0: both window queries put all their mass on the value
    probs[1, :, 0] = 1.0  # head 1: everything on token 0
    v = visibility_from_maps([probs], [1], window=2)
    assert v["last_mass"] == [[1.0, 0.0]]
    assert v["window_vs_uniform"][0][0] == pytest.approx(2.0 / (2 * 1 / 4))  # all of it vs a 1/4 share
    assert v["window_vs_uniform"][0][1] == 0.0
    assert v["above"] == [[0.0, 0.25]]  # head 1 scores token 0 above the value: 1 of the 4 context tokens
