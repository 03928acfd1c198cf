"""
Ragged storage: the layout every cache layer uses.

A layer of a KV cache holds, for every (batch row b, head h), a list of entries: one per
kept token. Different heads may keep different numbers of tokens (Ada-KV, EMS), so the
entries are stored flat, without padding:

    field tensor  (N, *trailing)   N = lengths.sum(), rows grouped by head:
                                   [head (0,0) entries][head (0,1) entries]...[head (B-1,H-1) entries]
    lengths       (B, H)           entries held by each head

A "field" is any per-entry tensor: keys k (N, D), values v (N, D), original positions
pos (N,), and whatever per-token state a method keeps (H2O's accumulated attention (N,),
Scissorhands' bit history (N, W/8), packed low-bit codes (N, D*b/8), ...). All fields
share `lengths`, so appending and evicting keep them aligned by construction.

When every head holds the same number L of entries (the common case) `padded(name)` is a
free view (B, H, L, *trailing). When lengths differ it builds a temporary padded copy
(B, H, Lmax, *trailing) plus a validity mask; that copy lives only during one computation
and is never held, so the cache itself allocates no padding.
"""

from __future__ import annotations

import torch

KINDS = ("keys", "values", "positions", "quant_meta", "method_state", "padding")


class Ragged:
    def __init__(self, batch: int, heads: int, device):
        self.lengths = torch.zeros(batch, heads, dtype=torch.long, device=device)  # (B, H)
        # plain-int summary of `lengths`, kept in step with it (saves a tensor reduction per call)
        self._uniform_len: int | None = 0  # L when every head holds L entries, else None
        self._max_len = 0
        self.fields: dict[str, torch.Tensor] = {}  # name -> (N, *trailing)
        self.kinds: dict[str, str] = {}  # name -> accounting kind (one of KINDS)
        self.fills: dict[str, float] = {}  # value given to new entries a caller does not provide

    # ------------------------------------------------------------------ declaring fields
    def add_field(self, name: str, kind: str, trailing: tuple, dtype: torch.dtype, fill: float = 0.0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if name in self.fields:
            raise ValueError(f"field {name!r} already exists")
        n = int(self.lengths.sum())
        self.fields[name] = torch.full((n, *trailing), fill, dtype=dtype, device=self.lengths.device)
        self.kinds[name] = kind
        self.fills[name] = fill

    # ------------------------------------------------------------------ shape helpers
    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def heads(self) -> int:
        return self.lengths.shape[1]

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def uniform(self) -> bool:
        """True when every head holds the same number of entries."""
        return self._uniform_len is not None

    def _set_lengths(self, lengths: torch.Tensor):
        self.lengths = lengths
        self._max_len = int(lengths.max()) if lengths.numel() else 0
        self._uniform_len = self._max_len if bool((lengths == self._max_len).all()) else None

    def _trailing(self, name):
        return self.fields[name].shape[1:]

    def valid_mask(self) -> torch.Tensor:
        """(B, H, Lmax) bool: True where a padded slot holds a real entry."""
        slots = torch.arange(self.max_len, device=self.lengths.device)
        return slots[None, None, :] < self.lengths[:, :, None]

    def padded(self, name: str, fill: float = 0.0) -> torch.Tensor:
        """Field `name` as (B, H, Lmax, *trailing); a view when lengths are uniform."""
        t = self.fields[name]
        B, H, L = self.batch, self.heads, self.max_len
        if self.uniform:
            return t.view(B, H, L, *self._trailing(name))
        out = torch.full((B, H, L, *self._trailing(name)), fill, dtype=t.dtype, device=t.device)
        out[self.valid_mask()] = t
        return out

    def set_padded(self, name: str, value: torch.Tensor):
        """Write field `name` from a padded (B, H, Lmax, *trailing) tensor (padding ignored)."""
        t = self.fields[name]
        value = value.to(t.dtype)
        self.fields[name] = value.reshape(t.shape) if self.uniform else value[self.valid_mask()]

    # ------------------------------------------------------------------ growing and shrinking
    def append(self, **new: torch.Tensor):
        """Append T entries to every head. Each given tensor is (B, H, T, *trailing);
        fields not given get their fill value."""
        unknown = set(new) - set(self.fields)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; fields: {sorted(self.fields)}")
        B, H, T = next(iter(new.values())).shape[:3]
        for name, t in self.fields.items():
            if name not in new:
                new[name] = torch.full((B, H, T, *t.shape[1:]), self.fills[name], dtype=t.dtype,
                                       device=t.device)
        if self.uniform:  # cat along the token axis of the (B, H, L, ...) view
            L = self.max_len
            for name, t in self.fields.items():
                old = t.view(B, H, L, *t.shape[1:])
                self.fields[name] = torch.cat((old, new[name].to(t.dtype)), dim=2).flatten(0, 2)
        else:  # scatter old and new rows into a larger flat tensor
            new_len = self.lengths + T
            start = torch.cumsum(new_len.flatten(), 0) - new_len.flatten()  # (B*H,) first row of head
            head_of_row = torch.repeat_interleave(torch.arange(B * H, device=start.device),
                                                  self.lengths.flatten())
            old_start = torch.cumsum(self.lengths.flatten(), 0) - self.lengths.flatten()
            rank = torch.arange(head_of_row.numel(), device=start.device) - old_start[head_of_row]
            old_dst = start[head_of_row] + rank  # (N,)
            new_dst = (start + self.lengths.flatten())[:, None] + torch.arange(T, device=start.device)
            for name, t in self.fields.items():
                out = torch.empty((int(new_len.sum()), *t.shape[1:]), dtype=t.dtype, device=t.device)
                out[old_dst] = t
                out[new_dst.flatten()] = new[name].to(t.dtype).flatten(0, 2)
                self.fields[name] = out
            self._set_lengths(new_len)
            return
        self.lengths = self.lengths + T
        self._uniform_len += T
        self._max_len += T

    def keep(self, mask: torch.Tensor):
        """Keep the entries where mask (B, H, Lmax) is True (padded slots must be False).
        The order of the kept entries is unchanged."""
        if mask.shape != (self.batch, self.heads, self.max_len):
            raise ValueError(f"keep mask must be {(self.batch, self.heads, self.max_len)}, got {tuple(mask.shape)}")
        valid = self.valid_mask()
        if (mask & ~valid).any():
            raise ValueError("keep mask selects padded slots that hold no entry")
        flat = mask[valid]  # (N,) in the flat (b, h, slot) order
        for name, t in self.fields.items():
            self.fields[name] = t[flat]
        self._set_lengths(mask.sum(dim=-1))

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for name, t in self.fields.items():
            out[self.kinds[name]] += t.numel() * t.element_size()
        out["positions"] += self.lengths.numel() * self.lengths.element_size()  # index metadata
        return out
