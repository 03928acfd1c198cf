"""
nanokv's methods on Hugging Face transformers models: GPT-2, Llama, Qwen2, Qwen3, Mistral.

    import nanokv.hf
    cache = nanokv.hf.attach(model, "snapkv", budget=256)       # any name in nanokv.METHODS, or a Method
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64, do_sample=False)
    cache.memory_bytes(); cache.kept_positions(layer, b, kv_head)

How it plugs in: through transformers' public extension points, no monkey-patching.
  - `attach` registers an attention function named "nanokv" (AttentionInterface; sdpa's mask
    function under the same name) and switches the model to it. A model run without a nanokv
    cache then attends exactly as with "sdpa"; `detach(model)` switches it back.
  - `HFCache` is a transformers `Cache`. In every attention layer transformers hands it the new
    keys and values (`update`); it returns them unchanged and the "nanokv" attention function
    gives them, with the queries, to nanokv's `KVCache.attend`, the same pipeline nanokv's GPT
    uses (store, attend over what the method keeps, observe, compress; ARCHITECTURE.md).
So the stored keys never leave nanokv: a method may hold ragged per-head lengths, packed low-bit
codes or merged tokens, and the memory saving is real.

Grouped-query attention (Llama, Qwen, Mistral): keys and values are stored once per key-value
head; a method judges a key-value head by the mean of the attention of the query heads that
share it (kvpress and the Ada-KV GQA paper average over the group the same way).
Rotary positions: keys arrive rotated; nanokv keeps every token's true position for masks and
for methods that read positions. StreamingLLM(reposition=True) renumbers them (its paper's
in-cache positions; nanokv/methods/streamingllm.py).
Padding: a left-padded batch (prompts of different lengths) is refused with an error; run
prompts of equal length together, or one at a time. A model split over devices (device_map):
every layer's store lives on that layer's device. Beam search and assisted decoding (which
reorder or crop a cache) are refused.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref

import torch

from .cache import CacheShape, KVCache
from .rope import rotate

ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3", "mistral")  # config.model_type values
ATTENTION = "nanokv"  # the attention implementation attach() registers
FIXED_ROPE = ("default", "linear", "llama3", "yarn")  # rope types whose frequencies do not depend on the length

# Per thread (two models may generate at once in two threads): `handoff`, the (key tensor,
# HFCache) of the last update(), which the attention function claims; `calling`, the attention
# module of an attached model now running (a forward pre-hook sets it)
_local = threading.local()
_previous = weakref.WeakKeyDictionary()  # model -> its attention implementation before attach()
_hooked = weakref.WeakSet()  # models whose attention modules carry the pre-hook

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # transformers is an optional dependency of nanokv
    raise ImportError("nanokv.hf needs transformers: pip install 'transformers>=5'") from e


def describe(model) -> tuple[CacheShape, list, int | None]:
    """(the CacheShape of a transformers causal LM, its attention modules in layer order, its
    sliding window or None); a clear error for an architecture nanokv does not handle."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ValueError(f"nanokv.hf supports {list(ARCHITECTURES)} causal LMs; got a {type(model).__name__} "
                         f"(model_type {kind!r})")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("nanokv.hf handles decoder-only models without cross-attention")
    n_layer, n_head = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    if sorted(m.layer_idx for m in modules) != list(range(n_layer)):
        raise ValueError(f"expected one attention module per layer ({n_layer}) in {type(model).__name__}, found "
                         f"{len(modules)}: is this a {kind} model as transformers builds it?")
    inv_freq = None
    if kind != "gpt2":
        rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        if rotary and rope.get("rope_type", rope.get("type", "default")) in FIXED_ROPE:
            inv_freq = rotary[0].inv_freq.detach().float().cpu()
    window = None
    if getattr(config, "sliding_window", None) and (
            kind == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or ())):
        window = int(config.sliding_window)
    shape = CacheShape(n_layer=n_layer, n_head=n_head, head_dim=head_dim,
                       n_kv_head=getattr(config, "num_key_value_heads", None) or n_head,
                       block_size=getattr(config, "max_position_embeddings", None), inv_freq=inv_freq, name=kind)
    return shape, sorted(modules, key=lambda m: m.layer_idx), window


def attach(model, method="full", backend: str = "torch", **method_kwargs) -> "HFCache":
    """A nanokv cache for `model` (a transformers GPT-2, Llama, Qwen2/3 or Mistral causal LM) that
    compresses with `method` (a name from nanokv.METHODS built with method_kwargs, or a Method).
    Switches the model's attention implementation to "nanokv" (see the module docstring). Pass
    the cache to generate() or forward() as past_key_values; one cache per sequence (batch)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    cache = HFCache(model, method, backend, **method_kwargs)  # checks the model first
    if model not in _hooked:  # so that update() knows which model's layer hands it keys
        for module in cache._modules:  # found by describe() when the cache was built
            module.register_forward_pre_hook(lambda module, args: setattr(_local, "calling", module))
        _hooked.add(model)
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    current = model.config._attn_implementation
    if current != ATTENTION:
        _previous[model] = current
        model.set_attn_implementation(ATTENTION)
    return cache


def detach(model):
    """Give the model back the attention implementation it had before attach()."""
    if model.config._attn_implementation == ATTENTION:
        model.set_attn_implementation(_previous.pop(model, "sdpa"))


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The "nanokv" attention function (transformers' sdpa signature): nanokv's cache attends when
    `key` came from an HFCache's update() in this layer; otherwise (the model run without a
    nanokv cache) plain sdpa."""
    held = getattr(_local, "handoff", None)
    if held is None or held[0] is not key:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    _local.handoff = None
    return held[1].attend(module, query, key, value, attention_mask, scaling, dropout, kwargs.get("position_ids"))


class _Slot(CacheLayerMixin):
    """One layer as transformers sees it: update() hands the new keys to the attention function;
    lengths and masks come from nanokv's layer."""

    is_sliding = False

    def __init__(self, cache: "HFCache", index: int):
        super().__init__()
        self.cache, self.index = cache, index

    def lazy_initialization(self, key_states, value_states):
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.cache.check_caller(getattr(_local, "calling", None), self.index)
        _local.calling, _local.handoff = None, (key_states, self.cache)
        self.is_initialized = True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cache.kv.seq_len_of(self.index)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers before 5.2x passes cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.2x

    def reset(self):
        self.is_initialized = False


class HFCache(Cache):
    """A transformers Cache whose layers are nanokv's (`self.kv`, a KVCache). Introspection as
    KVCache: memory_bytes(), memory_breakdown(), compression_report(), lengths(layer),
    kept_positions(layer, b, kv_head), kept_precision(layer, b, kv_head)."""

    def __init__(self, model, method="full", backend: str = "torch", **method_kwargs):
        self.shape, modules, self.window = describe(model)
        self.kv = KVCache(self.shape, method, backend, **method_kwargs)
        self.method = self.kv.method
        self._modules = weakref.WeakSet(modules)
        self._model = weakref.ref(model)
        super().__init__(layers=[_Slot(self, i) for i in range(self.shape.n_layer)])

    # ------------------------------------------------------------------ the call
    def check_caller(self, module, layer_idx: int):
        """Refuse keys from a model this cache was not attached to, or one that stopped attending
        through nanokv: it would read only the newest keys, a silently wrong answer."""
        if module not in self._modules or module.layer_idx != layer_idx:
            raise ValueError("this cache was attached to another model (its keys mean nothing to this one): "
                             "cache = nanokv.hf.attach(this_model, ...)")
        model = self._model()
        if model is not None and model.config._attn_implementation != ATTENTION:
            raise ValueError(f"the model attends with {model.config._attn_implementation!r}, which would read only "
                             "the newest keys from a nanokv cache: call nanokv.hf.attach(model, ...) again (or "
                             f"model.set_attn_implementation({ATTENTION!r}))")

    def attend(self, module, q, k, v, attention_mask, scaling, dropout, position_ids):
        """q (B, Hq, T, D), k and v (B, Hkv, T, D) of one layer's new tokens -> (B, T, Hq, D)."""
        if dropout:
            raise ValueError("attention dropout is on: nanokv's cache is for inference, call model.eval()")
        i, T = module.layer_idx, q.size(2)
        seen = self.kv.seq_len_of(i)
        if self.window is not None and seen + T > self.window:
            raise ValueError(f"this model attends within a sliding window of {self.window} tokens; nanokv.hf "
                             f"supports it up to the window only ({seen + T} tokens)")
        if attention_mask is not None and not bool(attention_mask[..., -1, :].all()):
            # the last query of a purely causal mask sees every key; one that does not meets padding
            raise ValueError("a padded batch (prompts of different lengths, attention_mask with zeros): nanokv's "
                             "cache needs rows of equal length; run such prompts one at a time")
        D = q.size(-1)
        if scaling is not None and scaling != D ** -0.5:  # nanokv attends with 1/sqrt(D): fold the rest into q
            q = q * (scaling * math.sqrt(D))
        if getattr(self.method, "reposition", False):  # the new tokens go to slots L .. L + T - 1 (StreamingLLM)
            layer = self.kv.layers[i] if self.kv.layers is not None else None
            held = layer.max_len if layer is not None else 0
            pos = position_ids if position_ids is not None else torch.arange(seen, seen + T, device=q.device)[None]
            delta = (torch.arange(held, held + T, device=q.device) - pos.to(q.device))[:, None, :]  # (B|1, 1, T)
            q, k = rotate(q, delta, self.shape.inv_freq), rotate(k, delta, self.shape.inv_freq)
        out = self.kv.attend(i, q, k, v)  # (B, Hq, T, D)
        return out.transpose(1, 2).contiguous(), None

    # ------------------------------------------------------------------ introspection (as KVCache)
    def memory_bytes(self) -> int:
        return self.kv.memory_bytes()

    def memory_breakdown(self) -> dict:
        return self.kv.memory_breakdown()

    def compression_report(self) -> dict:
        return self.kv.compression_report()

    def lengths(self, layer_idx: int):
        return self.kv.lengths(layer_idx)

    def kept_positions(self, layer_idx: int, batch: int = 0, kv_head: int = 0):
        return self.kv.kept_positions(layer_idx, batch, kv_head)

    def kept_precision(self, layer_idx: int, batch: int = 0, kv_head: int = 0):
        return self.kv.kept_precision(layer_idx, batch, kv_head)

    # ------------------------------------------------------------------ life cycle
    def reset(self):
        self.kv.reset()
        super().reset()

    def clone(self) -> "HFCache":
        """An independent copy (compress a context once, ask many questions)."""
        new = copy.copy(self)
        new.kv = self.kv.clone()
        new.method = new.kv.method
        new.layers = [_Slot(new, i) for i in range(self.shape.n_layer)]
        return new

    def _refuse(self, what):
        raise NotImplementedError(f"{what} is not supported with a nanokv cache (it reorders or crops what "
                                  "the method decided to keep); use greedy or sampled decoding")

    def reorder_cache(self, beam_idx):
        self._refuse("beam search")

    def crop(self, tokens_to_remove: int):
        self._refuse("cropping the cache (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int):
        if self.kv.layers is not None and repeats != 1:
            self._refuse("expanding the batch (num_return_sequences, beam search)")

    def batch_select_indices(self, indices):
        self._refuse("selecting batch rows")

    def __repr__(self):
        return f"HFCache({self.shape.name}, {self.kv!r})"


# ---------------------------------------------------------------------- the evaluation's view of a model
class CausalLM:
    """A transformers causal LM and its tokenizer behind the interface nanokv's evaluation uses
    (python -m nanokv.eval --model hf:NAME_OR_DIR): model(ids, cache=..., last_logits_only=...)
    -> (logits, None), .tokenizer.encode/decode, .config (a CacheShape whose block_size is the
    context the evaluation uses), new_cache(method)."""

    def __init__(self, model, tokenizer, context: int | None = None):
        self.hf = model.eval()
        self.config, _, window = describe(model)
        limit = min(self.config.block_size or 2048, window or 2048, 2048)
        if context is not None and not 16 <= context <= (self.config.block_size or context):
            raise ValueError(f"context must be in [16, {self.config.block_size}] for this model, got {context}")
        self.config.block_size = context or limit  # a CPU-sized default: at most 2048 tokens
        self.tokenizer = _Tokenizer(tokenizer)
        self.tokenizer_name = getattr(tokenizer, "name_or_path", "hf")

    def __call__(self, idx, cache=None, last_logits_only: bool = False):
        out = self.hf(idx, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1 if last_logits_only else 0)
        return out.logits, None

    def new_cache(self, method) -> HFCache:
        return attach(self.hf, method)

    def parameters(self):
        return self.hf.parameters()

    def eval(self):
        return self


class _Tokenizer:
    """encode (no special tokens) and decode, as nanokv's tokenizers."""

    name = "hf"

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def load(name_or_dir: str, context: int | None = None, dtype=torch.float32) -> CausalLM:
    """A transformers causal LM with its own tokenizer: a local save_pretrained directory
    (offline) or a Hub name (downloaded, or from the local Hugging Face cache)."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(name_or_dir)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype, local_files_only=local)
    except OSError as e:
        raise OSError(f"cannot load {name_or_dir!r} with its tokenizer ({e}); offline, pass a directory written by "
                      "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)") from e
    return CausalLM(model, tok, context)
