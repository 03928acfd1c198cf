"""
The full cache: keeps every token at the model's precision. The baseline every method is
compared with, and what every method must equal when its budget keeps everything.

Memory per layer: B * H * T * (2 * D * dtype bytes + 4 bytes of position) + (B * H) lengths.
"""

from ..method import Method


class FullCache(Method):
    name = "full"
    needs_probs = False
    compresses_at = "never"
    takes_budget = False

    def __init__(self):
        super().__init__(budget=None)
