import pytest

from nanokv import demo


def test_demo_runs(capsys):
    demo.main(["--new", "8", "--budget", "32", "--method", "h2o"])
    out = capsys.readouterr().out
    assert "H2O(budget=32" in out and "holds" in out and "32 of" in out


def test_demo_default_budget_compresses(capsys):
    """The default budget is half the prompt: the method's cache holds less than the full cache."""
    demo.main(["--new", "4"])
    out = capsys.readouterr().out
    held = [int(line.split("holds ")[1].split(" bytes")[0].replace(",", "")) for line in out.splitlines() if "holds" in line]
    n_prompt = int(out.split("prompt (")[1].split(" tokens")[0])
    assert f"H2O(budget={round(n_prompt / 2)}" in out
    assert len(held) == 2 and held[1] < 0.75 * held[0], held


def test_demo_bad_input(capsys):
    for argv, message in [(["--method", "nope"], "unknown method 'nope'"),
                          (["--budget", "0"], "budget '0' = 0 tokens must be in [1, context="),
                          (["--budget", "0%"], "a percentage must be in (0%, 100%]"),
                          (["--prompt", ""], "--prompt is empty"),
                          (["--model", "no-such-model"], "unknown model 'no-such-model'")]:
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
        assert e.value.code == 2  # argparse's usage error, not a crash
        assert message in capsys.readouterr().err
