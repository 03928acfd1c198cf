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


def require_triton():
    ok, reason = triton_available()
    if not ok:
        raise RuntimeError(reason)
    # The kernels land with the fast-path work; until then say so plainly.
    raise NotImplementedError(
        "backend='triton' has no kernels yet in this version of nanokv; use backend='torch' "
        f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})"
    )
