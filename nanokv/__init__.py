"""nanokv: readable reference implementations of KV-cache compression for a GPT-2.

    from gpt import GPT
    from nanokv import KVCache, METHODS
    cache = KVCache(model.config, "knorm", budget=64)

`METHODS`, `register` and the method classes (`nanokv.H2O`, ...) load on first use
(nanokv/registry.py), so `import nanokv.cache` pulls in no method.
"""

from .cache import KVCache, reference_attention
from .method import Method, ScoredEviction

_LAZY = ("METHODS", "register", "AdaKV", "CaM", "D2O", "EMS", "FullCache", "H2O", "KIVI", "KeyNorm", "MiKV",
         "PyramidKV", "Quantized", "RTN", "Scissorhands", "SnapKV", "StreamingLLM", "TOVA")


def __getattr__(name):
    if name in _LAZY:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'nanokv' has no attribute {name!r}")


__all__ = ["KVCache", "METHODS", "Method", "ScoredEviction", "register", "reference_attention"]
