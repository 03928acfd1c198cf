"""
Synthetic retrieval episodes: the work on which KV-cache compression shows its cost.

passkey (needle in a haystack): a random 5-digit number is stated once, at a chosen depth of
natural filler text, and asked for at the end:

    <filler> The pass key is 48213. Remember it. <filler>
    What is the pass key? The pass key is| 48213

line retrieval (the LongEval task MiKV evaluates on): a list of `line <key>: <value>` lines,
then a question for one key:

    line parser: 48213
    line module: 90417
    ...
    What is in line module? line module:| 90417

An Episode holds token ids: `prompt` (context + question) and `answer` (`|` above marks where
the answer starts; `qspace=True` moves the space into the question: `... key is |48213`).
The question-agnostic protocol prefills `prompt[:context_len]`, compresses, then feeds `prompt[context_len:]`.
Values have `digits` digits: 5 for the byte tokenizer (the committed byte model's format),
4 for subword tokenizers, where tinybpe makes a 4-digit value exactly two tokens (" 48", "13").
Generation is seeded (`random.Random(seed)`) and reproducible; the answer string occurs in the
prompt exactly once; the episode is exactly `length` tokens long (prompt + answer).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

PASSKEY_NEEDLE = " The pass key is {key}. Remember it. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
LINE = "line {key}: {value}\n"
LINES_QUESTION = "\nWhat is in line {key}? line {key}:"


@dataclass
class Episode:
    kind: str  # "passkey" or "lines"
    prompt: list[int]  # context + question tokens
    answer: list[int]  # answer tokens (the model must produce these greedily)
    answer_text: str
    context_len: int  # tokens before the question
    needle_start: int  # token index where the needle (or the asked line) starts
    depth: float  # requested depth in [0, 1]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.answer)


def default_digits(tok) -> int:
    """Digits of a passkey or line value: 5 with bytes, 4 with a subword tokenizer."""
    return 5 if getattr(tok, "name", None) == "byte" else 4


def _qa(tok, question: str, value: str, qspace: bool) -> tuple[list[int], list[int]]:
    """(question tokens, answer tokens). qspace=False [default]: the answer is " 48213", as the
    value reads in the needle. qspace=True: the question ends with the space and the answer is
    "48213", so with the byte tokenizer the question's last query must fetch the value's first
    digit from the needle at prefill (an experiment for issue 17: the committed byte model's
    answer starts with a space that needs no retrieval, which hides the value's importance)."""
    if qspace:
        return tok.encode(question + " "), tok.encode(value)
    return tok.encode(question), tok.encode(" " + value)


def _value(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def min_episode_length(tok, digits: int | None = None) -> int:
    """The shortest `length` (prompt + answer tokens) for which both kinds of episode fit with this
    tokenizer: passkey's needle, question and answer; two lines of the longest keys and their question."""
    value = "9" * (default_digits(tok) if digits is None else digits)
    passkey = (len(tok.encode(PASSKEY_NEEDLE.format(key=value))) + len(tok.encode(PASSKEY_QUESTION))
               + len(tok.encode(" " + value)) + 1)
    line = len(tok.encode(LINE.format(key="x" * 8, value=value)))
    lines = 2 * line + 4 + len(tok.encode(LINES_QUESTION.format(key="x" * 8))) + 6 + len(tok.encode(" " + value))
    return max(48, passkey, lines)


def _check(length, depth, minimum):
    if not isinstance(length, int) or length < minimum:
        raise ValueError(f"length must be an int >= {minimum} tokens, got {length!r}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def passkey_episode(rng: random.Random, tok, filler: list[int], length: int,
                    depth: float | None = None, digits: int | None = None, qspace: bool = False) -> Episode:
    """A passkey episode of exactly `length` tokens; `filler` is tokenized natural text."""
    _check(length, depth, 48)
    depth = rng.random() if depth is None else depth
    digits = default_digits(tok) if digits is None else digits
    while True:
        key = _value(rng, digits)
        needle = tok.encode(PASSKEY_NEEDLE.format(key=key))
        question, answer = _qa(tok, PASSKEY_QUESTION, key, qspace)
        n_fill = length - len(needle) - len(question) - len(answer)
        if n_fill < 0 or len(filler) < n_fill + 1:
            raise ValueError(f"length {length} too short for the needle, or filler text too short")
        start = rng.randrange(0, len(filler) - n_fill)
        chunk = filler[start:start + n_fill]
        if key not in tok.decode(chunk):  # the answer must occur exactly once
            break
    cut = round(depth * n_fill)
    context = chunk[:cut] + needle + chunk[cut:]
    return Episode("passkey", context + question, answer, key, len(context), cut, depth)


def words_from(text: str, lo: int = 4, hi: int = 8) -> list[str]:
    """Distinct lowercase words of lo..hi letters, sorted: the keys of line retrieval."""
    return sorted(set(re.findall(rf"\b[a-z]{{{lo},{hi}}}\b", text)))


def lines_episode(rng: random.Random, tok, filler: list[int], words: list[str], length: int,
                  depth: float | None = None, digits: int | None = None, qspace: bool = False) -> Episode:
    """A line-retrieval episode of exactly `length` tokens. Lines fill the context; the gap
    left at the start (less than one line) is natural filler text."""
    _check(length, depth, 48)
    depth = rng.random() if depth is None else depth
    digits = default_digits(tok) if digits is None else digits
    keys, values, lines = [], set(), []
    budget = length - 4 - len(tok.encode(LINES_QUESTION.format(key="x" * 8))) - 6  # room for question
    used = 0
    if len(set(words)) < 2:
        raise ValueError("line retrieval needs at least two distinct key words in the text")
    while len(keys) < len(set(words)):  # until the budget is full or the words run out
        key = rng.choice(words)
        value = _value(rng, digits)
        if key in keys or value in values:
            continue
        line = tok.encode(LINE.format(key=key, value=value))
        if used + len(line) > budget:
            break
        keys.append(key)
        values.add(value)
        lines.append(line)
        used += len(line)
    if len(lines) < 2:
        raise ValueError(f"length {length} leaves room for fewer than two lines")
    ask = round(depth * (len(lines) - 1))
    key = keys[ask]
    value = tok.decode(lines[ask]).split(": ")[1].strip()
    question, answer = _qa(tok, LINES_QUESTION.format(key=key), value, qspace)
    n_fill = length - used - len(question) - len(answer)
    while True:  # the answer must occur exactly once: not in the filler either
        start = rng.randrange(0, len(filler) - n_fill)
        head = filler[start:start + n_fill]
        if value not in tok.decode(head):
            break
    context, needle_start = list(head), None
    for i, line in enumerate(lines):
        if i == ask:
            needle_start = len(context)
        context += line
    return Episode("lines", context + question, answer, value, len(context), needle_start, depth)


def repeat_row(rng: random.Random, tok, length: int, lo: int = 6, hi: int = 40) -> list[int]:
    """A training aid, not an evaluation task: a random string of lo..hi digits and letters,
    repeated to fill `length` tokens. Every repetition after the first is predictable only by
    copying, which makes induction ("copy what followed last time") heads form quickly."""
    chars = "0123456789abcdefghijklmnopqrstuvwxyz"
    unit = "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi))) + " "
    reps = length // len(tok.encode(unit)) + 2
    ids = tok.encode(unit * reps)
    while len(ids) < length:  # a subword tokenizer may merge across repetitions
        reps *= 2
        ids = tok.encode(unit * reps)
    return ids[:length]


def make_episode(kind: str, rng, tok, filler, words, length, depth=None, digits=None, qspace=False) -> Episode:
    if kind == "passkey":
        return passkey_episode(rng, tok, filler, length, depth, digits, qspace)
    if kind == "lines":
        return lines_episode(rng, tok, filler, words, length, depth, digits, qspace)
    raise ValueError(f"unknown episode kind {kind!r}; valid kinds: ['passkey', 'lines']")


def greedy_answer(model, episode: Episode, cache=None, question_agnostic: bool = True) -> list[int]:
    """Greedily generate len(episode.answer) tokens after the prompt, through `cache`
    (a fresh full cache when None). question_agnostic=True prefills the context alone (the
    method compresses it without seeing the question), then feeds the question as a chunk;
    False prefills context + question at once (question-aware, as SnapKV's paper does)."""
    import torch

    from .cache import KVCache

    cache = KVCache(model.config, "full") if cache is None else cache
    dev = next(model.parameters()).device
    prompt = torch.tensor([episode.prompt], dtype=torch.long, device=dev)
    chunks = [prompt[:, :episode.context_len], prompt[:, episode.context_len:]] if question_agnostic else [prompt]
    with torch.no_grad():
        for chunk in chunks:
            logits, _ = model(chunk, cache=cache, last_logits_only=True)
        out = []
        for i in range(len(episode.answer)):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            if i + 1 < len(episode.answer):
                logits, _ = model(nxt, cache=cache, last_logits_only=True)
    return out


def exact_match(model, episodes, make_cache=None, question_agnostic: bool = True) -> float:
    """Fraction of episodes whose greedy answer equals the answer exactly."""
    hits = 0
    for ep in episodes:
        cache = make_cache() if make_cache is not None else None
        hits += greedy_answer(model, ep, cache, question_agnostic) == ep.answer
    return hits / max(1, len(episodes))
