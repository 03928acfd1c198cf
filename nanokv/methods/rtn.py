"""
Uniform RTN: every cached token at b bits (the quantization baseline of MiKV, Yang et al.
2024, arXiv 2402.18096).

Rule: keys and values of every token are quantized per token, in groups of `group`
consecutive channels, with asymmetric min-max round-to-nearest (nanokv/quant.py):
    scale = (max - min) / (2^b - 1),  code = round((x - min) / scale),  x_hat = code * scale + min
Codes are packed into bytes; scale and zero are fp16. Nothing is evicted. The tokens of the
current call attend at full precision: they wait in the layer's full-precision store during
the call and are quantized into segments["q"] after attention.
Defaults: 4 bits, group 32 (or head_dim when smaller).

Memory per token and head: 2 * (ceil(D * b / 8) + 4 * D / group) bytes + 4 bytes of position.
"""

import torch

from ..method import LowBitPart, Method, store_part
from ..quant import check_bits, check_group, check_group_saves
from ..ragged import Ragged


class RTN(Method):
    name = "rtn"
    needs_probs = False
    compresses_at = "prefill+decode"
    takes_budget = False
    lossy = True  # no setting of this method equals the full cache

    def __init__(self, bits: int = 4, group: int | None = None):
        super().__init__(budget=None)
        bits = check_bits(bits)
        group = check_group_saves(bits, group)
        self.bits, self.group = bits, group

    def check_config(self, config):
        check_group(config.n_embd // config.n_head, self.group or min(32, config.n_embd // config.n_head))

    def init_layer(self, layer, layer_idx):
        D = layer.trailing["k"][0]
        q = Ragged(layer.batch, layer.heads, layer.lengths.device, grow_by=layer.grow_by)
        q.bits = self.bits
        for name, kind in (("k", "keys"), ("v", "values")):
            q.add_quantized_field(name, kind, D, self.bits, self.group or min(32, D), layer.dtype)
        q.add_field("pos", "positions", (), torch.int32)
        layer.segments["q"] = q

    def gather(self, layer, fresh=None):
        return [LowBitPart(layer.segments["q"]), store_part(layer)]  # old tokens low-bit, this call's exact

    def compress(self, layer, scores=None):
        """Move every full-precision entry (this call's tokens) into the quantized segment."""
        if layer.max_len == 0:
            return
        layer.segments["q"].append(k=layer.padded("k"), v=layer.padded("v"), pos=layer.padded("pos"))
        layer.keep(torch.zeros(layer.batch, layer.heads, layer.max_len, dtype=torch.bool, device=layer.lengths.device))
