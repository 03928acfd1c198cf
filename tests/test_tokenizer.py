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
