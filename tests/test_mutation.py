"""The mutation check (tests/mutation_check.py) as a test: every planted one-line bug is caught
by the tests that exist for it. Slow (about 15 min on 2 cores): python -m pytest -m slow tests/test_mutation.py"""

import pytest

import mutation_check


@pytest.mark.slow
@pytest.mark.parametrize("mutant", mutation_check.MUTANTS, ids=[m[0] for m in mutation_check.MUTANTS])
def test_planted_bug_is_caught(mutant):
    verdict, seconds = mutation_check.run_mutant(*mutant)
    print(f"{mutant[0]}: {verdict} in {seconds:.0f} s")
    assert verdict.startswith("caught by "), verdict
