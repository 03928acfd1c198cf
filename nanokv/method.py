"""
The two base classes every compression method builds on.

`Method`: the cache runs one fixed pipeline for every layer of every forward call
(KVCache.attend, nanokv/cache.py); a method fills in hooks and never calls back into the cache:

    q, k = method.prepare(layer, q, k)            rescale queries and keys (MiKV's balancer)
    for each piece in method.pieces(layer, T):    [T] (one pass), or shorter pieces (Scissorhands
                                                  splits its prompt where token-by-token reading
                                                  would evict: a mode the cache runs)
        method.store(layer, k, v, pos)            store the new tokens (briefly budget + T)
        parts = method.gather(layer, fresh)       what attention reads (packed tiers, ...)
        out, probs = attention over the parts     THE attention, its kernel chosen by the cache
        scores = method.observe(layer, probs, q)  update per-token state; may return scores
        method.compress(layer, scores)            evict / merge / quantize back to the budget

so after every call a head keeps at most `budget` tokens. A method overrides only the hooks it
needs; what one hook hands the next travels as a return value, not as state on the method.
The layer (`nanokv.ragged.Layer`) is the cache's storage of one layer: padded tensors of the
stored fields (`layer.padded("k")`, (B, H, L, D)), the method's own declared per-token fields,
and a few declared facts (`index`, `n_seen` tokens before this piece, `n_new` in it, `dtype`).

`ScoredEviction`: a method that only defines `score(layer)` (higher = more worth keeping)
gets the rest from here: protected first tokens (`n_sink`) and recent tokens (`window`),
top-k of the remaining budget, and stable tie-breaking (equal scores keep the more recent
token). A complete method can then be a few lines (see nanokv/methods/knorm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import as_int, dequantize_packed
from .ragged import KINDS, Ragged, mask_slots


def _check_int(name, value, low, high=None, allow_none=False):
    """Validate an integer argument and return it as a Python int (None passes with allow_none)."""
    if value is None and allow_none:
        return None
    value = as_int(name, value)
    if value < low or (high is not None and value > high):
        hi = "" if high is None else f", {high}"
        rng = f"[{low}{hi}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def _check_number(name, value, low, high=None, low_open=False, note=""):
    """value must be a real number in [low, high] ((low, high] with low_open; no upper bound
    with high None). Bools, strings and NaN are rejected with the argument's name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:  # NaN fails every comparison
        left = "(" if low_open else "["
        allowed = f"in {left}{low}, {high}]" if high is not None else f"{'>' if low_open else '>='} {low}"
        raise ValueError(f"{name} must be {allowed}{note}, got {value!r}")


def store_part(store: Ragged, k: str = "k", v: str = "v"):
    """(keys, values, positions, validity) of a full-precision store, padded (B, H, L, ...): views
    of a uniform store; for ragged heads a RaggedPart, which pads only when indexed."""
    if not store.uniform:
        return RaggedPart(store, k, v)
    return store.padded(k), store.padded(v), store.padded("pos", fill=-1), None


class RaggedPart:
    """A full-precision store whose heads hold different numbers of entries (Ada-KV, adaptive EMS)
    as an attention part. Indexed like a part, (k, v, k_pos, valid), it builds each padded copy
    when first asked; the cache's torch attention over it alone reads `heads()` instead: every
    head's own rows, views of the flat store (ragged_attention in nanokv/cache.py: no copy)."""

    def __init__(self, store: Ragged, k: str = "k", v: str = "v"):
        self.store, self.names, self._padded = store, (k, v, "pos"), {}

    def __getitem__(self, i):
        if i not in (0, 1, 2, 3):
            raise IndexError(i)  # (so that k, v, k_pos, valid = part unpacks it)
        if i not in self._padded:
            self._padded[i] = self.store.valid_mask() if i == 3 else \
                self.store.padded(self.names[i], fill=-1 if i == 2 else 0.0)
        return self._padded[i]

    def flat(self) -> tuple:
        """(k (rows, D), v (rows, D), starts (B*H,), lengths (B*H,), Lmax): the store as held, each
        head's entries at rows starts[i] .. starts[i] + lengths[i] - 1 (spare rows after them);
        the Triton decode kernel reads it so."""
        st = self.store
        return st.fields[self.names[0]], st.fields[self.names[1]], st.head_starts(), st.lengths.flatten(), st.max_len

    def heads(self, positions: bool = True):
        """(k (L_h, D), v (L_h, D), pos (L_h,)) of every (batch row, head), row-major (without pos
        when positions is False)."""
        return zip(*(self.store.head_rows(name) for name in self.names[:3 if positions else 2]))


class PackedPart:
    """An attention part held packed in low bits. Subclasses give `D`, `dtype`, `positions()`
    (B, H, n) and `write_into(k_out, v_out)`, which dequantizes keys and values into two
    (B, H, n, D) tensors (views into attention's concatenated buffers: see concat_parts).
    Indexed like a part, (k, v, k_pos, valid), it dequantizes into new tensors, once."""

    _kv = None

    def __getitem__(self, i):
        if i == 2:
            return self.positions()
        if i == 3:
            return self.valid()
        if self._kv is None:
            pos = self.positions()
            self._kv = torch.empty(2, *pos.shape, self.D, dtype=self.dtype, device=pos.device)
            self.write_into(self._kv[0], self._kv[1])
        return self._kv[i]

    def valid(self):
        return None  # (B, H, n) bool where heads hold different numbers of entries


class LowBitPart(PackedPart):
    """A store of packed low-bit keys and values (its first `n` entries per head, all when n is
    None; n needs equal head lengths) as an attention part: the reference dequantizes it (code *
    scale + zero); the Triton backend reads the packed codes (`packed(name)`) directly instead
    (kernel 2, fast/decode_quant.py)."""

    def __init__(self, store: Ragged, n: int | None = None):
        self.store, self.n = store, store.max_len if n is None else n
        _, _, self.D, self.dtype = store.quantized["k"]

    def packed(self, name: str) -> torch.Tensor:
        """Field `name` ("k.codes", "v.scale", ...) of the part's entries, (B, H, n, ...)."""
        return self.store.padded(name)[:, :, :self.n]

    def positions(self):
        return self.store.padded("pos", fill=-1)[:, :, :self.n]

    def valid(self):
        return None if self.store.uniform or self.n < self.store.max_len else self.store.valid_mask()

    def write_into(self, k_out: torch.Tensor, v_out: torch.Tensor):
        for name, out in (("k", k_out), ("v", v_out)):
            bits, _, D, dtype = self.store.quantized[name]
            if self.store.uniform:
                codes, scale, zero = (self.packed(f"{name}.{x}") for x in ("codes", "scale", "zero"))
                dequantize_packed(codes, scale, zero, bits, D, dtype, out)
            else:  # ragged heads: the store builds the padded copy
                out.copy_(self.store.padded(name)[:, :, :self.n])


class Scratch:
    """One buffer that every layer of a forward pass reuses for its concatenated keys and values
    (KVCache drops it after the last layer, so nothing is held between calls). The CPU has no
    caching allocator: a new multi-megabyte buffer per layer costs page faults, which on a
    virtual machine take as long as the dequantization itself."""

    buf = None

    def take(self, numel: int, dtype, device) -> torch.Tensor:
        b = self.buf
        if (b is None or b.numel() < numel or b.dtype != dtype or b.device != device
                or b.is_inference() != torch.is_inference_mode_enabled()):  # an inference tensor is read-only outside
            self.buf = torch.empty(numel, dtype=dtype, device=device)
        return self.buf[:numel]


def concat_parts(parts: list, scratch: Scratch):
    """One part (k, v, k_pos, valid) from several, in order. Keys and values are written once
    into one buffer (from `scratch`); a PackedPart dequantizes straight into its slice (no copy
    after)."""
    pos = [p[2] for p in parts]  # (B, H, n_i) each: no dequantization needed
    p0 = parts[0]  # every part holds the model's dtype
    D, dtype = (p0.D, p0.dtype) if isinstance(p0, PackedPart) else (p0[0].size(-1), p0[0].dtype)
    B, H, L = pos[0].size(0), pos[0].size(1), sum(x.size(2) for x in pos)
    k, v = scratch.take(2 * B * H * L * D, dtype, pos[0].device).view(2, B, H, L, D)  # (B, H, L, D) each
    start = 0
    for p, x in zip(parts, pos):
        end = start + x.size(2)
        if isinstance(p, PackedPart):
            p.write_into(k[:, :, start:end], v[:, :, start:end])
        else:
            k[:, :, start:end], v[:, :, start:end] = p[0], p[1]
        start = end
    valid = None
    if any(p[3] is not None for p in parts):
        valid = torch.cat([torch.ones_like(x, dtype=torch.bool) if p[3] is None else p[3]
                           for p, x in zip(parts, pos)], dim=2)
    return k, v, torch.cat(pos, dim=2), valid


class Method:
    """Keeps everything (the full cache). Base class of every method."""

    name = "full"
    # "never", "prefill", "decode", "prefill+decode": the README table, and cache.reserve (only
    # "never" and "prefill" methods hold a growing store after the prefill, worth reserving);
    # "prefill" means the layer's first call only: observe gets probs None after it
    compresses_at = "never"
    takes_budget = True  # every method but the full cache is built as cls(budget=b, ...)
    lossy = False  # True: differs from the full cache even when nothing is evicted (the quantizers)
    needs_probs = True  # False: observe() never reads the probabilities (attention then never builds them)
    # None: observe() may read the whole (B, H, T, L) probability matrix of a prefill. An int w:
    # it reads only column sums and the last w rows, and gets a ProbStats holding just those on
    # every backend when a call has several queries (the Triton prefill then never builds the matrix)
    probs_rows: int | None = None

    def __init__(self, budget: int | None = None):
        budget = _check_int("budget", budget, 1, allow_none=True)
        self.budget = budget

    @classmethod
    def scaled(cls, budget: int | None, **kwargs) -> "Method":
        """This method at `budget`, its windows and sinks scaled down when their paper defaults
        do not fit (the evaluation and the test matrix build every method this way)."""
        return cls(**kwargs) if not cls.takes_budget else cls(budget=budget, **kwargs)

    # ------------------------------------------------------------------ hooks
    def check_config(self, config):
        """Reject parameters that cannot work with this model (called by KVCache)."""

    def init_layer(self, layer: Ragged, layer_idx: int):
        """Declare per-token fields (layer.add_field) this method keeps."""

    def prepare(self, layer: Ragged, q, k):
        """Queries and keys (B, H, T, D) as attention should see them (default: unchanged)."""
        return q, k

    def pieces(self, layer: Ragged, T: int) -> list[int]:
        """How the cache splits a call of T tokens: [T] (one pass, the default) or piece lengths summing to T."""
        return [T]

    def store(self, layer: Ragged, k, v, pos):
        """Store the new tokens' keys, values and positions (k, v: (B, H, T, D); pos: (T,) int32)."""
        B, H, T, _ = k.shape
        layer.append(k=k, v=v, pos=pos.expand(B, H, T))

    def gather(self, layer: Ragged, fresh=None) -> list:
        """What attention reads: a list of parts (k, v, k_pos, valid), padded (B, H, L, ...).
        By default the layer's own full-precision entries; quantized methods add dequantized
        segments. fresh: (k, v, pos) of this call's tokens so far, exact (None between calls)."""
        return [store_part(layer)]

    def observe(self, layer: Ragged, probs: torch.Tensor, q: torch.Tensor):
        """probs (B, H, T, Lmax) fp32: attention of the T new queries over every stored entry (a
        ProbStats answering for it in a call of several queries when the method declares
        probs_rows; None when needs_probs is False). Update per-token state; return this call's
        scores for compress (or None)."""
        return None

    def compress(self, layer: Ragged, scores=None):
        """Bring every head of the layer back within its budget (scores: what observe returned)."""

    def state_nbytes(self) -> dict[str, int]:
        """Bytes of method state held outside the per-token fields (per kind)."""
        return dict.fromkeys(KINDS, 0)

    def reset(self):
        """Forget any state held outside the layers (the layers themselves are dropped by the cache)."""

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and k not in ("needs_probs", "probs_rows", "evicts_in_place"))
        return f"{type(self).__name__}({args})"


class ScoredEviction(Method):
    """Evict the lowest-scoring tokens, protecting `n_sink` first and `window` most recent ones.

    Kept set per head, when it holds more than `budget` tokens:
        protected = the n_sink oldest entries and the window newest entries
        kept      = protected + the (budget - |protected|) best remaining entries by score,
                    ties broken by position (the more recent entry wins)
    Subclasses implement score(layer) -> (B, H, Lmax) float, higher = keep (or return this
    call's scores from observe, as TOVA does); merging methods also merge(layer, keep, score).
    How: a prefill (or any piece over budget by more than one) ranks every entry (top_k_mask)
    and compacts the store; a decode step drops one entry per head, found with an argmin, and
    writes the new token into its slot (evict: Ragged.evict_in_place), so the slots stop being
    in position order (ARCHITECTURE.md, "Slot order"). Both choose the same entries.
    """

    name = "scored"
    compresses_at = "prefill+decode"
    evicts_in_place = True  # False: every eviction compacts the store (slots stay in position order)

    def __init__(self, budget: int, n_sink: int = 0, window: int = 0):
        budget = _check_int("budget", budget, 1)
        n_sink = _check_int("n_sink", n_sink, 0)
        window = _check_int("window", window, 0)
        if n_sink + window > budget:
            raise ValueError(
                f"n_sink + window ({n_sink} + {window}) must be <= budget ({budget}): "
                "the protected tokens must fit in the budget"
            )
        super().__init__(budget)
        self.n_sink, self.window = n_sink, window

    def score(self, layer: Ragged) -> torch.Tensor:
        raise NotImplementedError

    def compress(self, layer: Ragged, scores=None):
        if layer.max_len > self.budget:
            score = self.score(layer) if scores is None else scores  # (B, H, L)
            keep = self.keep_mask(layer, score, self.budget)  # (B, H, L)
            self.merge(layer, keep, score)
            self.evict(layer, keep)

    def merge(self, layer: Ragged, keep: torch.Tensor, score: torch.Tensor):
        """Fold the entries `keep` drops into kept ones before they go (CaM, D2O, EMS; `score`:
        what keep was chosen by); here: nothing."""

    def keep_mask(self, layer: Ragged, score: torch.Tensor, budget) -> torch.Tensor:
        """(B, H, Lmax) bool: protected entries plus the top-scoring rest, `budget` per head
        (an int, or a (B, H) tensor of per-head budgets). At a decode step (one new token,
        budget + 1 held by every head) the one entry to drop is found without sorting."""
        if self._one_out(layer, budget):
            slot = self.evicted_slot(layer, score)  # (B, H)
            return torch.ones_like(score, dtype=torch.bool).scatter_(-1, slot[..., None], False)
        return top_k_mask(layer.lengths, score, budget, self.n_sink, self.window)

    def evict(self, layer: Ragged, keep: torch.Tensor):
        """Hold only the entries where keep (B, H, Lmax) is True: at a decode step in place (the
        dropped entry's slot takes the newest token: Ragged.evict_in_place), else compacting.
        In place assumes keep drops exactly one entry per head (keep_mask's decode-step mask); a
        subclass whose mask may drop 0 or 2 from a head (EMS's adaptive heads) turns it off."""
        if self.evicts_in_place and self._one_out(layer, self.budget):
            layer.evict_in_place((~keep).byte().argmax(dim=-1))  # (B, H) the one dropped slot
        else:
            layer.keep(keep)

    @staticmethod
    def _one_out(layer: Ragged, budget) -> bool:
        return isinstance(budget, int) and layer.n_new == 1 and layer.uniform and layer.max_len == budget + 1

    def evicted_slot(self, layer: Ragged, score: torch.Tensor) -> torch.Tensor:
        """(B, H) the slot of the one entry each head drops when it holds budget + 1: the entry
        top_k_mask drops, found by position (after in-place evictions the slots are no longer in
        position order). The n_sink oldest and window newest entries are the positions < n_sink
        and > newest - window: every head holds those, since every token is stored when it
        arrives and they were protected ever since."""
        pos = layer.padded("pos")  # (B, H, L) int32
        newest = layer.n_seen + layer.n_new - 1  # the position of the token just stored
        return lowest_slot(score, pos, (pos < self.n_sink) | (pos > newest - self.window))


def lowest_slot(score, pos, protected) -> torch.Tensor:
    """(B, H) the slot of each head's lowest score outside `protected` (B, H, L), ties to the
    oldest position: the one entry top_k_mask would drop from a head holding budget + 1, found
    with an argmin and by position (the slots need not be in position order)."""
    s = score.float().nan_to_num(nan=float("inf")).masked_fill(protected, float("inf"))  # (B, H, L)
    lowest = s == s.amin(dim=-1, keepdim=True)  # (a NaN score ranks highest, as in top_k_mask's sort)
    return torch.where(lowest, pos, torch.iinfo(pos.dtype).max).argmin(dim=-1)  # ties: the oldest goes


def top_k_mask(lengths, score, budget, n_sink: int = 0, window: int = 0) -> torch.Tensor:
    """Keep mask (B, H, L) of `budget` entries per head: the n_sink oldest and window newest
    entries of each head, then the best by score; equal scores keep the more recent entry.
    lengths (B, H) entries per head; score (B, H, L) over the padded slots."""
    B, H, L = score.shape
    slot = torch.arange(L, device=score.device).expand(B, H, L)
    n = lengths[:, :, None]  # (B, H, 1) entries per head
    protected = (slot < n_sink) | ((slot >= n - window) & (slot < n))
    s = score.float().masked_fill(protected, float("inf"))
    s = s.masked_fill(slot >= n, float("-inf"))  # padding is never kept
    # stable tie-break: flip so that, among equal scores, the later slot comes first
    order = torch.sort(s.flip(-1), dim=-1, descending=True, stable=True).indices
    order = L - 1 - order  # (B, H, L) slots from best to worst
    budget = torch.as_tensor(budget, device=score.device).expand(B, H)
    rank_ok = torch.arange(L, device=score.device)[None, None, :] < budget[:, :, None]
    keep = torch.zeros(B, H, L, dtype=torch.bool, device=score.device)
    keep.scatter_(-1, order, rank_ok)
    return keep & (slot < n)


def nearest_center(k, v, centers, rows, nonneg: bool = True, backend: str = "torch"):
    """The most similar center of every asked token (the merging methods' matching step).
    k, v (B, H, L, D) (v None: keys only); centers, rows (B, H, L) bool. Returns best (B, H, L)
    fp32 and center (B, H, L) long, for the rows asked (-inf and 0 elsewhere):
        sim[t, c] = cos(k_t, k_c)                                   v None (D2O)
        sim[t, c] = max(cos(k_t, k_c), 0) * max(cos(v_t, v_c), 0)   (EMS; nonneg=False: no clamps)
        best[t], center[t] = max, argmax over centers c of sim[t, c]
    This reference builds sim for the asked rows, a (B, H, m, L) matrix (m = the most rows a head
    asks; L x L at a prefill that evicts most tokens); backend="triton" runs fast/merge.py
    (kernel 5), which walks the centers in tiles and never holds it."""
    if backend == "triton":
        from fast.merge import nearest_center as kernel

        return kernel(k, v, centers, rows, nonneg)
    B, H, L, D = k.shape
    t = mask_slots(rows)  # (B, H, m) the asked rows only (one per head at a decode step)
    m = t.size(-1)

    def cos(x):  # (B, H, m, L): x_t . x_c / (|x_t| |x_c|), norms at least 1e-12 (as F.normalize)
        x = x.float()  # (B, H, L, D)
        norm = x.norm(dim=-1).clamp(min=1e-12)  # (B, H, L)
        dots = x.gather(2, t[..., None].expand(B, H, m, D)) @ x.transpose(-1, -2)  # divided after: m x L, not L x D
        return dots / (norm.gather(-1, t)[..., None] * norm[:, :, None, :])

    sim = cos(k)  # (B, H, m, L_c)
    if v is not None:
        sim = sim.clamp(min=0) * cos(v).clamp(min=0) if nonneg else sim * cos(v)
    sim = sim.masked_fill(~centers[:, :, None, :], float("-inf"))
    best_t, center_t = sim.max(dim=-1)  # (B, H, m)
    best = torch.full((B, H, L), float("-inf"), device=k.device).scatter(-1, t, best_t)
    center = torch.zeros(B, H, L, dtype=torch.long, device=k.device).scatter(-1, t, center_t)
    return best.masked_fill(~rows, float("-inf")), center.masked_fill(~rows, 0)
