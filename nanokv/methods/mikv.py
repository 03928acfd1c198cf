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
  - High precision is the model's dtype [bits_hi None]; 8 or 4 bits are options.
Outlier-aware query/key channel balancer [balancer True]: at prefill, per layer, batch row,
head and channel c, over the prompt,
    b_c = sqrt(max_t |Q[t, c]| / max_t |K[t, c]|)
keys are stored multiplied by b (before quantization) and every query is divided by b, so
q . k is unchanged in exact arithmetic while the keys' outlier channels shrink. With the
balancer on the low-precision group size is head_dim / 2 (the paper's choice); without it,
head_dim (one group per token and head). `bits_lo=None` is an identity quantizer (demoted
tokens stay in the model dtype), used to test the policy and the balancer alone.

Choices: ceil(rho * n) (so rho = 1 keeps everything in high precision); importance is only
accumulated for high-precision tokens (demoted tokens never come back); the balance factors
are fixed at prefill and kept as fp32 method state (B * H * D per layer); a channel with
max |K| = 0 or max |Q| = 0 gets b = 1.
"""

import math

import torch

from ..method import Method, _check_int, store_part, top_k_mask
from ..quant import check_bits, check_group
from ..ragged import Ragged


class MiKV(Method):
    name = "mikv"
    compresses_at = "prefill+decode"
    probs_rows = 0  # its attention reads column sums only
    takes_budget = False
    lossy = True  # lossless only at rho = 1 without the balancer

    def __init__(self, rho: float = 0.2, bits_lo: int | None = 2, bits_hi: int | None = None,
                 group: int | None = None, balancer: bool = True, recent: float = 0.5):
        super().__init__(budget=None)
        if not (isinstance(rho, (int, float)) and 0.0 < rho <= 1.0):
            raise ValueError(f"rho must be in (0, 1], got {rho!r}")
        if bits_lo is not None:
            check_bits(bits_lo, "bits_lo")
        if bits_hi is not None and bits_hi not in (4, 8):
            raise ValueError(f"bits_hi must be None (the model dtype), 8 or 4, got {bits_hi!r}")
        if group is not None:
            _check_int("group", group, 1)
        if not 0.0 <= recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {recent!r}")
        self.rho, self.bits_lo, self.bits_hi, self.group = float(rho), bits_lo, bits_hi, group
        self.balancer, self.recent = bool(balancer), float(recent)
        self.scales: dict[int, torch.Tensor] = {}  # layer -> balance factors (B, H, 1, D)

    def check_config(self, config):
        D = config.n_embd // config.n_head
        self.group_size = self.group or (D // 2 if self.balancer else D)
        check_group(D, self.group_size)

    # ------------------------------------------------------------------ the two tiers
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

    # ------------------------------------------------------------------ one call
    def attend(self, cache, layer, q, k, v, q_pos):
        B, H, T, D = q.shape
        if self.balancer:
            if layer.n_seen == 0:
                self.scales[layer.index] = balance_factors(q, k)
            b = self.scales[layer.index]
            q, k = (q.float() / b).to(q.dtype), (k.float() * b).to(k.dtype)
        hi, lo = layer.segments["hi"], layer.segments["lo"]
        pos = q_pos.to(torch.int32).expand(B, H, T)
        parts = [store_part(hi), store_part(lo), (k, v, pos, None)]
        out, probs = cache.attention_over(q, parts, q_pos)  # this call's tokens at full precision
        n_hi, n_lo = hi.max_len, lo.max_len
        hi.set_padded("acc", hi.padded("acc") + probs[..., :n_hi].sum(dim=2))
        hi.append(k=k, v=v, pos=pos, acc=probs[..., n_hi + n_lo:].sum(dim=2))
        self.demote(layer, n_seen=layer.n_seen + T)
        return out

    def demote(self, layer, n_seen: int):
        """Move the tokens H2O would evict from the high- to the low-precision tier."""
        hi, lo = layer.segments["hi"], layer.segments["lo"]
        target = math.ceil(self.rho * n_seen)
        if hi.max_len <= target:
            return
        keep = top_k_mask(hi.lengths, hi.padded("acc", fill=float("-inf")), target,
                          window=int(self.recent * target))
        down = ~keep & hi.valid_mask()
        B, H, m = hi.batch, hi.heads, hi.max_len - target  # every head demotes m tokens
        k, v, pos, _ = store_part(hi)
        take = lambda t: t[down].view(B, H, m, *t.shape[3:])  # noqa: E731 - (B, H, m, ...)
        lo.append(k=take(k), v=take(v), pos=take(pos))
        hi.keep(keep)

    def gather(self, layer):
        return [store_part(layer.segments["hi"]), store_part(layer.segments["lo"])]

    def state_nbytes(self):
        out = super().state_nbytes()
        out["method_state"] += sum(t.numel() * t.element_size() for t in self.scales.values())
        return out

    def reset(self):
        self.scales = {}


def balance_factors(q, k):
    """b (B, H, 1, D) = sqrt(max_t |q| / max_t |k|) per channel, 1 where either max is 0."""
    mq, mk = q.float().abs().amax(dim=2, keepdim=True), k.float().abs().amax(dim=2, keepdim=True)
    ok = (mq > 0) & (mk > 0)
    return torch.where(ok, torch.sqrt(mq / torch.where(ok, mk, torch.ones_like(mk))), torch.ones_like(mq))
