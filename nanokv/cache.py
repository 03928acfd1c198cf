"""
KVCache: the object a GPT hands its attention to.

    cache = KVCache(model.config, "h2o", budget=64)   # or KVCache(config, H2O(budget=64))
    logits, _ = model(prompt, cache=cache)            # prefill: attend, then compress
    logits, _ = model(next_token, cache=cache)        # decode: attend, then compress

Data flow of one attention layer (see ARCHITECTURE.md): the cache drives, the method decides.

    CausalSelfAttention --q,k,v (B,H,T,D)--> KVCache.attend(layer, q, k, v)
        q, k = method.prepare(layer, q, k)
        for each piece in method.pieces(layer, T):       # [T], or shorter pieces (Scissorhands)
             method.store(layer, k, v, pos)              # store the new tokens
             parts = method.gather(layer, fresh)         # what attention reads
             out, probs = cache.attention_over(q, parts) # ONE attention for all methods, kernel chosen here
             scores = method.observe(layer, probs, q)    # update state from the probabilities
             method.compress(layer, scores)              # evict / merge / quantize down to budget
        <- out (B,H,T,D)

Batch size, device and dtype come from the first call. Every layer is a `Layer` (nanokv/ragged.py:
a ragged store with fields k, v, pos plus whatever per-token state the method declares).
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .method import LowBitPart, Method, PackedPart, RaggedPart, Scratch, concat_parts
from .ragged import KINDS, Layer

BACKENDS = ("torch", "triton")


def reference_attention(q, k, v, q_pos, k_pos, valid=None, with_probs: bool = True):
    """Softmax attention of new queries over the stored entries, causal by original position.

        out   = softmax(q k^T / sqrt(D) + mask) v      mask = -inf where k_pos > q_pos or the slot is padding
        probs = softmax(q k^T / sqrt(D) + mask)        (the scores eviction methods read)

    q (B, Hq, T, D); k, v (B, H, L, D) with Hq = G * H (G = 1, or the group size of grouped-query
    attention: query head i reads key-value head i // G); q_pos (T,); k_pos (B, H, L); valid
    (B, H, L) bool or None. Returns out (B, Hq, T, D) in q's dtype and probs (B, H, T, L) in fp32
    (for G > 1 the mean over the G query heads of each group: the scores a shared key-value head
    is judged by), or None with with_probs=False. out comes from PyTorch's fused
    scaled_dot_product_attention for every method alike (so a method that keeps everything gives
    exactly the full cache's output, and no (B, H, T, L) matrix is built for methods that never
    read probabilities); probs are computed explicitly, in fp32 whatever the model dtype.
    """
    B, Hq, T, D = q.shape
    H = k.size(1)
    G = Hq // H
    # a prompt into an empty cache: the stored entries are exactly the queries' tokens, in order, so
    # "not later tokens" is the causal triangle and the fused kernel needs no (B, H, T, L) mask
    prompt = T > 1 and valid is None and k.size(2) == T and torch.equal(k_pos, q_pos.expand_as(k_pos))
    if prompt:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
        if not with_probs:
            return out, None
    if G > 1:  # grouped-query: the G query heads of a group become G * T query rows of their key-value head
        q = q.reshape(B, H, G * T, D)
    seen = None  # (B, H, G * T, L): True where a query may look; None: everywhere
    if T > 1 or valid is not None:  # a single newest query sees every stored entry
        seen = k_pos[:, :, None, :] <= (q_pos if G == 1 else q_pos.repeat(G))[None, None, :, None]  # not later tokens
        if valid is not None:
            seen &= valid[:, :, None, :]  # nor padded slots
    if not prompt:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        if G > 1:
            out = out.reshape(B, Hq, T, D)
        if not with_probs:
            return out, None
    att = ((q * (1.0 / math.sqrt(D))) @ k.transpose(-2, -1)).float()  # (B, H, G * T, L)
    if seen is not None:
        att.masked_fill_(~seen, float("-inf"))
    probs = torch.softmax(att, dim=-1)
    return out, (probs if G == 1 else probs.view(B, H, G, T, -1).mean(dim=2))


def ragged_attention(q, part, q_pos, with_probs: bool = True):
    """reference_attention over a RaggedPart (heads holding different numbers of entries), one head
    at a time over its own rows: views of the flat store, so no padded (B, H, Lmax, D) copy and no
    padding mask is built. Returns what reference_attention over the padded part returns (out
    (B, Hq, T, D); probs (B, H, T, Lmax) fp32, 0 at padded slots), within float rounding."""
    B, Hq, T, D = q.shape
    H = part.store.heads
    G = Hq // H  # grouped-query: query heads h * G ... h * G + G - 1 read key-value head h
    probs = q.new_zeros(B, H, T, part.store.max_len, dtype=torch.float32) if with_probs else None
    outs = []
    if T == 1 and not with_probs:  # a decode step: each head's one query (G of them) sees every entry, no mask
        for i, (k, v) in enumerate(part.heads(positions=False)):  # (L_h, D) each
            qh = q[i // H, i % H * G:i % H * G + G, 0]  # (G, D)
            outs.append(F.scaled_dot_product_attention(qh[None, None], k[None, None], v[None, None])[0, 0])
        return torch.stack(outs).view(B, Hq, T, D), None
    for i, (k, v, pos) in enumerate(part.heads()):  # (L_h, D), (L_h, D), (L_h,)
        b, h = divmod(i, H)
        qh = q[b:b + 1, h * G:h * G + G]  # (1, G, T, D)
        out, p = reference_attention(qh, k[None, None], v[None, None], q_pos, pos[None, None], None, with_probs)
        outs.append(out)  # (1, G, T, D)
        if with_probs:
            probs[b, h, :, :k.size(0)] = p[0, 0]
    return torch.cat(outs, dim=1).view(B, Hq, T, D), probs


class ProbStats:
    """What a method that declares `probs_rows = w` is given in place of the (B, H, T, L)
    probability matrix of a call with T > 1 queries (a prefill or a chunk; a decode step's matrix
    is one row, given as it is): its column sums and its last min(w, T) rows. The cache hands it
    on every backend (built from the matrix on torch, by kernel 3 on Triton without ever building
    the matrix), so a read the declaration does not cover fails on CPU as it would on a GPU.
    The reads it answers:
        probs.shape, probs.sum(dim=2)                   column sums (H2O, CaM, D2O, EMS, MiKV)
        probs[..., a:b]                                 some keys only (MiKV's tiers)
        probs[:, :, i(, keys)], probs[:, :, s:(, keys)] rows among the last w (TOVA, SnapKV, EMS)
    Any other read raises NotImplementedError."""

    def __init__(self, colsum, rows, T: int):
        self.colsum, self.rows, self.T = colsum, rows, T  # (B, H, L), (B, H, w, L)
        B, H, L = colsum.shape
        self.shape, self.device = torch.Size((B, H, T, L)), colsum.device

    @classmethod
    def of(cls, probs: torch.Tensor, rows: int) -> "ProbStats":
        """The column sums and last `rows` rows of a (B, H, T, L) matrix."""
        T = probs.size(2)
        return cls(probs.sum(dim=2), probs[:, :, T - min(rows, T):], T)

    def sum(self, dim):
        if dim not in (2, -2):
            raise NotImplementedError("ProbStats sums over the queries (dim=2) only")
        return self.colsum

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice):  # some keys, all queries
            return ProbStats(self.colsum[..., idx[1]], self.rows[..., idx[1]], self.T)
        T, w, full = self.T, self.rows.size(2), slice(None)
        if len(idx) in (3, 4) and idx[0] == full and idx[1] == full:
            q, keys = idx[2], (idx[3] if len(idx) == 4 else full)
            if type(q) is int and -T <= q < T and q % T >= T - w:  # one of the last w queries
                return self.rows[:, :, q % T - (T - w)][..., keys]
            if isinstance(q, slice) and q.stop is None and q.step is None and type(q.start) is int:
                start = max(q.start + T, 0) if q.start < 0 else q.start
                if T - w <= start <= T:  # the last T - start queries
                    return self.rows[:, :, start - (T - w):][..., keys]
        raise NotImplementedError(f"ProbStats keeps column sums and the last {w} of {T} rows; {idx!r} reads "
                                  "more of the probability matrix: declare probs_rows = None (the whole "
                                  "matrix) or a larger w on the method")


def group_mean(probs, G: int):
    """Probabilities of (B, G * H, ...) query heads as (B, H, ...): the mean over each group (the
    grouped-query rule, as reference_attention), for a tensor or a ProbStats."""
    if G == 1 or probs is None:
        return probs
    if isinstance(probs, torch.Tensor):
        return probs.unflatten(1, (-1, G)).mean(dim=2)
    return type(probs)(group_mean(probs.colsum, G), group_mean(probs.rows, G), probs.T)


@dataclass
class CacheShape:
    """What a KVCache needs to know of a model that is not nanokv's GPT (GPTConfig has the same
    fields): n_layer layers of n_head query heads of head_dim, n_kv_head key-value heads
    (grouped-query attention when fewer than n_head), and, for a rotary model, its frequencies
    inv_freq (D/2,) (keys then arrive rotated; StreamingLLM's reposition re-rotates them)."""

    n_layer: int
    n_head: int
    head_dim: int
    n_kv_head: int | None = None  # None: n_head (multi-head attention)
    block_size: int | None = None  # longest sequence the model was trained on (None: not known)
    inv_freq: torch.Tensor | None = None
    name: str = "model"

    def __post_init__(self):
        for field in ("n_layer", "n_head", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be an int >= 1, got {value!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head must divide n_head ({self.n_head}), got {self.n_kv_head!r}")

    @property
    def n_embd(self) -> int:  # what the methods read the head dim from: n_embd // n_head
        return self.n_head * self.head_dim


def _check_index(name: str, value: int, n: int):
    if not 0 <= value < n:
        raise ValueError(f"{name} must be in [0, {n}), got {value}")


class KVCache:
    def __init__(self, config, method="full", backend: str = "torch", grow_by: int = 16, **method_kwargs):
        """config: the model's GPTConfig, or a CacheShape for another model (grouped-query and
        rotary models: nanokv.hf builds it). method: a name from nanokv.METHODS (built with
        method_kwargs) or a Method instance. backend: "torch" (the reference) or "triton".
        grow_by: when a layer's heads all hold the same number of tokens, its buffers grow
        by this many token slots at a time (spare slots are reported as padding; 1 = none)."""
        if not hasattr(config, "n_layer") or not hasattr(config, "n_head"):
            raise TypeError(f"config must be a GPTConfig or a CacheShape, got {type(config).__name__}")
        if backend not in BACKENDS:
            hint = ""
            if not isinstance(backend, str):
                name = method if isinstance(method, str) else getattr(method, "name", "method")
                hint = (f"; the third positional argument is the backend: pass method options by keyword, "
                        f"e.g. KVCache(config, {name!r}, budget={backend!r})")
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}{hint}")
        if isinstance(method, str):
            from .registry import METHODS  # the registry loads only when a method is named

            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; valid methods: {sorted(METHODS)}")
            method = METHODS[method](**method_kwargs)
        elif method_kwargs:
            raise TypeError("method keyword arguments are only accepted with a method name")
        if not isinstance(method, Method):
            raise TypeError(f"method must be a name or a nanokv.Method, got {type(method).__name__}")
        if not isinstance(grow_by, int) or isinstance(grow_by, bool) or grow_by < 1:
            raise ValueError(f"grow_by must be an int >= 1, got {grow_by!r}")
        if backend == "triton":
            from fast import require_triton

            require_triton()  # a clear error where Triton cannot run (no GPU and no interpreter)
        method.check_config(config)
        self.config = config
        self.n_kv_head = getattr(config, "n_kv_head", None) or config.n_head  # heads stored (fewer: grouped-query)
        self.head_dim = config.n_embd // config.n_head
        self.method = method
        self.backend = backend
        self.grow_by = grow_by
        self.layers: list[Layer] | None = None  # created by the first call
        # set track_peak = True to record the most bytes held at any attention call (peak_bytes)
        # and the largest fp32 probability matrix the reference attention built (peak_scores_bytes)
        self.track_peak, self.peak_bytes, self.peak_scores_bytes = False, 0, 0
        self._owner = None  # weak reference to the model using this cache (see bind)
        self._scratch = Scratch()  # the concatenated keys and values of one forward pass (attention_over)

    # ------------------------------------------------------------------ the call the model makes
    @property
    def seq_len(self) -> int:
        """Number of tokens seen so far (kept or not); the position of the next token."""
        return 0 if self.layers is None else self.layers[-1].n_seen

    def seq_len_of(self, layer_idx: int) -> int:
        """Tokens layer `layer_idx` has seen (during a forward pass, earlier layers are one call ahead)."""
        return 0 if self.layers is None else self.layers[layer_idx].n_seen

    def bind(self, model):
        """Tie this cache to the model that first uses it (GPT.forward calls this): its keys and
        values mean nothing to another model, even one with the same config."""
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            self._owner = weakref.ref(model)
        elif owner is not model:
            raise ValueError("this cache holds another model's keys and values (a cache is bound to the model "
                             "that first used it); build a new KVCache, or call cache.reset() first")

    def attend(self, layer_idx: int, q, k, v):
        if torch.is_grad_enabled():  # the cache never holds an autograd graph (it would grow every step,
            q, k, v = q.detach(), k.detach(), v.detach()  # and clone() could not copy it); no gradient flows through it
        B, H, T, D = q.shape
        if (H, D) != (self.config.n_head, self.head_dim):
            raise ValueError(
                f"q has {H} heads of dim {D}; this cache was built for a config with "
                f"{self.config.n_head} heads of dim {self.head_dim}"
            )
        kv_shape = (B, self.n_kv_head, T, D)
        if k.shape != kv_shape or v.shape != kv_shape:
            raise ValueError(f"k and v must be {kv_shape} ({self.n_kv_head} key-value heads) for q {tuple(q.shape)}, "
                             f"got {tuple(k.shape)}, {tuple(v.shape)}")
        if self.layers is None:
            self._start(B, q.dtype, q.device)
        _check_index("layer_idx", layer_idx, self.config.n_layer)
        layer = self.layers[layer_idx]
        if B != self.batch_size:
            raise ValueError(f"batch size {B} differs from this cache's batch size {self.batch_size}; "
                             "use a fresh cache (or cache.reset()) for another batch")
        if q.dtype != self.dtype:
            raise TypeError(f"dtype {q.dtype} differs from this cache's dtype {self.dtype}")
        if q.device != layer.lengths.device:  # a model split over devices: a layer lives where it first ran
            if layer.n_seen:
                raise ValueError(f"layer {layer_idx} got {q.device} tensors; its cache lives on {layer.lengths.device}")
            layer = self.layers[layer_idx] = self._new_layer(layer_idx, q.device)
        if layer_idx == 0:  # a new forward pass (whatever an interrupted one left)
            self._scratch.buf = None
        out = self._pipeline(layer, q, k, v)
        if layer_idx == self.config.n_layer - 1:  # the forward pass is done: hold nothing between calls
            self._scratch.buf = None
        return out

    def _pipeline(self, layer: Layer, q, k, v):
        """The one flow every method goes through (nanokv/method.py names the hooks): store the
        new tokens, attend over what the method gathers, let it observe and compress."""
        m = self.method
        q, k = m.prepare(layer, q, k)
        call_pos = torch.arange(layer.n_seen, layer.n_seen + q.size(2), dtype=torch.int32, device=q.device)
        outs, start = [], 0
        for n in m.pieces(layer, q.size(2)):
            piece, pos = slice(start, start + n), call_pos[start:start + n]  # (n,) positions
            fresh = (k[:, :, :start + n], v[:, :, :start + n], call_pos[:start + n])  # the call's tokens so far
            layer.n_new = n
            if n > 1:  # the general rules read slot order as position order
                layer.sort_by_position()
            m.store(layer, k[:, :, piece], v[:, :, piece], pos)
            # a method that compresses only its prompt (SnapKV's family) reads no probabilities after it
            with_probs = m.needs_probs and (layer.n_seen == 0 or m.compresses_at != "prefill")
            out, probs = self.attention_over(q[:, :, piece], m.gather(layer, fresh), pos, with_probs=with_probs)
            if isinstance(probs, torch.Tensor) and m.probs_rows is not None and n > 1:  # what it declared
                probs = ProbStats.of(probs, m.probs_rows)  # it reads, the same on every backend
            m.compress(layer, m.observe(layer, probs, q[:, :, piece]))
            layer.n_seen += n
            layer.n_new = 0
            outs.append(out)
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def attention(self, q, layer: Layer, q_pos, with_probs: bool = True):
        """Attention of q over everything the method says the layer holds between calls
        (method.gather); out (B, H, T, D) and fp32 probs (B, H, T, L) over the gathered entries.
        For introspection (the attention-loss probe); the pipeline calls attention_over."""
        out = self.attention_over(q, self.method.gather(layer), q_pos, with_probs)
        self._scratch.buf = None
        return out

    def attention_over(self, q, parts, q_pos, with_probs: bool = True):
        """Attention over a list of parts, each (k, v, k_pos, valid): (B, H, L_i, D) keys and
        values (dequantized if stored in low bits), (B, H, L_i) positions, validity or None.
        probs come back concatenated in the order of the parts."""
        if self.track_peak:  # new tokens are stored, not yet compressed: the high-water mark
            self.peak_bytes = max(self.peak_bytes, self.memory_bytes())
            if with_probs:
                L = sum(p[2].size(2) for p in parts)  # positions: a packed part is not dequantized for this
                self.peak_scores_bytes = max(self.peak_scores_bytes, q.size(0) * q.size(1) * q.size(2) * L * 4)
        if self.backend == "triton" and q.size(2) == 1 and self.n_kv_head == self.config.n_head:  # packed low-bit parts: fast/decode_quant.py
            routed = self._decode_quant(q, parts)
            if routed is not None:
                return routed
        if len(parts) == 1 and isinstance(parts[0], RaggedPart) and not parts[0].store.quantized:  # heads of
            # different lengths in full precision (a packed ragged store is dequantized and padded below)
            if self.backend == "torch":
                return ragged_attention(q, parts[0], q_pos, with_probs)  # one head at a time
            if q.size(2) == 1:  # Triton decode: kernel 1 reads each head's rows of the flat store, no padding
                from fast.decode import decode_attention_varlen

                out, probs = decode_attention_varlen(q, *parts[0].flat(), want_probs=with_probs)
                return out, group_mean(probs, q.size(1) // parts[0].store.heads)
        if len(parts) == 1 and not isinstance(parts[0], PackedPart):
            k, v, k_pos, valid = parts[0]
        else:  # several parts, or packed ones: one key and one value buffer, reused by the next layer
            k, v, k_pos, valid = concat_parts(parts, self._scratch)
        rows = self.method.probs_rows
        if self.backend == "triton" and (q.size(2) == 1 or not with_probs or rows is not None):
            G = q.size(1) // k.size(1)
            if G > 1:  # grouped-query: the kernels read one key-value head per query head (a temporary copy)
                k, v, k_pos = (t.repeat_interleave(G, dim=1) for t in (k, v, k_pos))
                valid = None if valid is None else valid.repeat_interleave(G, dim=1)
            if q.size(2) == 1:  # decode: fast/decode.py, same contract
                from fast.decode import decode_attention

                out, probs = decode_attention(q, k, v, valid)
                return out, group_mean(probs, G)
            from fast.prefill import prefill_attention  # fast/prefill.py

            out, colsum, _, last = prefill_attention(q, k, v, q_pos, k_pos, valid, min(rows or 0, q.size(2)))
            # the method reads column sums and the last rows only: no (B, H, T, L) matrix is built
            return out, group_mean(ProbStats(colsum, last, q.size(2)), G) if with_probs else None
        return reference_attention(q, k, v, q_pos, k_pos, valid, with_probs)

    def reserve(self, new_tokens: int):
        """Room for `new_tokens` more tokens in one copy per layer, for methods whose buffers then
        only grow (the full cache; SnapKV, PyramidKV and Ada-KV after their prefill): decoding
        then never regrows them (generate() calls this after the prefill). Spare slots count as
        padding in memory_bytes() until used. Methods that evict or quantize while decoding
        resize their buffers themselves; for them this does nothing."""
        if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 0:
            raise ValueError(f"new_tokens must be an int >= 0, got {new_tokens!r}")
        if self.method.compresses_at not in ("never", "prefill"):
            return
        for layer in self.layers or []:
            layer.reserve(new_tokens)

    @staticmethod
    def _decode_quant(q, parts):
        """Kernel 2 for the parts it takes: KIVI's single part (per-channel keys, see its
        kernel_args), or one packed low-bit store (heads uniform, the same bits for keys and
        values) among full-precision parts (RTN, Quantized: [low, full]; MiKV: [high, low, new]).
        Returns (out, probs in the parts' order), or None for other shapes (kernel 1 then)."""
        from fast.decode_quant import decode_attention_quant

        if len(parts) == 1 and hasattr(parts[0], "kernel_args"):
            return decode_attention_quant(q, **parts[0].kernel_args())
        low = [i for i, p in enumerate(parts) if isinstance(p, LowBitPart)]
        if len(low) != 1:
            return None
        i, part = low[0], parts[low[0]]
        st, LQ = part.store, part.n
        full = [p for j, p in enumerate(parts) if j != i]
        if not (st.uniform and LQ > 0 and st.quantized["k"][:2] == st.quantized["v"][:2]
                and full and all(p[3] is None for p in full)):
            return None
        bits, group = st.quantized["k"][:2]
        packed = [tuple(part.packed(f"{n}.{x}") for x in ("codes", "scale", "zero")) for n in ("k", "v")]
        k, v = (torch.cat([p[j] for p in full], dim=2) for j in (0, 1))
        out, probs = decode_attention_quant(q, packed[0], packed[1], k, v, bits, group)
        n_before = sum(p[0].size(2) for p in parts[:i])  # the kernel puts low-bit tokens first
        if n_before:
            probs = torch.cat([probs[..., LQ:LQ + n_before], probs[..., :LQ], probs[..., LQ + n_before:]], dim=-1)
        return out, probs

    def _start(self, batch, dtype, device):
        if self.backend == "triton" and device.type != "cuda":
            from fast import interpreting

            if not interpreting():
                raise ValueError(f"backend='triton' got {device} tensors: the kernels run on a CUDA GPU, or on the "
                                 "CPU only under TRITON_INTERPRET=1 (tests); use backend='torch' on a CPU")
        self.batch_size, self.dtype, self.device = batch, dtype, device
        self.layers = [self._new_layer(i, device) for i in range(self.config.n_layer)]

    def _new_layer(self, i: int, device) -> Layer:
        c, D = self.config, self.head_dim
        layer = Layer(self.batch_size, self.n_kv_head, device, self.grow_by, index=i, dtype=self.dtype,
                      group=c.n_head // self.n_kv_head, inv_freq=getattr(c, "inv_freq", None))
        layer.add_field("k", "keys", (D,), self.dtype)
        layer.add_field("v", "values", (D,), self.dtype)
        layer.add_field("pos", "positions", (), torch.int32)
        self.method.init_layer(layer, i)
        for store in (layer, *layer.segments.values()):  # kernels: fast/quant.py, fast/merge.py
            store.backend = self.backend
        return layer

    # ------------------------------------------------------------------ introspection
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes actually allocated, by kind: keys, values, positions (and lengths), quant_meta
        (scales and zeros), method_state (scores, histories), padding. Sums to memory_bytes()."""
        total = dict.fromkeys(KINDS, 0)
        for layer in self.layers or []:
            for store in (layer, *layer.segments.values()):
                for kind, n in store.nbytes().items():
                    total[kind] += n
        for kind, n in self.method.state_nbytes().items():
            total[kind] += n
        return total

    def memory_bytes(self) -> int:
        """Total bytes the cache holds (every tensor it allocated, all kinds)."""
        return sum(self.memory_breakdown().values())

    def compression_report(self) -> dict:
        """Size of what the cache holds next to a full cache of the same tokens.

        elements        keys + values a full cache would hold: 2 * n_layer * B * H_kv * seq_len * D
        kv_bytes        keys + values + quantization metadata actually held
        bits_per_element  8 * kv_bytes / elements
        fraction_of_full  kv_bytes / (elements * bytes of the model dtype)
        fraction_of_fp16  kv_bytes / (elements * 2), as the quantization papers report
        positions, method_state, padding: reported beside, not in the fractions
        """
        b = self.memory_breakdown()
        c = self.config
        elements = 2 * c.n_layer * (self.batch_size if self.layers else 0) * self.n_kv_head * self.seq_len * self.head_dim
        kv = b["keys"] + b["values"] + b["quant_meta"]
        dtype_bytes = torch.finfo(self.dtype).bits // 8 if self.layers else 2
        return {"elements": elements, "kv_bytes": kv,
                "bits_per_element": 8 * kv / elements if elements else 0.0,
                "fraction_of_full": kv / (elements * dtype_bytes) if elements else 0.0,
                "fraction_of_fp16": kv / (elements * 2) if elements else 0.0,
                "positions": b["positions"], "method_state": b["method_state"], "padding": b["padding"],
                "total_bytes": sum(b.values())}

    def _stores_with_positions(self, layer_idx):
        self._check_started()
        _check_index("layer_idx", layer_idx, self.config.n_layer)
        layer = self.layers[layer_idx]
        return [st for st in (layer, *layer.segments.values()) if "pos" in st.fields]

    def lengths(self, layer_idx: int) -> torch.Tensor:
        """(B, H) number of tokens each head of the layer keeps (over all its segments; a
        store whose entries are chunks of tokens, as KIVI's keys, counts every token)."""
        return sum(st.lengths * math.prod(st.trailing["pos"]) for st in self._stores_with_positions(layer_idx))

    def kept_positions(self, layer_idx: int, batch: int = 0, head: int = 0) -> torch.Tensor:
        """Original positions of the tokens kept by one (layer, batch row, head), sorted; `head`
        counts key-value heads (grouped-query: the heads stored, fewer than the query heads)."""
        return self.kept_precision(layer_idx, batch, head)[0]

    def kept_precision(self, layer_idx: int, batch: int = 0, head: int = 0):
        """(positions, bits) of the tokens kept by one head, sorted by position; bits is the
        storage precision of each (the model dtype's bits for full-precision entries)."""
        self._check_started()
        _check_index("batch", batch, self.batch_size)
        _check_index("head", head, self.n_kv_head)
        full_bits = torch.finfo(self.dtype).bits
        pos, bits = [], []
        for st in self._stores_with_positions(layer_idx):
            n = int(st.lengths[batch, head])
            pos.append(st.padded("pos", fill=-1)[batch, head, :n].long().flatten())
            bits.append(torch.full_like(pos[-1], st.bits or full_bits))
        pos, bits = torch.cat(pos), torch.cat(bits)
        order = torch.argsort(pos)
        return pos[order], bits[order]

    def _check_started(self):
        if self.layers is None:
            raise RuntimeError("the cache is empty: run the model on a prompt with cache=... first")

    # ------------------------------------------------------------------ life cycle
    def clone(self) -> "KVCache":
        """An independent copy: compress a context once, then ask it many questions."""
        self._scratch.buf = None  # scratch, not state: not worth copying
        return copy.deepcopy(self)

    def reset(self):
        """Forget everything: the cache becomes as new (same config, method and backend)."""
        self.layers = None
        self._scratch.buf = None
        self.peak_bytes = self.peak_scores_bytes = 0
        self._owner = None
        self.method.reset()

    def __repr__(self):
        held = "empty" if self.layers is None else f"{self.seq_len} seen, {self.memory_bytes()} bytes"
        return f"KVCache(method={self.method!r}, backend={self.backend!r}, {held})"
