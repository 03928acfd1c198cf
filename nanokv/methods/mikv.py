"""
MiKV: mixed-precision KV cache (Yang et al. 2024, "No Token Left Behind: Reliable KV Cache
Compression via Importance-Aware Mixed Precision Quantization", arXiv 2402.18096).

Rule: run H2O's importance policy, but instead of evicting the tokens H2O would drop, keep
them in low precision. Nothing is ever dropped.
  - Importance is H2O's accumulated attention F[j] = sum over queries so far of a_t[j].
  - After each call, with n tokens seen, the high-precision tier holds ceil(rho * n) tokens
    [rho 20%]: the `recent` fraction of them newest [0.5: H2O's half/half] plus the rest by F.
    The others are demoted to `bits_lo` bits [2; 3 or 4] (per-token groups).
  - Demotion is one-way: a token's precision only goes down.
  - High precision is the model's dtype [bits_hi None]; 8 or 4 bits are options (bits_lo below).
Outlier-aware query/key channel balancer [balancer True]: at prefill, per layer, batch row,
head and channel c, over the prompt (at least the first `calibrate` tokens [32]),
    b_c = sqrt(max_t |Q[t, c]| / max_t |K[t, c]|)
(grouped-query attention: the max over Q runs over the query heads that share the key head)
keys are stored multiplied by b (before quantization) and every query is divided by b, so
q . k is unchanged in exact arithmetic while the keys' outlier channels shrink. With the
balancer on the low-precision group size is head_dim / 2 (the paper's choice); without it,
head_dim (one group per token and head). `bits_lo=None` is an identity quantizer (demoted
tokens stay in the model dtype), used to test the policy and the balancer alone.

Choices: ceil(rho * n) (so rho = 1 keeps everything in high precision); importance is only
accumulated for high-precision tokens (demoted tokens never come back); the balance factors
are fixed once the layer has seen `calibrate` tokens, normally within the prompt, and kept as
fp32 method state (B * H * D per layer); a channel with max |K| = 0 or max |Q| = 0 gets b = 1.
A stream that starts with short calls (token by token) would otherwise fix b from one token:
until `calibrate` tokens are seen the running maxima are tracked (2 * B * H * D fp32), nothing
is balanced and nothing is demoted (the cache briefly holds them all in high precision); then
b is computed, the held keys are rescaled, and demotion starts.
Grouped-query models (nanokv.hf): F sums the mean of a key-value head's query heads' rows.
"""

import math

import torch

from ..method import LowBitPart, Method, _check_int, _check_number, lowest_slot, store_part, top_k_mask
from ..quant import check_bits, check_group, check_group_saves
from ..ragged import Ragged, mask_slots


class MiKV(Method):
    name = "mikv"
    compresses_at = "prefill+decode"
    probs_rows = 0  # its attention reads column sums only
    takes_budget = False
    lossy = True  # lossless only at rho = 1 without the balancer

    def __init__(self, rho: float = 0.2, bits_lo: int | None = 2, bits_hi: int | None = None,
                 group: int | None = None, balancer: bool = True, recent: float = 0.5, calibrate: int = 32):
        super().__init__(budget=None)
        _check_number("rho", rho, 0, 1, low_open=True)
        bits_lo = None if bits_lo is None else check_bits(bits_lo, "bits_lo")
        bits_hi = None if bits_hi is None else check_bits(bits_hi, "bits_hi")
        if bits_hi is not None and bits_hi not in (4, 8):
            raise ValueError(f"bits_hi must be None (the model dtype), 8 or 4, got {bits_hi!r}")
        if bits_hi is not None and (bits_lo is None or bits_lo >= bits_hi):  # demotion must lower precision
            raise ValueError(f"bits_lo ({bits_lo}) must be below bits_hi ({bits_hi}): demotion lowers precision "
                             "(None = the model dtype, the highest)")
        if group is not None:  # an int >= 1, and one that saves memory at bits_lo
            group = _check_int("group", group, 1) if bits_lo is None else check_group_saves(bits_lo, group)
        _check_number("recent", recent, 0, 1)
        calibrate = _check_int("calibrate", calibrate, 1)
        self.rho, self.bits_lo, self.bits_hi, self.group = float(rho), bits_lo, bits_hi, group
        self.balancer, self.recent, self.calibrate = bool(balancer), float(recent), calibrate
        self.scales: dict[int, torch.Tensor] = {}  # layer -> balance factors (B, H, 1, D)
        self._maxima: dict[int, tuple] = {}  # layer -> running (max |q|, max |k|) until calibrated

    def check_config(self, config):
        D = config.n_embd // config.n_head
        self.group_size = self.group or (D // 2 if self.balancer else D)
        check_group(D, self.group_size)

    def _tier(self, layer, bits):
        """A store of per-token keys and values, in the model dtype (bits None) or `bits` bits."""
        D = layer.trailing["k"][0]
        st = Ragged(layer.batch, layer.heads, layer.lengths.device, grow_by=layer.grow_by)
        st.bits = bits
        for name, kind in (("k", "keys"), ("v", "values")):
            if bits is None:
                st.add_field(name, kind, (D,), layer.dtype)
            else:
                st.add_quantized_field(name, kind, D, bits, self.group_size, layer.dtype)
        st.add_field("pos", "positions", (), torch.int32)
        return st

    def init_layer(self, layer, layer_idx):
        layer.segments["hi"] = self._tier(layer, self.bits_hi)
        layer.segments["hi"].add_field("acc", "method_state", (), torch.float32)  # H2O's F
        layer.segments["lo"] = self._tier(layer, self.bits_lo)
        for name in ("k", "v", "pos"):  # the tiers hold everything; the main store stays empty
            layer.drop_field(name)

    def prepare(self, layer, q, k):
        if self.balancer and layer.index not in self.scales:
            self.calibrate_balancer(layer, q, k, n_seen=layer.n_seen + q.size(2))
        if self.balancer and layer.index in self.scales:
            b = self.scales[layer.index]  # (B, H, 1, D) per key-value head; its G query heads share it
            q, k = (q.float() / b.repeat_interleave(layer.group, dim=1)).to(q.dtype), (k.float() * b).to(k.dtype)
        return q, k

    def store(self, layer, k, v, pos):  # new tokens enter the high tier (F starts at 0)
        layer.segments["hi"].append(k=k, v=v, pos=pos.expand(*k.shape[:3]))

    def observe(self, layer, probs, q):  # attention read [high tier, low tier]: F of the high tier
        hi = layer.segments["hi"]
        hi.set_padded("acc", hi.padded("acc") + probs[..., :hi.max_len].sum(dim=2))

    def compress(self, layer, scores=None):
        if layer.index in self.scales or not self.balancer:  # nothing is demoted before calibration
            self.demote(layer, n_seen=layer.n_seen + layer.n_new)

    def calibrate_balancer(self, layer, q, k, n_seen: int):
        """Track max |q| and max |k| per channel; once `calibrate` tokens are seen, fix the balance
        factors and rescale the keys already held (all in the high-precision tier)."""
        mq, mk = q.float().abs().amax(dim=2, keepdim=True), k.float().abs().amax(dim=2, keepdim=True)
        mq = mq.unflatten(1, (-1, layer.group)).amax(dim=2)  # grouped-query: the max over a group's query heads
        if layer.index in self._maxima:
            old_q, old_k = self._maxima[layer.index]
            mq, mk = torch.maximum(mq, old_q), torch.maximum(mk, old_k)
        if n_seen < self.calibrate:
            self._maxima[layer.index] = (mq, mk)
            return
        self._maxima.pop(layer.index, None)
        b = self.scales[layer.index] = balance_factors(mq, mk)
        hi = layer.segments["hi"]
        if hi.max_len:
            hi.set_padded("k", (hi.padded("k").float() * b).to(layer.dtype))

    def demote(self, layer, n_seen: int):
        """Move the tokens H2O would evict from the high- to the low-precision tier. A decode step
        demotes one per head, found by argmin; its slot takes the newest token (as H2O evicts)."""
        hi, lo = layer.segments["hi"], layer.segments["lo"]
        target = math.ceil(self.rho * n_seen)
        if hi.max_len <= target:
            return
        window = int(self.recent * target)
        one = layer.n_new == 1 and hi.uniform and hi.max_len == target + 1
        if one:  # the token top_k_mask would demote, by position: in-place slots are not in order
            pos = hi.padded("pos")  # (B, H, L)
            slots = lowest_slot(hi.padded("acc"), pos, protected=pos > n_seen - 1 - window)[..., None]  # (B, H, 1)
        else:
            hi.sort_by_position()  # top_k_mask reads slot order as position order
            keep = top_k_mask(hi.lengths, hi.padded("acc", fill=float("-inf")), target, window=window)
            slots = mask_slots(~keep & hi.valid_mask(), hi.max_len - target)  # (B, H, m): every head demotes m
        k, v, pos, _ = store_part(hi)
        lo.append(k=k.take_along_dim(slots[..., None], 2), v=v.take_along_dim(slots[..., None], 2),
                  pos=pos.take_along_dim(slots, 2))
        hi.evict_in_place(slots[..., 0]) if one else hi.keep(keep)

    def gather(self, layer, fresh=None):  # the low tier packed (the Triton backend reads its codes)
        lo = layer.segments["lo"]
        return [store_part(layer.segments["hi"]), store_part(lo) if self.bits_lo is None else LowBitPart(lo)]

    def state_nbytes(self):
        out = super().state_nbytes()
        held = [*self.scales.values(), *(t for pair in self._maxima.values() for t in pair)]  # b, running maxima
        out["method_state"] += sum(t.numel() * t.element_size() for t in held)
        return out

    def reset(self):
        self.scales, self._maxima = {}, {}


def balance_factors(mq, mk):
    """b (B, H, 1, D) = sqrt(mq / mk) per channel from the maxima mq = max_t |q|, mk = max_t |k|;
    1 where either max is 0."""
    ok = (mq > 0) & (mk > 0)
    return torch.where(ok, torch.sqrt(mq / torch.where(ok, mk, torch.ones_like(mk))), torch.ones_like(mq))
