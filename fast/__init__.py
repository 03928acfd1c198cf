"""fast/: Triton kernels for nanokv's hot paths (checked against the torch reference).

Triton runs on Linux with an NVIDIA GPU, or anywhere under TRITON_INTERPRET=1 (CPU
interpreter, slow, for tests). Elsewhere the torch backend (the default) works unchanged.
"""

import os
import sys


def triton_available() -> tuple[bool, str]:
    """(available, reason) for the Triton backend on this machine."""
    if not sys.platform.startswith("linux"):
        return False, f"Triton is only available on Linux (this is {sys.platform}); use backend='torch'"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e}); use backend='torch'"
    return True, "ok"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set before
    triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton():
    """Raise a clear error where backend='triton' cannot run: no triton, or neither a CUDA
    GPU nor the interpreter (CPU tensors need TRITON_INTERPRET=1)."""
    ok, reason = triton_available()
    if not ok:
        raise RuntimeError(reason)
    import torch

    if not interpreting() and not torch.cuda.is_available():
        raise RuntimeError(
            "backend='triton' needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton is imported "
            "to run the kernels in Triton's CPU interpreter (slow; for tests); use backend='torch' on a CPU")
