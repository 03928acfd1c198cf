"""
Rotary positions (RoPE, Su et al. 2021), the one operation nanokv needs of them: turning a key
or query that was rotated at one position into the same vector rotated at another.

RoPE rotates each channel pair (i, i + D/2) of a query or key at position p by the angle
p * inv_freq[i] (Llama's "rotate half" layout, used by Llama, Qwen and Mistral in transformers):

    x_p = x * cos(p * f) + rotate_half(x) * sin(p * f)        rotate_half(x) = (-x2, x1)

Rotations by angles add, so the vector at position p + delta is x_p turned by delta * f more;
no need to know x itself. StreamingLLM's in-cache positions use this to move kept keys to their
slot numbers (nanokv/methods/streamingllm.py), and nanokv.hf to move new tokens there.
Computed in fp32 whatever the dtype; delta 0 returns x unchanged, bit for bit.
"""

import torch


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (..., L, D) rotated at some positions; delta (..., L) integer offsets broadcastable to
    x's leading dims; inv_freq (D/2,). Returns x rotated at those positions + delta, in x's dtype."""
    angle = delta.to(torch.float32)[..., None] * inv_freq.to(x.device, torch.float32)  # (..., L, D/2)
    cos = torch.cat([torch.cos(angle)] * 2, dim=-1)  # (..., L, D): each pair's angle, for both channels
    sin = torch.cat([torch.sin(angle)] * 2, dim=-1)
    xf = x.float()
    half = x.size(-1) // 2
    turned = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)  # rotate_half
    return (xf * cos + turned * sin).to(x.dtype)
