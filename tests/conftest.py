import os
import sys

# Triton kernels run in Triton's CPU interpreter in the tests; this must be set before triton is
# imported. (The ahead-of-time compile checks in test_fast.py run in a subprocess without it.)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

# hypothesis profiles: "ci" (the default: derandomized, so CI is reproducible, a few examples per
# test) and "long" (HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py: many more).
_common = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, **_common)
settings.register_profile("long", **_common)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
# examples per (method, backend) in the property tests; the Triton interpreter is slow
EXAMPLES = {"ci": {"torch": 20, "triton": 3}, "long": {"torch": 150, "triton": 25}}[PROFILE]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_GPT2 = os.path.join(ROOT, "..", "shared", "data", "gpt2")

from gpt import GPT, GPTConfig  # noqa: E402


def peaked_model(seed=0, n_layer=2, n_head=4, n_embd=64, block_size=256, qk_gain=4.0):
    """A random model whose attention is far from uniform (enlarged query/key weights), so
    kept-set comparisons do not hinge on near-ties."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=256))
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_attn.weight[: 2 * n_embd] *= qk_gain
    return m.eval()


@pytest.fixture
def small_chunks(monkeypatch):
    """Decode kernels in 16-token chunks, so the short caches of the tests span several programs
    (split-K partials and their reduction are exercised, not one chunk per head)."""
    import fast.decode

    monkeypatch.setattr(fast.decode, "MAX_BLOCK_N", 16)
    chunk, _, _ = fast.decode.launch_shape(40, 16)
    assert chunk == 16  # a 40-token cache is 3 chunks
    return 16


@pytest.fixture
def model():
    return peaked_model()


def make_method(name, budget):
    """Build any registered method at `budget` with its defaults (the contract of METHODS)."""
    from nanokv import METHODS

    cls = METHODS[name]
    return cls.scaled(budget)


def walk_tensor_bytes(obj, seen=None):
    """Bytes of every distinct tensor storage reachable from obj (independent of memory_bytes)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return sum(walk_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(walk_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        # not the cache's: the model config, and a rotary model's frequency table (shared, read-only)
        return sum(walk_tensor_bytes(v, seen) for k, v in vars(obj).items() if k not in ("config", "inv_freq"))
    return 0
