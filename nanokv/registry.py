"""The method registry: name -> Method class. Imported on first use (`nanokv.METHODS`, or a
KVCache built from a name), so the model and the cache import no method they do not use."""

from __future__ import annotations

from .method import Method
from .methods.adakv import AdaKV
from .methods.cam import CaM
from .methods.d2o import D2O
from .methods.ems import EMS
from .methods.full import FullCache
from .methods.h2o import H2O
from .methods.kivi import KIVI
from .methods.knorm import KeyNorm
from .methods.mikv import MiKV
from .methods.pyramidkv import PyramidKV
from .methods.quantized import Quantized
from .methods.rtn import RTN
from .methods.scissorhands import Scissorhands
from .methods.snapkv import SnapKV
from .methods.streamingllm import StreamingLLM
from .methods.tova import TOVA

# name -> method class. Add yours here (see "Add a method" in ARCHITECTURE.md) or use register().
METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (FullCache, StreamingLLM, H2O, TOVA, Scissorhands, SnapKV, PyramidKV, AdaKV, KeyNorm,
                RTN, KIVI, MiKV, Quantized, CaM, D2O, EMS)
}
CLASSES = {cls.__name__: cls for cls in METHODS.values()}


def register(cls: type[Method]) -> type[Method]:
    """Register a Method subclass under cls.name (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register expects a Method subclass, got {cls!r}")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered: {METHODS[cls.name]}")
    METHODS[cls.name] = cls
    return cls
