import os

import pytest

from nanokv.tokenizer import get_tokenizer

from conftest import SHARED_GPT2


def test_byte_roundtrip_unicode():
    tok = get_tokenizer("byte")
    for s in ["", "Hello world", "héllo wörld 😀 — ünïcødé ∑ 中文", "\x00\n\t"]:
        ids = tok.encode(s)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == s


@pytest.mark.skipif(not os.path.isdir(SHARED_GPT2), reason="../shared/data/gpt2 not present")
@pytest.mark.parametrize("files", [("gpt2.tiktoken",), ("encoder.json", "vocab.bpe")])
def test_gpt2_offline(tmp_path, files):
    import shutil

    for f in files:
        shutil.copy(os.path.join(SHARED_GPT2, f), tmp_path)
    tok = get_tokenizer("gpt2", gpt2_dir=str(tmp_path))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257
    s = "héllo wörld 😀<|endoftext|> done"
    assert tok.decode(tok.encode(s)) == s


@pytest.mark.skipif(not os.path.isdir(SHARED_GPT2), reason="../shared/data/gpt2 not present")
def test_gpt2_env_var(monkeypatch):
    monkeypatch.setenv("NANOKV_GPT2_DIR", SHARED_GPT2)
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_bytedigits_pairs_and_roundtrip():
    """bytedigits: bytes, plus "00".."99" (256..355) and " 00".." 99" (356..455); a digit run splits
    into pairs from its left, a space just before the run joins its first pair."""
    tok = get_tokenizer("bytedigits")
    assert tok.vocab_size == 456
    assert tok.encode(" 4813.") == [356 + 48, 256 + 13, ord(".")]
    assert tok.encode("12345") == [256 + 12, 256 + 34, ord("5")]
    assert tok.encode(" 7") == [ord(" "), ord("7")]
    assert tok.encode("ab") == [97, 98]
    assert tok.encode(" 00 99") == [356, 455]
    for s in ["", "The pass key is 48213. Remember it.", "héllo 😀 12 3 456 07 — 2026-12-03", "\x00 0\n9"]:
        ids = tok.encode(s)
        assert all(0 <= i < 456 for i in ids)
        assert tok.decode(ids) == s
    with pytest.raises(ValueError, match="outside bytedigits' vocabulary"):
        tok.decode([456])
