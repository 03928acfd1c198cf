"""
Ragged storage: the layout every cache layer uses.

A layer of a KV cache holds, for every (batch row b, head h), a list of entries: one per
kept token, in position order (but see evict_in_place). A "field" is any per-entry tensor:
keys k (D,), values v (D,), original positions pos (), and whatever per-token state a method
keeps (H2O's accumulated attention, Scissorhands' bit history, packed low-bit codes, ...). All
fields share `lengths` (B, H), so appending and evicting keep them aligned by construction.

Two layouts, chosen automatically after every change:

  uniform  every head holds the same number L of entries (most methods). Each field is a
           buffer (B, H, C, *trailing) with C >= L slots; `padded(name)` is the free view
           [:, :, :L]. When the full cache grows, the buffer grows by `grow_by` slots at a
           time, so appending a token is a copy into a free slot, not a reallocation of the
           whole cache; the C - L spare slots are real memory and are reported as padding.
  ragged   heads hold different numbers of entries (Ada-KV, EMS). Each field is flat
           (rows, *trailing), every head owning a run of rows, head by head
           [head (0,0)][head (0,1)]...[head (B-1,H-1)]: its entries, then spare rows. After
           `keep` a head owns exactly its entries (no padding at all); appending to a head
           with no room moves every head into a run with `grow_by` - 1 spare rows (one copy;
           the spare rows are real memory, reported as padding, as in the uniform layout),
           so the next decode steps write one row per head; `reserve(n)` gives every head n
           spare rows at once (generate() calls it for a prefill-only method such as Ada-KV).
           `padded(name)` builds a temporary (B, H, Lmax, *trailing) copy plus a validity
           mask for one computation (never held); `head_rows(name)` gives each head's entries
           as views, no copy.

After an eviction (`keep`) the buffer is exactly the size of what is kept (no spare slots),
so a compressed cache's bytes are exactly budget x per-entry bytes. A decode step's eviction
(`evict_in_place`: the newest entry overwrites the dropped one, nothing is compacted) keeps
one spare slot per head instead, reported as padding, and leaves the slots out of position
order until `sort_by_position`; so does `drop_oldest(1)` (a first-in-first-out store's decode
step), which keeps the order.
"""

from __future__ import annotations

import math

import torch

KINDS = ("keys", "values", "positions", "quant_meta", "method_state", "padding")


def mask_slots(mask: torch.Tensor, m: int | None = None) -> torch.Tensor:
    """(B, H, m) the slots where mask (B, H, L) is True, in slot order; m defaults to the most
    any head has (a head with fewer is padded with slots where mask is False)."""
    m = int(mask.sum(-1).max()) if m is None else m
    return mask.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :m]


class Ragged:
    def __init__(self, batch: int, heads: int, device, grow_by: int = 16):
        self.lengths = torch.zeros(batch, heads, dtype=torch.long, device=device)  # (B, H)
        self.grow_by = grow_by
        # plain-int summary of `lengths`, kept in step with it (saves a tensor reduction per call)
        self._uniform_len: int | None = 0  # L when every head holds L entries, else None
        self._max_len = 0
        self.fields: dict[str, torch.Tensor] = {}  # name -> (B, H, C, *trailing) or (N, *trailing)
        self.trailing: dict[str, tuple] = {}
        self.kinds: dict[str, str] = {}  # name -> accounting kind (one of KINDS)
        self.fills: dict[str, float] = {}  # value given to new entries a caller does not provide
        self.quantized: dict[str, tuple] = {}  # name -> (bits, group, dim, dtype) of low-bit fields
        self.backend = "torch"  # the cache's backend (set by it): "triton" packs with fast/quant.py
        self.bits: int | None = None  # the bits keys and values are stored at here (None: the model dtype)
        self.ordered = True  # entries in position order in every head (False after evict_in_place)
        self._caps: torch.Tensor | None = None  # ragged layout: (B*H,) rows each head owns; None: its entries only
        self._spare = 0  # ragged layout: spare rows after every head's entries (all alike; 0 when _caps is None)

    # ------------------------------------------------------------------ declaring fields
    def add_field(self, name: str, kind: str, trailing: tuple, dtype: torch.dtype, fill: float = 0.0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if name in self.fields:
            raise ValueError(f"field {name!r} already exists")
        lead = (self.batch, self.heads, self.capacity) if self.uniform else \
            (int((self.lengths.flatten() if self._caps is None else self._caps).sum()),)
        self.fields[name] = torch.full((*lead, *trailing), fill, dtype=dtype, device=self.lengths.device)
        self.trailing[name], self.kinds[name], self.fills[name] = tuple(trailing), kind, fill

    def add_quantized_field(self, name: str, kind: str, dim: int, bits: int, group: int, dtype: torch.dtype):
        """A (dim,) field stored as packed `bits`-bit codes plus per-group fp16 scale and zero
        (nanokv/quant.py): three real tensors name.codes, name.scale, name.zero. `padded(name)`
        dequantizes to `dtype`, `append(name=x)` quantizes; `keep` moves the three together."""
        from .quant import check_bits, check_group, packed_bytes

        check_bits(bits)
        check_group(dim, group)
        self.add_field(f"{name}.codes", kind, (packed_bytes(dim, bits),), torch.uint8)
        self.add_field(f"{name}.scale", "quant_meta", (dim // group,), torch.float16)
        self.add_field(f"{name}.zero", "quant_meta", (dim // group,), torch.float16)
        self.quantized[name] = (bits, group, dim, dtype)

    def has(self, name: str) -> bool:
        return name in self.fields or name in self.quantized

    def drop_field(self, name: str):
        if name in self.quantized:
            del self.quantized[name]
            for part in ("codes", "scale", "zero"):
                self.drop_field(f"{name}.{part}")
            return
        for d in (self.fields, self.trailing, self.kinds, self.fills):
            del d[name]

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

    @property
    def capacity(self) -> int:
        """Slots per head allocated in the uniform layout (0 when there are no fields yet)."""
        if not self.fields or not self.uniform:
            return self._max_len
        return next(iter(self.fields.values())).shape[2]

    def valid_mask(self) -> torch.Tensor:
        """(B, H, Lmax) bool: True where a padded slot holds a real entry."""
        slots = torch.arange(self.max_len, device=self.lengths.device)
        return slots[None, None, :] < self.lengths[:, :, None]

    def padded(self, name: str, fill: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Field `name` as (B, H, Lmax, *trailing); a view when lengths are uniform
        (a dequantized copy for a low-bit field, written into `out` when given)."""
        if name in self.quantized:
            from .quant import dequantize_packed

            bits, _, dim, dtype = self.quantized[name]
            return dequantize_packed(self.padded(f"{name}.codes"), self.padded(f"{name}.scale"),
                                     self.padded(f"{name}.zero"), bits, dim, dtype, out)
        t = self.fields[name]
        if self.uniform:
            return t[:, :, : self._uniform_len]
        out = torch.full((self.batch, self.heads, self.max_len, *self.trailing[name]), fill,
                         dtype=t.dtype, device=t.device)
        slots = self.valid_mask().flatten().nonzero().squeeze(1)  # (N,) each entry's padded slot
        rows = self._held_rows()
        out.view(-1, *self.trailing[name]).index_copy_(0, slots, t if rows is None else t.index_select(0, rows))
        return out

    def _held_rows(self) -> torch.Tensor | None:
        """Ragged layout with spare rows: (N,) the storage rows that hold entries, head by head;
        None when every row does (after keep)."""
        if self._caps is None:
            return None
        n = self.lengths.flatten()  # (B*H,) entries of each head
        shift = self.head_starts() - (torch.cumsum(n, 0) - n)  # first row - first entry's index
        return torch.arange(int(n.sum()), device=n.device) + torch.repeat_interleave(shift, n)

    def flat(self, name: str) -> torch.Tensor:
        """Field `name` as (N, *trailing), entries grouped head by head."""
        if name in self.quantized:
            return self.padded(name)[self.valid_mask()]
        if self.uniform:
            return self.padded(name).reshape(-1, *self.trailing[name])
        rows = self._held_rows()
        return self.fields[name] if rows is None else self.fields[name].index_select(0, rows)

    def head_starts(self) -> torch.Tensor:
        """Ragged layout: (B*H,) the first storage row of every head (head (0, 0) first)."""
        caps = self.lengths.flatten() if self._caps is None else self._caps
        return torch.cumsum(caps, 0) - caps

    def head_rows(self, name: str) -> tuple:
        """Ragged layout: field `name` of every head as its own (L_h, *trailing) tensor, a view of
        the flat storage (B * H of them, head (0, 0) first; nothing is copied)."""
        n = self.lengths.flatten().tolist()
        if self._caps is None:
            return self.fields[name].split(n)
        return tuple(run[:m] for run, m in zip(self.fields[name].split(self._caps.tolist()), n))

    def set_padded(self, name: str, value: torch.Tensor):
        """Write field `name` from a padded (B, H, Lmax, *trailing) tensor (padding ignored)."""
        if name in self.quantized:
            for part, value in self._quantize(name, value).items():
                self.set_padded(part, value)
            return
        t = self.fields[name]
        if self.uniform:
            t[:, :, : self._uniform_len] = value
        else:
            rows = self._held_rows()
            if rows is None:
                self.fields[name] = value.to(t.dtype)[self.valid_mask()]
            else:
                t.index_copy_(0, rows, value.to(t.dtype)[self.valid_mask()])

    def pack(self, value: torch.Tensor, bits: int, group: int):
        """(codes, scale, zero) of value: nanokv.quant.quantize_packed, or with the Triton
        backend fast/quant.py's kernel (bit-identical)."""
        from .quant import quantize_packed

        if self.backend == "triton" and value.numel():
            from fast.quant import applies, quantize_pack

            if applies(bits, group):  # else the torch reference: the same bytes either way
                return quantize_pack(value, bits, group)
        return quantize_packed(value, bits, group)

    def _quantize(self, name, value):
        bits, group, _, _ = self.quantized[name]
        codes, scale, zero = self.pack(value, bits, group)
        return {f"{name}.codes": codes, f"{name}.scale": scale, f"{name}.zero": zero}

    def _set_lengths(self, lengths: torch.Tensor):
        self.lengths = lengths
        self._max_len = int(lengths.max()) if lengths.numel() else 0
        self._uniform_len = self._max_len if bool((lengths == self._max_len).all()) else None

    # ------------------------------------------------------------------ growing and shrinking
    def _grow(self, C: int):
        """Uniform layout: move every buffer into one of C >= L slots per head (one copy)."""
        L = self._uniform_len
        for name, t in self.fields.items():
            buf = torch.empty((self.batch, self.heads, C, *self.trailing[name]), dtype=t.dtype, device=t.device)
            buf[:, :, :L] = t[:, :, :L]
            self.fields[name] = buf

    def reserve(self, more: int):
        """Make room for `more` new entries in every head in one copy (no-op when there is room
        already): more slots per head (uniform layout), or more spare rows after every head's
        entries (ragged). The spare room counts as padding until used; the next eviction (`keep`)
        shrinks the buffers back to what is kept."""
        if not self.fields or more <= 0:
            return
        if self.uniform and self._uniform_len + more > self.capacity:
            self._grow(self._uniform_len + more)
        elif not self.uniform and self._spare < more:
            self._spread(more)

    def _spread(self, room: int):
        """Ragged layout: move every head into a run of its entries plus `room` spare rows (one
        copy; every head gets the same room, so that all fill together)."""
        B, H, n_old = self.batch, self.heads, self.lengths.flatten()  # (B*H,) entries of each head
        rows = self._held_rows()  # where the old entries are (None: rows 0..N-1)
        caps = n_old + room  # (B*H,) rows of each head's run
        start = torch.cumsum(caps, 0) - caps  # (B*H,) first row of each head
        head_of_row = torch.repeat_interleave(torch.arange(B * H, device=start.device), n_old)
        rank = torch.arange(head_of_row.numel(), device=start.device) - (torch.cumsum(n_old, 0) - n_old)[head_of_row]
        for name, t in self.fields.items():
            out = torch.empty((int(caps.sum()), *self.trailing[name]), dtype=t.dtype, device=t.device)
            self.fields[name] = out.index_copy_(0, start[head_of_row] + rank, t if rows is None else t[rows])
        self._caps, self._spare = caps, room

    def append(self, **new: torch.Tensor):
        """Append T entries to every head. Each given tensor is (B, H, T, *trailing);
        fields not given get their fill value."""
        unknown = set(new) - set(self.fields) - set(self.quantized)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; fields: {sorted(self.fields)}")
        low = [n for n in new if n in self.quantized]
        if len(low) == 2 and self.quantized[low[0]] == self.quantized[low[1]]:  # keys and values alike: one
            codes, scale, zero = self.pack(torch.stack([new.pop(n) for n in low]), *self.quantized[low[0]][:2])
            for i, name in enumerate(low):  # call (groups are per row, so the same codes as two calls)
                new.update({f"{name}.codes": codes[i], f"{name}.scale": scale[i], f"{name}.zero": zero[i]})
        else:
            for name in low:
                new.update(self._quantize(name, new.pop(name)))
        B, H, T = next(iter(new.values())).shape[:3]
        if self.uniform:
            L, C = self._uniform_len, self.capacity
            if L + T > C:  # grow every buffer to the next multiple of grow_by slots
                self._grow(self.grow_by * math.ceil((L + T) / self.grow_by))
            for name, t in self.fields.items():
                if name in new:
                    t.narrow(2, L, T).copy_(new[name])
                else:
                    t.narrow(2, L, T).fill_(self.fills[name])
            self.lengths = self.lengths + T
            self._uniform_len, self._max_len = L + T, L + T
            return
        # ragged: each head's new entries go to its spare rows; when a head has too few, every
        # head first moves into a run with grow_by - 1 spare rows after them (one copy)
        if self._spare < T:
            self._spread(T + self.grow_by - 1)
        start, n_old = self.head_starts(), self.lengths.flatten()  # (B*H,) each head's first row and entries
        new_dst = ((start + n_old)[:, None] + torch.arange(T, device=start.device)).flatten()  # (B*H*T,)
        for name, t in self.fields.items():
            if name in new:
                t.index_copy_(0, new_dst, new[name].to(t.dtype).flatten(0, 2))
            else:
                t.index_fill_(0, new_dst, self.fills[name])
        # every head gains T entries: the lengths stay unequal and the longest grows by T
        self.lengths, self._max_len, self._spare = self.lengths + T, self._max_len + T, self._spare - T
        if self._spare == 0 and self.grow_by == 1:  # every run is full: the flat layout (no row counts)
            self._caps = None  # (_spare is 0 already)

    def evict_in_place(self, slots: torch.Tensor):
        """Uniform layout: drop the entry at slot `slots[b, h]` (B, H) of every head by writing
        the head's last entry (its newest) over it; every head gets one entry shorter. No other
        entry moves and no buffer is built (a decode step of an eviction method: one token in,
        one out), so the slots stop being in position order (`ordered` False) until
        `sort_by_position`. The freed last slot stays allocated for the next token (reported as
        padding): buffers hold exactly one spare slot per head."""
        B, H, L, C = self.batch, self.heads, self._uniform_len, self.capacity
        first = C * torch.arange(B * H, device=slots.device)  # (B*H,) each head's first row in (B*H*C, ...)
        dst, src = first + slots.flatten(), first + (L - 1)
        for name, t in self.fields.items():
            rows = t.view(B * H * C, *self.trailing[name])
            rows.index_copy_(0, dst, rows.index_select(0, src))
        self.lengths = self.lengths - 1
        self._uniform_len = self._max_len = L - 1
        self.ordered = False
        if C > L:  # the first such step: shrink to the one spare slot (a copy, once)
            self._grow(L)

    def drop_oldest(self, n: int):
        """Drop the first n entries of every head (its n oldest: slots in position order). One entry
        of a uniform store (a decode step of a first-in-first-out residual, KIVI's values): the
        others move down one slot within the same buffers and the freed last slot stays allocated
        for the next token (padding, one spare slot per head, as after evict_in_place); otherwise
        `keep` compacts the store."""
        L, C = self._uniform_len, self.capacity
        if n != 1 or not L or not self.ordered:  # (L None: ragged)
            mask = torch.ones(self.batch, self.heads, self.max_len, dtype=torch.bool, device=self.lengths.device)
            mask[:, :, :n] = False
            return self.keep(mask)
        for t in self.fields.values():
            t[:, :, :L - 1] = t[:, :, 1:L].clone()  # the two ranges overlap: read them out first
        self.lengths = self.lengths - 1
        self._uniform_len = self._max_len = L - 1
        if C > L:  # the first such step: shrink to the one spare slot (a copy, once)
            self._grow(L)

    def sort_by_position(self):
        """Put every head's entries back in position order (after `evict_in_place`); one copy per
        field, buffers exactly the size of what is held."""
        if not self.ordered:
            self._take_slots(torch.argsort(self.padded("pos"), dim=-1, stable=True))  # (B, H, L)
            self.ordered = True

    def _take_slots(self, slots: torch.Tensor):
        """Uniform layout: every field becomes each head's entries at `slots` (B, H, n), in that
        order: one index_select of whole rows of its (B*H*C, *trailing) view, n slots per head."""
        B, H, C, n = self.batch, self.heads, self.capacity, slots.size(-1)
        rows = (slots + C * torch.arange(B * H, device=slots.device).view(B, H, 1)).flatten()  # (B*H*n,)
        for name, t in self.fields.items():
            self.fields[name] = t.flatten(0, 2).index_select(0, rows).view(B, H, n, *self.trailing[name])

    def keep(self, mask: torch.Tensor):
        """Keep the entries where mask (B, H, Lmax) is True (padded slots must be False).
        The order of the kept entries is unchanged; buffers shrink to exactly what is kept."""
        if mask.shape != (self.batch, self.heads, self.max_len):
            raise ValueError(f"keep mask must be {(self.batch, self.heads, self.max_len)}, got {tuple(mask.shape)}")
        counts = mask.sum(dim=-1)  # (B, H)
        n = int(counts[0, 0]) if counts.numel() else 0
        if self.uniform and bool((counts == n).all()):  # uniform stays uniform (and has no padded slot)
            kept = mask.flatten().nonzero().squeeze(1)  # (B*H*n,) b*H*L + h*L + slot, in order
            self._take_slots((kept % max(self.max_len, 1)).view(self.batch, self.heads, n))
            self.lengths, self._uniform_len, self._max_len = counts, n, n
            self._caps, self._spare = None, 0
            return
        valid = self.valid_mask()
        if (mask & ~valid).any():
            raise ValueError("keep mask selects padded slots that hold no entry")
        flat = mask[valid]  # (N,) in the flat (b, h, slot) order
        kept = {name: self.flat(name)[flat] for name in self.fields}
        self._set_lengths(counts)
        self._caps, self._spare = None, 0  # each head owns exactly its kept entries
        for name, t in kept.items():
            self.fields[name] = t.view(self.batch, self.heads, self._uniform_len, *self.trailing[name]) \
                if self.uniform else t

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for name, t in self.fields.items():
            total = t.numel() * t.element_size()
            if self.uniform:
                used = total if not self.capacity else total * self._uniform_len // self.capacity
            else:
                used = total if not t.shape[0] else total * int(self.lengths.sum()) // t.shape[0]
            out[self.kinds[name]] += used
            out["padding"] += total - used  # spare slots (uniform) or spare rows (ragged)
        out["positions"] += self.lengths.numel() * self.lengths.element_size()  # index metadata
        if self._caps is not None:  # (and the ragged layout's rows per head)
            out["positions"] += self._caps.numel() * self._caps.element_size()
        return out


class Layer(Ragged):
    """One layer of a cache: its main store plus the facts the cache declares for methods.
    Methods read these; only the cache writes them."""

    def __init__(self, batch: int, heads: int, device, grow_by: int, index: int, dtype: torch.dtype,
                 group: int = 1, inv_freq: torch.Tensor | None = None):
        super().__init__(batch, heads, device, grow_by)
        self.index = index  # the layer's number in the model
        self.dtype = dtype  # the model's dtype (keys and values are read back in it)
        self.group = group  # query heads per stored (key-value) head: 1, or G for grouped-query attention
        self.inv_freq = inv_freq  # (D/2,) the model's rotary frequencies (keys arrive rotated), else None; not cache memory
        self.n_seen = 0  # tokens this layer saw before the current piece (kept or not)
        self.n_new = 0  # tokens in the current piece
        self.segments: dict[str, Ragged] = {}  # further stores a method adds (low-bit tiers, residuals)

    def nearest_center(self, k, v, centers, rows, nonneg: bool = True):
        """nanokv.method.nearest_center on this layer's backend (Triton: fast/merge.py)."""
        from .method import nearest_center

        return nearest_center(k, v, centers, rows, nonneg, self.backend)

