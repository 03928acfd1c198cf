"""Every command-line entry point: --help shows each option's default."""

import re

import pytest

import bench
import train_tiny
from nanokv import demo, results
from nanokv import eval as nkeval


@pytest.mark.parametrize("main", [train_tiny.get_args, nkeval.get_args, demo.main, bench.main, results.main],
                         ids=["train_tiny", "eval", "demo", "bench", "results"])
def test_help_shows_defaults(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z0-9-]+)", text, flags=re.M)
    assert options, text
    # every option that takes a value and has a default says which
    for block in re.split(r"\n(?=  --)", text.split("options:")[1]):
        head = block.strip().split()[0]
        if head in ("--help", "-h") or "store_true" in block:
            continue
        takes_value = re.match(r"--[a-z0-9-]+ [A-Z_{]", block.strip()) is not None
        if takes_value and "(default: None)" not in block:
            assert "(default:" in block, f"{main.__module__}: {head} does not show its default:\n{block}"
