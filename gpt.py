"""
A nanoGPT-sized GPT-2 in one file, whose attention can run through a KV cache.

    logits, loss = model(idx, targets=None, cache=None)

Without a cache the model is a plain causal transformer (training, scoring).
With a `nanokv.KVCache`, every attention layer hands the cache the q, k, v of its
new tokens and gets the attention output back: the cache owns attention, so the
model never knows which compression method (if any) is in use. The first call
with a cache is the prefill; later calls carry one token (decode) or a chunk.

GPT-2 details kept here: learned absolute positions, pre-LayerNorm blocks,
tanh-approximate GELU, tied input/output embeddings, LayerNorm eps 1e-5.
Positions are absolute and learned, so a token keeps its true position however
much a cache evicts; positions at or past `block_size` are refused (streaming
past the block size is out of scope for this model).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

HF_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_ALIASES = {f"openai-community/{n}": n for n in HF_NAMES}  # the Hub's current ids
# the tiny byte-level checkpoint that ships with nanokv (trained by train_tiny.py; see README)
TINY_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nanokv", "assets", "tiny.pt")
# the byte-level model the committed one was widened from (lesson 12: why bytes hide importance)
TINY_BYTE_CHECKPOINT = os.path.join(os.path.dirname(TINY_CHECKPOINT), "tiny-byte.pt")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (number of learned positions)
    vocab_size: int = 50257  # GPT-2 BPE; 256 for the byte tokenizer
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, as GPT-2
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig got unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # tiny byte-level models that train on a laptop CPU
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=512, vocab_size=256),
    "nano": dict(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=256),
}


def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity when p == 0: an evaluating nn.Dropout still costs a few
    microseconds per call, which a tiny model's decode step (13 of them) notices."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = dropout_layer(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        # (B, T, 3C) -> (B, T, 3, H, D) -> three (B, H, T, D) views: q, k, v
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None:
            drop = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            y = cache.attend(self.layer_idx, q, k, v)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C), heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = dropout_layer(config.dropout)

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


def column_major(linear: nn.Linear):
    """Store linear's (out, in) weight column-major (strides (1, out)); values, shape and state_dict
    keys are unchanged. A decode step's x @ W^T then reads W^T row by row, which CPU BLAS streams
    faster when out >= in (2026-11-30, 2 cores, weights not in cache: 768 -> 2304 1.35x, 768 -> 3072
    1.42x, GPT-2's 768 -> 50257 logits 1.7x; 3072 -> 768 is slower, so mlp.c_proj stays row-major)."""
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())


def guess_tokenizer(vocab_size: int) -> str | None:
    """The nanokv tokenizer a vocabulary size implies, or None."""
    return {256: "byte", 456: "bytedigits", 2048: "tinybpe", 50257: "gpt2"}.get(vocab_size)


def check_ids(idx, vocab_size: int):
    """idx must be a (B, T) integer tensor of ids in [0, vocab_size), T >= 1: a clear error otherwise."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a (B, T) tensor of token ids, e.g. torch.tensor([ids]); got "
                        f"{type(idx).__name__}")
    if idx.dtype not in (torch.long, torch.int):
        raise TypeError(f"idx must hold integer token ids (torch.long), got dtype {idx.dtype}")
    if idx.dim() != 2:
        hint = " (one sequence: idx[None])" if idx.dim() == 1 else ""
        raise ValueError(f"idx must be 2-D (B, T), got shape {tuple(idx.shape)}{hint}")
    if idx.size(1) == 0:
        raise ValueError("idx must hold at least one token (got T=0)")
    if idx.device.type == "meta":  # shapes only (no values to check)
        return
    lo, hi = torch.aminmax(idx)
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}) (the vocabulary), got ids from {int(lo)} to {int(hi)}")


def state_digest(state: dict) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) in name order: stored beside the weights
    by save_checkpoint and checked by from_pretrained, so a damaged file is refused."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_finite(state: dict, where: str):
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise ValueError(f"{where} holds NaN or inf weights in {bad}")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, tokenizer: str | None = None):
        super().__init__()
        self.config = config
        # name of the tokenizer this model was trained with ("byte", "tinybpe" or "gpt2"; None when
        # no nanokv tokenizer fits the vocabulary); see nanokv.tokenizer
        self.tokenizer_name = tokenizer if tokenizer is not None else guess_tokenizer(config.vocab_size)
        self.tokenizer_dir = None  # a Hugging Face directory's own GPT-2 tokenizer files, if it has them
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=dropout_layer(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weights with more outputs than inputs are stored column-major (see column_major): the
        # tied embedding / output matrix (lookups then gather columns), c_attn, c_fc, attn.c_proj.
        for block in self.transformer.h:
            for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc):
                column_major(linear)
        column_major(self.lm_head)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    @property
    def tokenizer(self):
        """The tokenizer this model was trained with (a nanokv.tokenizer object)."""
        from nanokv.tokenizer import get_tokenizer

        if self.tokenizer_name is None:
            raise ValueError(f"no nanokv tokenizer matches this model's vocabulary of {self.config.vocab_size} "
                             "tokens (byte: 256, tinybpe: 2048, gpt2: 50257); encode text with the model's own "
                             "tokenizer and pass token ids")
        return get_tokenizer(self.tokenizer_name, gpt2_dir=self.tokenizer_dir)

    def forward(self, idx, targets=None, cache=None, last_logits_only: bool = False):
        """idx (B, T) token ids -> logits (B, T, V) (or (B, 1, V) with last_logits_only), loss."""
        check_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        if cache is not None:
            if getattr(cache, "config", None) != self.config:
                raise ValueError(f"this cache was built for another model config ({getattr(cache, 'config', None)}); "
                                 f"build it with KVCache(model.config, ...) for this model ({self.config})")
            cache.bind(self)  # a cache serves one model
        start = 0 if cache is None else cache.seq_len  # position of the first new token
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens (positions {start}..{start + T - 1}) is past the "
                f"model's block_size {self.config.block_size}: GPT-2 positions are learned and absolute"
            )
        if cache is not None and (targets is not None) and self.training:
            raise ValueError("training with a cache is not supported; call model(idx, targets) without one")
        pos_emb = self.transformer.wpe.weight[start : start + T]  # (T, C): positions start..start+T-1
        x = self.transformer.drop(self.transformer.wte(idx) + pos_emb)
        for block in self.transformer.h:
            x = block(x, cache)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        if last_logits_only:
            x = x[:, -1:, :]
        return self.lm_head(x), None

    def generate(self, idx, max_new_tokens: int, cache=None, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None):
        """Continue idx (B, T) by max_new_tokens tokens. temperature=0 is greedy decoding.

        With a cache (any nanokv.KVCache, compressed or not) the prompt is prefilled once and
        each new token is a one-token decode step; with cache=None a fresh full cache is used.
        A cache that already holds a context is continued: idx then holds only the new tokens.

        Runs under torch.no_grad(); with cache=None under torch.inference_mode(), which also
        skips autograd's version counting (tiny model: about 10% faster steps). A caller's cache
        is not run that way: tensors made in inference mode cannot be written outside it, so
        that cache could not be continued later.
        """
        check_ids(idx, self.config.vocab_size)
        if isinstance(max_new_tokens, bool) or not hasattr(max_new_tokens, "__index__"):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__} {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        if cache is not None:
            with torch.no_grad():
                return self._decode(idx, max_new_tokens, cache, temperature, top_k, generator)
        from nanokv.cache import KVCache
        from nanokv.methods.full import FullCache

        with torch.inference_mode():  # the cache made here never leaves this call
            out = self._decode(idx, max_new_tokens, KVCache(self.config, FullCache()), temperature, top_k, generator)
        return out.clone()  # a normal tensor again (inference tensors refuse in-place writes)

    def _decode(self, idx, max_new_tokens, cache, temperature, top_k, generator):
        """generate()'s loop: prefill idx into the cache, then one token per step."""
        total = cache.seq_len + idx.size(1) + max_new_tokens - 1
        if max_new_tokens and total >= self.config.block_size:
            raise ValueError(
                f"generating {max_new_tokens} tokens after {cache.seq_len + idx.size(1)} would reach "
                f"position {total}, past block_size {self.config.block_size}"
            )
        out, step = idx, idx
        for i in range(max_new_tokens):
            logits, _ = self(step, cache=cache, last_logits_only=True)
            if i == 0:  # after the prefill: room for the tokens to come, so the buffers do not regrow
                cache.reserve(max_new_tokens - 1)
            logits = logits[:, -1, :].float()
            if not torch.isfinite(logits).all():  # never decode from NaN (argmax would say token 0 forever)
                raise FloatingPointError(f"non-finite logits at generation step {i}: the model's weights or "
                                         "activations hold NaN or inf")
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            out = torch.cat((out, nxt), dim=1)
            step = nxt
        return out

    # ------------------------------------------------------------------ loading and saving
    def save_checkpoint(self, path: str, half: bool = False, **extra):
        """Save config, tokenizer name and weights (plus any extra fields) to one .pt file."""
        state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in self.state_dict().items()}
        state.pop("lm_head.weight", None)  # tied to transformer.wte.weight
        ckpt = {"format": "nanokv-gpt", "config": self.config.to_dict(),
                "tokenizer": self.tokenizer_name, "model": state, "digest": state_digest(state), **extra}
        torch.save(ckpt, path)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None) -> "GPT":
        """Load GPT-2 weights.

        name_or_path is one of:
          - "nanokv-tiny": the tiny checkpoint committed in nanokv/assets/tiny.pt (tokenizer
            bytedigits: bytes plus digit pairs);
          - "nanokv-tiny-byte": the byte-level model it was fine-tuned from (nanokv/assets/tiny-byte.pt);
          - a Hugging Face name: gpt2, gpt2-medium, gpt2-large, gpt2-xl (needs transformers and internet);
          - a local directory saved by transformers' save_pretrained (config.json plus
            model.safetensors or pytorch_model.bin); works offline, transformers not needed;
          - a nanokv checkpoint file (.pt) written by GPT.save_checkpoint / train_tiny.py.
        """
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
        path = os.fspath(name_or_path)
        if path in ("nanokv-tiny", "nanokv-tiny-byte"):
            path = TINY_CHECKPOINT if path == "nanokv-tiny" else TINY_BYTE_CHECKPOINT
        hub_name = HF_ALIASES.get(path, path)  # a Hugging Face name, in its short form, or None
        hub_name = hub_name if hub_name in HF_NAMES else None
        if os.path.isdir(path) and not (hub_name and not os.path.isfile(os.path.join(path, "config.json"))):
            config, state = _read_hf_dir(path)  # (a ./gpt2/ folder without config.json is not a model)
            model = cls(config)
            model.load_state_dict_strict(_hf_to_ours(state, config), where=path)
            if all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
                model.tokenizer_dir = path  # its own GPT-2 BPE files: the tokenizer works offline
        elif os.path.isfile(path):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
                raise ValueError(f"cannot read checkpoint {path!r}: {e}") from e
            if not isinstance(ckpt, dict) or ckpt.get("format") != "nanokv-gpt":
                raise ValueError(f"{path!r} is not a nanokv checkpoint (no 'format': 'nanokv-gpt' entry)")
            if "digest" in ckpt and state_digest(ckpt["model"]) != ckpt["digest"]:
                raise ValueError(f"checkpoint {path!r} is damaged: its weights do not match the SHA-256 digest "
                                 "saved with them")
            model = cls(GPTConfig.from_dict(ckpt["config"]), tokenizer=ckpt.get("tokenizer"))
            state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
            model.load_state_dict_strict(state, where=path)
            model.checkpoint_info = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
        elif hub_name:
            try:
                from transformers import GPT2LMHeadModel
            except ImportError as e:
                raise ImportError(
                    f"loading {path!r} from the Hugging Face Hub needs transformers: "
                    "pip install 'nanokv[dev]' (or pass a local save_pretrained directory)"
                ) from e
            hf = _hub_model(GPT2LMHeadModel, path)
            config = _config_from_hf(hf.config.to_dict())
            model = cls(config, tokenizer="gpt2")
            model.load_state_dict_strict(_hf_to_ours(hf.state_dict(), config), where=path)
        else:
            raise ValueError(
                f"unknown model {path!r}: not a file or directory, and not one of the Hugging Face "
                f"names {list(HF_NAMES) + list(HF_ALIASES)}"
            )
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def load_state_dict_strict(self, state: dict, where: str = "checkpoint"):
        """Load weights, raising one error that lists every missing, unexpected or mis-shaped tensor,
        or names the tensors holding NaN or inf."""
        own = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        misshaped = sorted(
            f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
            for k in set(own) & set(state) if own[k].shape != state[k].shape
        )
        if missing or unexpected or misshaped:
            raise ValueError(
                "checkpoint does not match the model config:"
                + (f"\n  missing tensors: {missing}" if missing else "")
                + (f"\n  unexpected tensors: {unexpected}" if unexpected else "")
                + (f"\n  mis-shaped tensors: {misshaped}" if misshaped else "")
            )
        check_finite(state, where)
        self.load_state_dict(state, strict=False)
        self.lm_head.weight = self.transformer.wte.weight  # keep the tie


# ---------------------------------------------------------------------- Hugging Face conversion
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# GPT2Config fields that change the computation, and the only values our GPT computes. A config
# with any other value is refused (never loaded and silently computed differently).
HF_REQUIRED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # tanh-approximate GELU
    "scale_attn_weights": (True,),  # scores divided by sqrt(head_dim)
    "scale_attn_by_inverse_layer_idx": (False,),  # no extra 1/(layer+1) scaling
    "reorder_and_upcast_attn": (False,),  # the plain attention order
    "tie_word_embeddings": (True,),  # lm_head is the token embedding
    "add_cross_attention": (False,),  # a decoder-only model
}


def _config_from_hf(d: dict) -> GPTConfig:
    """Our GPTConfig from a transformers GPT2Config dict; refuses any field value we would not
    compute exactly as transformers does (parity within 1e-5 is tested for what is accepted)."""
    if d.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json is a {d.get('model_type')!r} model; GPT.from_pretrained loads GPT-2 only "
                         "(other architectures: nanokv.hf)")
    for key, allowed in HF_REQUIRED.items():
        value = d.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"unsupported GPT-2 config: {key}={value!r} (nanokv's GPT computes only "
                             f"{key} in {list(allowed)}); loading it would give wrong logits")
    n_inner = d.get("n_inner")
    if n_inner is not None and n_inner != 4 * d.get("n_embd", -1):
        raise ValueError(f"unsupported GPT-2 config: n_inner={n_inner} (nanokv's MLP is 4 * n_embd = "
                         f"{4 * d.get('n_embd', 0)} wide)")
    try:
        return GPTConfig(block_size=d["n_positions"], vocab_size=d["vocab_size"], n_layer=d["n_layer"],
                         n_head=d["n_head"], n_embd=d["n_embd"],
                         layer_norm_eps=d.get("layer_norm_epsilon", 1e-5))
    except KeyError as e:
        raise ValueError(f"config.json lacks the GPT-2 field {e}") from e


def _hub_model(cls, name: str):
    """transformers' from_pretrained for a Hub name: from the local Hugging Face cache when it is
    there, else a download; offline, fail at once with the local-directory route (not after
    transformers' retries)."""
    try:
        return cls.from_pretrained(name, local_files_only=True)
    except OSError:
        pass  # not cached
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline:
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError:
            offline = True
    if offline:
        raise OSError(f"cannot download {name!r}: the Hugging Face Hub ({host}) is not reachable and the model is "
                      "not in the local cache. Offline: on a machine with internet run "
                      f"transformers.GPT2LMHeadModel.from_pretrained({name!r}).save_pretrained(DIR) (and the "
                      "tokenizer's save_pretrained(DIR)), copy DIR here and load GPT.from_pretrained(DIR)")
    return cls.from_pretrained(name)


def _read_hf_dir(path: str):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path!r} is not a save_pretrained directory: no config.json")
    with open(cfg_path) as f:
        config = _config_from_hf(json.load(f))
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file

            state = load_file(st)
        elif os.path.isfile(pt):
            state = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{path!r} holds no model.safetensors or pytorch_model.bin")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read the weights in {path!r}: {e}") from e
    return config, state


def _hf_to_ours(state: dict, config: GPTConfig) -> dict:
    """Rename HF GPT-2 tensors to ours and transpose the four Conv1D weights (stored as (in, out))."""
    out = {}
    for key, value in state.items():
        k = key[len("transformer."):] if key.startswith("transformer.") else key
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers of older transformers versions, not weights
        if k == "lm_head.weight":
            continue  # tied to wte
        if any(k.endswith(s) for s in _CONV1D):
            value = value.t()
        out[k if k.startswith("lm_head") else "transformer." + k] = value.float().contiguous()
    return out
