import pytest

from nanokv import demo


def test_demo_runs(capsys):
    demo.main(["--new", "8", "--budget", "32", "--method", "h2o"])
    out = capsys.readouterr().out
    assert "H2O(budget=32" in out and "holds" in out and "32 of" in out


def test_demo_bad_input():
    with pytest.raises(SystemExit):
        demo.main(["--method", "nope"])
    with pytest.raises(SystemExit):
        demo.main(["--budget", "0"])
