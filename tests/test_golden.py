"""Every method's fingerprint on a fixed run (tests/golden/record.py) equals the recorded one:
kept sets and precisions after every call, memory held, and the logits (so merged tensors and
quantized codes; recorded on 2026-12-03 before the interface refactor).

Logits: each call's two projections (a random direction, the absolute sum) may move by at most
1e-6 of that call's absolute logit sum. Float reassociation (D2O's and EMS's (m, L) cosines,
MiKV's [high, low] tier order) and another CPU's float kernels move them by 5e-8 to 1.7e-7
(measured on an AVX-512 EPYC against the recording machine); a 1% D2O merge-weight error moves
them by 3.4e-5. (Until 2026-12-04 each projection was divided by its own magnitude, clamped at
1e-3: a projection that happens to sit near zero then turned 5e-6 of noise into 1.6e-4 on
another CPU.) A change that moves them on purpose re-records with `python tests/golden/record.py`
and says why in its commit."""

import json

import pytest
import torch

from golden.record import PATH, fingerprint
from nanokv import METHODS

RECORDED = json.load(open(PATH))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_matches_its_recorded_fingerprint(name):
    if RECORDED["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        pytest.skip(f"recorded with torch {RECORDED['torch']}; bit-exact logits need the same build")
    assert name in RECORDED["methods"], f"{name} has no recorded fingerprint: run python tests/golden/record.py"
    got, want = fingerprint(name), RECORDED["methods"][name]
    assert got["kept"] == want["kept"], f"{name}: kept positions or precisions changed"
    assert got["memory"] == want["memory"], f"{name}: memory_bytes {got['memory']} != recorded {want['memory']}"
    got_l, want_l = torch.tensor(got["logits"], dtype=torch.float64), torch.tensor(want["logits"], dtype=torch.float64)
    scale = want_l[:, 1:2]  # each call's absolute logit sum
    rel = ((got_l - want_l).abs() / scale).max().item()
    print(f"{name}: logits projections max diff {rel:.2g} of the absolute logit sum; exact bytes {'same' if got['logits_sha'] == want['logits_sha'] else 'differ'}")
    assert rel <= 1e-6, f"{name}: logits changed (held keys, values or codes differ): {rel:.3g} of the absolute sum"
