"""
Fingerprints of every registered method on one fixed run, recorded before a refactor so that the
refactor can show it changed nothing (issue "The cache drives, methods decide": kept sets, merged
tensors and quantized codes identical before and after).

    python tests/golden/record.py          # rewrite tests/golden/methods.json (only on purpose)

The run: tests' peaked_model (2 layers, 4 heads, head dim 16, fp32), batch 2, a 40-token prompt,
20 one-token decode steps, then a 3-token chunk; every method at budget 16 through
`cls.scaled(16)` (budget-free methods with their defaults), backend "torch", one thread.
Fingerprints use public results only, so they survive any change of storage layout:
    logits    per call, two projections of the logits (their sum against a fixed random vector
              over the vocabulary, and their absolute sum), compared to 1e-6 of the call's
              absolute sum (tests/test_golden.py): merged keys and values and quantized codes reach
              the logits, while float reassociation and another CPU's float kernels stay near 1e-7.
              `logits_sha` (the exact bytes) is recorded for information only
    kept      SHA-256 of every (layer, row, head)'s kept positions and their precision, after every call
    memory    memory_bytes() after the run
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (conftest)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

PATH = os.path.join(HERE, "methods.json")


def fingerprint(name: str) -> dict:
    from conftest import peaked_model

    from nanokv import METHODS, KVCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums on every run of this machine kind
    try:
        return _run(name, peaked_model(), METHODS, KVCache)
    finally:
        torch.set_num_threads(threads)


def _run(name, model, METHODS, KVCache) -> dict:
    cls = METHODS[name]
    cache = KVCache(model.config, cls.scaled(16) if cls.takes_budget else cls())
    idx = torch.randint(0, 256, (2, 63), generator=torch.Generator().manual_seed(42))
    calls = [(0, 40)] + [(t, t + 1) for t in range(40, 60)] + [(60, 63)]
    h_logits, h_kept = hashlib.sha256(), hashlib.sha256()
    w = torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    proj = []
    with torch.no_grad():
        for a, b in calls:
            logits, _ = model(idx[:, a:b], cache=cache)
            h_logits.update(logits.float().contiguous().numpy().tobytes())
            proj.append([float((logits.double() @ w).sum()), float(logits.double().abs().sum())])
            for layer in range(model.config.n_layer):
                for row in range(2):
                    for head in range(model.config.n_head):
                        pos, bits = cache.kept_precision(layer, row, head)
                        h_kept.update(pos.to(torch.int64).numpy().tobytes() + b"|" +
                                      bits.to(torch.int64).numpy().tobytes() + b";")
    return {"kept": h_kept.hexdigest(), "memory": cache.memory_bytes(), "logits": proj,
            "logits_sha": h_logits.hexdigest()}


def record() -> dict:
    from nanokv import METHODS

    return {name: fingerprint(name) for name in sorted(METHODS)}


if __name__ == "__main__":
    prints = record()
    with open(PATH, "w") as f:
        json.dump({"torch": torch.__version__, "methods": prints}, f, indent=1)
        f.write("\n")
    print(f"wrote {PATH}: {len(prints)} methods")
