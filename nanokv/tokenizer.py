"""
Tokenizers: a byte-level one for tiny models (vocabulary 256, no files) and GPT-2's BPE.

    tok = get_tokenizer("byte")                 # always available
    tok = get_tokenizer("gpt2")                 # tiktoken's normal download (online)
    tok = get_tokenizer("gpt2", gpt2_dir=DIR)   # offline: DIR holds gpt2.tiktoken,
                                                # or encoder.json + vocab.bpe
The environment variable NANOKV_GPT2_DIR gives the offline directory when gpt2_dir is not set.
Both round-trip text exactly: decode(encode(s)) == s.
"""

from __future__ import annotations

import os

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256


class ByteTokenizer:
    """UTF-8 bytes as tokens: token i is byte i."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken."""

    name = "gpt2"

    def __init__(self, gpt2_dir: str | None = None):
        import tiktoken

        gpt2_dir = gpt2_dir or os.environ.get("NANOKV_GPT2_DIR")
        if gpt2_dir is None:
            self.enc = tiktoken.get_encoding("gpt2")  # downloads once, then tiktoken caches it
        else:
            self.enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN,
                                         mergeable_ranks=_local_ranks(gpt2_dir),
                                         special_tokens={"<|endoftext|>": GPT2_EOT})
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


def _local_ranks(gpt2_dir: str) -> dict:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

    tk = os.path.join(gpt2_dir, "gpt2.tiktoken")
    vocab, encoder = os.path.join(gpt2_dir, "vocab.bpe"), os.path.join(gpt2_dir, "encoder.json")
    if os.path.isfile(tk):
        return load_tiktoken_bpe(tk)
    if os.path.isfile(vocab) and os.path.isfile(encoder):
        return data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab, encoder_json_file=encoder)
    raise FileNotFoundError(
        f"gpt2_dir {gpt2_dir!r} holds neither gpt2.tiktoken nor encoder.json + vocab.bpe"
    )


def get_tokenizer(name: str = "byte", gpt2_dir: str | None = None):
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(gpt2_dir)
    raise ValueError(f"unknown tokenizer {name!r}; valid tokenizers: ['byte', 'gpt2']")
