"""
KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv 2402.02750).

Rule: keys have outlier *channels*, values do not, so
  - keys are quantized per channel: a group is `group` consecutive tokens of one channel;
  - values are quantized per token: a group is `group` consecutive channels of one token;
  - the newest tokens stay in full precision in a residual of up to `residual` tokens:
      keys   are quantized in chunks: when the key residual reaches R tokens, all R are
             quantized (R / group per-channel groups) and the residual starts again, so
             after n tokens the key residual holds n mod R;
      values are first-in first-out: after each call the value residual holds the newest
             min(n, R) tokens and older ones are quantized one by one.
At prefill the same rule applies to the n prompt tokens (keys: n - n mod R quantized;
values: n - R quantized when n > R), as the official code does. The tokens of the current
call always attend at full precision (quantization happens after attention).
Defaults: 2 bits, group 32 (head_dim when smaller), residual 128; the residual must be a
multiple of the group.

Storage per layer (all heads hold the same tokens; nothing is evicted):
  segments["kq"]  one entry per chunk of `group` tokens: codes (D, ceil(group*b/8)) packed along
                  tokens, scale and zero (D,) fp16, positions (group,) int32
  main store      full-precision key residual: k (D,), pos
  segments["vq"]  per-token quantized values: codes ceil(D*b/8), scale, zero (D/group,) fp16
  segments["vr"]  full-precision value residual: v (D,)
Attention reads one part, KIVIPart: the reference dequantizes it into attention's buffers;
the Triton backend hands its packed codes to kernel 2 instead (fast/decode_quant.py).
"""

import torch

from ..method import Method, PackedPart, _check_int
from ..quant import check_bits, check_group, check_group_saves, dequantize, packed_bytes, unpack_rows
from ..ragged import Ragged


class KIVI(Method):
    name = "kivi"
    needs_probs = False
    compresses_at = "prefill+decode"
    takes_budget = False
    lossy = True  # lossless only while every token sits in the residual (residual > sequence)

    def __init__(self, bits: int = 2, group: int | None = None, residual: int = 128):
        super().__init__(budget=None)
        bits = check_bits(bits)
        group = check_group_saves(bits, group)
        residual = _check_int("residual", residual, 1)
        if group is not None and residual % group != 0:
            raise ValueError(f"residual ({residual}) must be a multiple of group ({group})")
        self.bits, self.group, self.residual = bits, group, residual

    def check_config(self, config):
        D = config.n_embd // config.n_head
        self.G = self.group or min(32, D)  # the paper's 32, or head_dim when smaller
        check_group(D, self.G)  # value groups run along channels
        if self.residual % self.G != 0:
            raise ValueError(f"residual ({self.residual}) must be a multiple of group ({self.G})")

    def init_layer(self, layer, layer_idx):
        D, G, b = layer.trailing["k"][0], self.G, self.bits
        dtype = layer.fields["k"].dtype
        kq = Ragged(layer.batch, layer.heads, layer.lengths.device, grow_by=max(1, layer.grow_by // G))
        kq.bits = b
        kq.add_field("codes", "keys", (D, packed_bytes(G, b)), torch.uint8)
        kq.add_field("scale", "quant_meta", (D,), torch.float16)
        kq.add_field("zero", "quant_meta", (D,), torch.float16)
        kq.add_field("pos", "positions", (G,), torch.int32)
        vq = Ragged(layer.batch, layer.heads, layer.lengths.device, grow_by=layer.grow_by)
        vq.add_quantized_field("v", "values", D, b, G, dtype)
        vr = Ragged(layer.batch, layer.heads, layer.lengths.device, grow_by=layer.grow_by)
        vr.add_field("v", "values", (D,), dtype)
        layer.segments.update(kq=kq, vq=vq, vr=vr)
        layer.drop_field("v")  # the main store is the key residual

    def store(self, layer, k, v, pos):
        B, H, T, D = k.shape
        layer.append(k=k, pos=pos.expand(B, H, T))  # the key residual
        layer.segments["vr"].append(v=v)  # the value residual

    def gather(self, layer, fresh=None):
        return [KIVIPart(self, layer)]

    def compress(self, layer, scores=None):
        B, H, R, G = layer.batch, layer.heads, self.residual, self.G
        n_k = (layer.max_len // R) * R  # keys: quantize whole residuals of R tokens
        if n_k:
            keys = layer.padded("k")[:, :, :n_k].float()  # (B, H, n_k, D)
            chunks = keys.reshape(B, H, n_k // G, G, keys.size(-1)).transpose(-1, -2)  # (B, H, c, D, G)
            codes, scale, zero = layer.pack(chunks, self.bits, G)  # one group per (chunk, channel)
            pos = layer.padded("pos")[:, :, :n_k].reshape(B, H, n_k // G, G)
            layer.segments["kq"].append(codes=codes, scale=scale[..., 0], zero=zero[..., 0], pos=pos)
            layer.drop_oldest(n_k)
        vr, vq = layer.segments["vr"], layer.segments["vq"]
        n_v = max(0, vr.max_len - R)  # values: first in, first out
        if n_v:
            vq.append(v=vr.padded("v")[:, :, :n_v])
            vr.drop_oldest(n_v)  # a decode step: the others move down a slot (no new buffer)


class KIVIPart(PackedPart):
    """KIVI's keys and values as one attention part: the reference dequantizes them into
    attention's buffers (write_into); kernel_args() gives kernel 2 the packed codes and the
    full-precision residuals instead."""

    def __init__(self, method: KIVI, layer: Ragged):
        self.method, self.layer, self.D, self.dtype = method, layer, layer.trailing["k"][0], layer.dtype

    def positions(self):  # (B, H, n): the key chunks' tokens, then the key residual's
        kq = self.layer.segments["kq"]
        return torch.cat([kq.padded("pos").flatten(2), self.layer.padded("pos")], dim=2)

    def write_into(self, k, v):
        """Every token's key and value, (B, H, n, D) each, in token order."""
        kq, vq, vr, G = self.layer.segments["kq"], self.layer.segments["vq"], self.layer.segments["vr"], self.method.G
        C, nv = kq.max_len, vq.max_len  # C chunks of G tokens per head; nv values quantized
        codes = unpack_rows(kq.padded("codes").transpose(-1, -2), self.method.bits, G)  # (B, H, C, G, D): token order
        dequantize(codes, kq.padded("scale")[:, :, :, None], kq.padded("zero")[:, :, :, None], self.dtype,
                   out=k[:, :, :C * G].unflatten(2, (C, G)))  # scale, zero (B, H, C, 1, D): one per chunk and channel
        k[:, :, C * G:] = self.layer.padded("k")
        vq.padded("v", out=v[:, :, :nv])  # the quantized values, then the residual
        v[:, :, nv:] = vr.padded("v")

    def kernel_args(self) -> dict:
        kq, vq, vr = (self.layer.segments[n] for n in ("kq", "vq", "vr"))
        return dict(kq=tuple(kq.padded(n) for n in ("codes", "scale", "zero")),
                    vq=tuple(vq.padded(f"v.{n}") for n in ("codes", "scale", "zero")),
                    k=self.layer.padded("k"), v=vr.padded("v"), bits=self.method.bits, group=self.method.G,
                    key_layout="channel")
