"""
Tokenizers: a byte-level one (vocabulary 256, no files), bytes plus digit pairs (vocabulary 456,
no files), nanokv's own small BPE for tiny models (vocabulary 2048, committed in nanokv/assets,
no download) and GPT-2's BPE.

    tok = get_tokenizer("byte")                 # always available
    tok = get_tokenizer("bytedigits")           # always available
    tok = get_tokenizer("tinybpe")              # always available (nanokv/assets/tinybpe.tiktoken)
    tok = get_tokenizer("gpt2")                 # tiktoken's normal download (online)
    tok = get_tokenizer("gpt2", gpt2_dir=DIR)   # offline: DIR holds gpt2.tiktoken,
                                                # or encoder.json + vocab.bpe
The environment variable NANOKV_GPT2_DIR gives the offline directory when gpt2_dir is not set.
All round-trip text exactly: decode(encode(s)) == s.

Why a subword vocabulary for the tiny model: with bytes, a 5-digit passkey is five tokens and
its answer starts with a space that needs no retrieval, so nothing the model computes at the
question can point at the digits (every importance-based method then scores them like filler).
`tinybpe` splits digit runs into pairs (" 4813" -> " 48", "13"), so a 4-digit value is two
tokens, the first of which the question's last token must fetch directly. `bytedigits` does the
same for digits only and keeps every other character a byte, so a byte-level model can be widened
to it and keep what it learned (train_tiny.py --init nanokv-tiny-byte --tokenizer bytedigits).
"""

from __future__ import annotations

import os
import re

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
# tinybpe: GPT-2's split, except that a digit run splits into pairs (an optional space + 2 digits)
TINYBPE_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,2}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TINYBPE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tinybpe.tiktoken")
TINYBPE_VOCAB = 2048


class ByteTokenizer:
    """UTF-8 bytes as tokens: token i is byte i."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class ByteDigitTokenizer:
    """UTF-8 bytes, plus one token per digit pair: "00".."99" are ids 256..355 and " 00".." 99"
    (the pair with the space before it) are ids 356..455. A run of digits splits into pairs from
    its left; a space just before the run joins its first pair; an odd last digit stays a byte.

        " 4813." -> [" 48", "13", "."]      "12345" -> ["12", "34", "5"]      " 7" -> [" ", "7"]
    """

    name = "bytedigits"
    vocab_size = 456
    RUN = re.compile(rb" ?[0-9]+")

    def encode(self, text: str) -> list[int]:
        data, ids, at = text.encode("utf-8"), [], 0
        for m in self.RUN.finditer(data):
            ids.extend(data[at:m.start()])
            run = m.group()
            if run[:1] == b" " and len(run) >= 3:  # " 48..." -> " 48"
                ids.append(356 + int(run[1:3]))
                run = run[3:]
            elif run[:1] == b" ":  # " 7": a space and one digit stay bytes
                ids.append(run[0])
                run = run[1:]
            for i in range(0, len(run) - 1, 2):
                ids.append(256 + int(run[i:i + 2]))
            if len(run) % 2:
                ids.append(run[-1])
            at = m.end()
        ids.extend(data[at:])
        return ids

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside bytedigits' vocabulary [0, {self.vocab_size})")
            out += self.pieces(i)
        return out.decode("utf-8", errors="replace")

    @staticmethod
    def pieces(i: int) -> bytes:
        """The bytes token i stands for (the widening of a byte model's embeddings uses them)."""
        return bytes([i]) if i < 256 else (b"" if i < 356 else b" ") + b"%02d" % ((i - 256) % 100)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken."""

    name = "gpt2"

    def __init__(self, gpt2_dir: str | None = None):
        import tiktoken

        gpt2_dir = gpt2_dir or os.environ.get("NANOKV_GPT2_DIR")
        if gpt2_dir is None:
            try:
                self.enc = tiktoken.get_encoding("gpt2")  # downloads once, then tiktoken caches it
            except Exception as e:  # noqa: BLE001 - requests' and urllib's errors alike
                raise ConnectionError(
                    f"cannot download GPT-2's tokenizer files ({type(e).__name__}). Offline, point the "
                    "environment variable NANOKV_GPT2_DIR (or gpt2_dir=, or --gpt2-dir) at a directory holding "
                    "gpt2.tiktoken, or encoder.json + vocab.bpe, or a Hugging Face GPT-2 folder's vocab.json + "
                    "merges.txt") from None
        else:
            self.enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN,
                                         mergeable_ranks=_local_ranks(gpt2_dir),
                                         special_tokens={"<|endoftext|>": GPT2_EOT})
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


class TinyBPETokenizer:
    """nanokv's own byte-level BPE (vocabulary 2048) through tiktoken, from a committed file.
    Trained once on the built-in corpus by `train_bpe` (python train_tiny.py --train-tokenizer)."""

    name = "tinybpe"

    def __init__(self, path: str = TINYBPE_FILE):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tinybpe vocabulary {path!r} not found; "
                                    "make it with python train_tiny.py --train-tokenizer")
        self.enc = tiktoken.Encoding(name="tinybpe", pat_str=TINYBPE_PATTERN,
                                     mergeable_ranks=load_tiktoken_bpe(path), special_tokens={})
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


def train_bpe(texts, path: str = TINYBPE_FILE, vocab_size: int = TINYBPE_VOCAB) -> dict:
    """Train tinybpe's merges on `texts` (an iterable of str) with Hugging Face `tokenizers` (a
    development dependency; loading needs only tiktoken) and write them in tiktoken's format.

    Ranks: the 256 bytes, then every digit pair a value can need ("00".."99", " 0".." 9",
    " 00".." 99", so every 4-digit number is exactly two tokens whatever the corpus held), then
    the learned merges in the order they were learned, until vocab_size tokens."""
    import base64
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TINYBPE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    # ByteLevel maps each byte to a printable character; invert that map
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(extra)}
    ranks = {bytes([b]): b for b in range(256)}
    digits = [f"{a}{b}" for a in range(10) for b in range(10)]
    for t in digits + [f" {d}" for d in range(10)] + [" " + d for d in digits]:
        ranks[t.encode()] = len(ranks)
    for merge in json.loads(tk.to_str())["model"]["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(to_byte[c] for c in a + b)
        if len(ranks) >= vocab_size:
            break
        ranks.setdefault(token, len(ranks))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return ranks


def _local_ranks(gpt2_dir: str) -> dict:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

    tk = os.path.join(gpt2_dir, "gpt2.tiktoken")
    if os.path.isfile(tk):
        return load_tiktoken_bpe(tk)
    # OpenAI's file names, or the same two files as a Hugging Face GPT-2 folder names them
    for merges, encoder in (("vocab.bpe", "encoder.json"), ("merges.txt", "vocab.json")):
        merges, encoder = os.path.join(gpt2_dir, merges), os.path.join(gpt2_dir, encoder)
        if os.path.isfile(merges) and os.path.isfile(encoder):
            return data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=merges, encoder_json_file=encoder)
    raise FileNotFoundError(
        f"gpt2_dir {gpt2_dir!r} holds neither gpt2.tiktoken, nor encoder.json + vocab.bpe, nor vocab.json + merges.txt"
    )


def get_tokenizer(name: str = "byte", gpt2_dir: str | None = None):
    if name == "byte":
        return ByteTokenizer()
    if name == "bytedigits":
        return ByteDigitTokenizer()
    if name == "tinybpe":
        return TinyBPETokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(gpt2_dir)
    raise ValueError(f"unknown tokenizer {name!r}; valid tokenizers: ['byte', 'bytedigits', 'tinybpe', 'gpt2']")
