"""The evaluation harness on a tiny random model: it runs end to end and writes its files;
at a budget that keeps everything every method's perplexity equals the full cache's."""

import json

import pytest
import torch

from gpt import GPT, GPTConfig
from nanokv import METHODS, eval as nkeval


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "nano.pt"
    GPT(GPTConfig.preset("nano", block_size=128)).save_checkpoint(str(path))
    return str(path)


def test_cli_runs_and_writes_every_file(ckpt, tmp_path):
    out = tmp_path / "run"
    rows = nkeval.main(["--model", ckpt, "--methods", "full,h2o,ems,mikv(bits_lo=3)", "--budgets", "10%,64",
                        "--tasks", "passkey,lines,ppl", "--samples", "2", "--out", str(out), "--quiet"])
    assert {p.name for p in out.iterdir()} == {"config.json", "results.jsonl", "summary.md"}
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(rows))
    # one row per method x budget x task (budget-free methods once)
    assert len(rows) == (1 + 2 + 2 + 1) * 3
    for r in rows:
        assert {"method", "budget", "task", "protocol", "value", "metric", "mem_bits_per_element",
                "mem_fraction_of_fp16"} <= set(r)
        assert 0.0 <= r["value"] <= 1.0 or r["task"] == "ppl"


def test_full_budget_perplexity_equals_full_cache(ckpt):
    model = GPT.from_pretrained(ckpt)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ref = nkeval.perplexity(model, nkeval.make_factory(model.config, "full", None), text, 100, 2, 0)
    for name, cls in METHODS.items():
        if cls.takes_budget and not getattr(cls, "lossy", False):
            ppl = nkeval.perplexity(model, nkeval.make_factory(model.config, name, 128), text, 100, 2, 0)
            assert ppl == ref, name


@pytest.mark.parametrize("argv, match", [
    (["--methods", "full,h3o"], r"unknown method 'h3o'; valid methods: \[.*'full'"),
    (["--methods", "mikv(rho)"], r"'rho' is not key=value"),
    (["--tasks", "qa"], r"unknown tasks \['qa'\]; valid tasks"),
    (["--samples", "0"], r"--samples must be >= 1"),
])
def test_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        nkeval.get_args(argv)


def test_method_specs():
    assert nkeval.split_methods("full,mikv(bits_lo=3,balancer=False),quantized(inner=h2o)") == [
        "full", "mikv(bits_lo=3,balancer=False)", "quantized(inner=h2o)"]
    assert nkeval.parse_method("mikv(bits_lo=3,balancer=False)") == ("mikv", {"bits_lo": 3, "balancer": False})
    assert nkeval.parse_method("quantized(inner=h2o)") == ("quantized", {"inner": "h2o"})


def test_bad_budget_and_missing_text(tmp_path):
    with pytest.raises(ValueError, match=r"budget '600' = 600 tokens must be in \[1, context=512\]"):
        nkeval.parse_budget("600", 512)
    with pytest.raises(ValueError, match="neither a token count nor a percentage"):
        nkeval.parse_budget("ten", 512)
    assert nkeval.parse_budget("5%", 512) == 26
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nkeval.get_args(["--text", str(tmp_path / "none.txt")])
