"""train_tiny.py, the episode generators, and the committed tiny checkpoint."""

import os
import random

import pytest
import torch

import train_tiny
from gpt import GPT, TINY_CHECKPOINT
from nanokv.corpus import builtin_text, corpus_info
from nanokv.episodes import exact_match, lines_episode, make_episode, passkey_episode, words_from
from nanokv.tokenizer import get_tokenizer

TINY_ARGS = ["--preset", "nano", "--block-size", "128", "--curriculum", "128", "--batch-size", "4",
             "--eval-episodes", "1", "--threads", "1"]


def test_a_few_steps_lower_the_loss(tmp_path):
    args = train_tiny.get_args(TINY_ARGS + ["--steps", "30", "--eval-interval", "0", "--lr", "1e-2",
                                            "--warmup", "5", "--out", str(tmp_path / "t.pt")])
    _, _, losses = train_tiny.train(args)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.5


def test_checkpoint_resume_is_exact(tmp_path):
    common = TINY_ARGS + ["--steps", "6", "--eval-interval", "3", "--warmup", "2"]
    straight, _, _ = train_tiny.train(train_tiny.get_args(common + ["--out", str(tmp_path / "a.pt")]))
    train_tiny.train(train_tiny.get_args(common + ["--out", str(tmp_path / "b.pt"), "--stop-after", "3"]))
    ck = torch.load(tmp_path / "b.pt", weights_only=True)
    assert ck["step"] == 3 and "optimizer" in ck and ck["corpus"]["python"]
    resumed, log, _ = train_tiny.train(train_tiny.get_args(
        common + ["--out", str(tmp_path / "b.pt"), "--resume", str(tmp_path / "b.pt")]))
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert [e["step"] for e in log] == [3, 6]
    # the saved checkpoint loads as a model with the same weights, and exports in fp16
    loaded = GPT.from_pretrained(str(tmp_path / "b.pt"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), resumed.state_dict().values()))


def test_weight_average_is_saved_and_resumes_exactly(tmp_path):
    common = TINY_ARGS + ["--steps", "6", "--eval-interval", "3", "--warmup", "2", "--ema", "0.9"]
    train_tiny.train(train_tiny.get_args(common + ["--out", str(tmp_path / "a.pt")]))
    train_tiny.train(train_tiny.get_args(common + ["--out", str(tmp_path / "b.pt"), "--stop-after", "3"]))
    train_tiny.train(train_tiny.get_args(common + ["--out", str(tmp_path / "b.pt"), "--resume", str(tmp_path / "b.pt")]))
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "ab")
    for field in ("model", "raw_model"):  # the average and the trained weights, both resumed exactly
        assert a[field].keys() == b[field].keys()
        assert all(torch.equal(a[field][k], b[field][k]) for k in a[field]), field
    assert not torch.equal(a["model"]["transformer.wte.weight"], a["raw_model"]["transformer.wte.weight"])
    loaded = GPT.from_pretrained(str(tmp_path / "a.pt"))  # a checkpoint loads as its average
    assert torch.equal(loaded.transformer.wte.weight, a["model"]["transformer.wte.weight"])


def test_export_is_half_and_loads(tmp_path):
    args = train_tiny.get_args(TINY_ARGS + ["--steps", "2", "--eval-interval", "0", "--out", str(tmp_path / "t.pt"),
                                            "--export", str(tmp_path / "e.pt")])
    model, _, _ = train_tiny.train(args)
    ck = torch.load(tmp_path / "e.pt", weights_only=True)
    assert "optimizer" not in ck and ck["model"]["transformer.wte.weight"].dtype == torch.float16
    loaded = GPT.from_pretrained(str(tmp_path / "e.pt"))
    assert torch.allclose(loaded.transformer.wte.weight, model.transformer.wte.weight, atol=1e-3)


def test_init_fine_tunes_from_exported_weights(tmp_path):
    """--init starts from a model's weights (an fp16 export without optimizer) with a fresh
    optimizer and schedule: at lr 0 the weights stay exactly the loaded ones."""
    base = TINY_ARGS + ["--eval-interval", "0", "--steps", "2"]
    model, _, _ = train_tiny.train(train_tiny.get_args(base + ["--out", str(tmp_path / "a.pt"),
                                                               "--export", str(tmp_path / "e.pt")]))
    tuned, _, losses = train_tiny.train(train_tiny.get_args(base + ["--steps", "1", "--out", str(tmp_path / "b.pt"),
                                                                    "--init", str(tmp_path / "e.pt"), "--lr", "0"]))
    start = GPT.from_pretrained(str(tmp_path / "e.pt")).float()
    assert all(torch.equal(p, q) for p, q in zip(tuned.parameters(), start.parameters()))  # lr 0: unchanged
    with pytest.raises(ValueError, match="--resume .* --init"):
        train_tiny.get_args(base + ["--init", "x.pt", "--resume", "y.pt"])
    with pytest.raises(ValueError, match="tokenizer"):
        train_tiny.train(train_tiny.get_args(base + ["--init", str(tmp_path / "e.pt"), "--tokenizer", "tinybpe",
                                                     "--out", str(tmp_path / "c.pt")]))


def test_init_widens_a_byte_model_to_bytedigits(tmp_path):
    """--init BYTE_MODEL --tokenizer bytedigits: the byte rows of the tied embedding are the loaded
    ones, a digit-pair row is the mean of its bytes' rows, and every other weight is unchanged, so on
    text without digits the widened model's logits over bytes equal the byte model's."""
    base = TINY_ARGS + ["--eval-interval", "0", "--steps", "2"]
    train_tiny.train(train_tiny.get_args(base + ["--out", str(tmp_path / "a.pt"), "--export", str(tmp_path / "e.pt")]))
    wide, _, _ = train_tiny.train(train_tiny.get_args(base + ["--steps", "1", "--out", str(tmp_path / "b.pt"),
                                                              "--init", str(tmp_path / "e.pt"), "--lr", "0",
                                                              "--tokenizer", "bytedigits"]))
    byte = GPT.from_pretrained(str(tmp_path / "e.pt")).float()
    assert wide.tokenizer_name == "bytedigits" and wide.config.vocab_size == 456
    w, b = wide.transformer.wte.weight, byte.transformer.wte.weight
    assert torch.equal(w[:256], b)
    assert torch.allclose(w[356 + 48], b[[ord(" "), ord("4"), ord("8")]].mean(0))
    x = torch.tensor([list(b"hello world")])
    wide.eval()
    assert torch.allclose(wide(x)[0][..., :256], byte(x)[0], atol=1e-5)


def test_trains_on_a_text_file(tmp_path, capsys):
    """--data FILE: the model is trained on that file's first 90% (validated on the rest), with
    no synthetic rows unless asked for, and the run says where the checkpoint went."""
    lines = [f"First Citizen {i}: Before we proceed any further, hear me speak.\n" for i in range(300)]
    text = "".join(lines)
    path = tmp_path / "shakespeare.txt"
    path.write_text(text)
    args = train_tiny.get_args(TINY_ARGS + ["--data", str(path), "--steps", "2", "--eval-interval", "0",
                                            "--out", str(tmp_path / "t.pt")])
    assert args.episode_ratio == 0.0 and args.repeat_ratio == 0.0
    data = train_tiny.Data(args)
    cut = int(len(text) * 0.9)
    assert data.tok.decode(data.train) == text[:cut] and data.tok.decode(data.val) == text[cut:]
    x, y, w = data.batch(random.Random(0), args, 64)
    for row in torch.cat([x, y[:, -1:]], 1).tolist():  # every row is a slice of the file: no episode
        assert data.tok.decode(row) in text[:cut]
    assert torch.equal(x[:, 1:], y[:, :-1]) and (w == 1).all()
    train_tiny.train(args)
    assert torch.load(tmp_path / "t.pt", weights_only=True)["corpus"] is None
    assert str(tmp_path / "t.pt") in capsys.readouterr().err
    # episodes can still be asked for on a file
    args = train_tiny.get_args(TINY_ARGS + ["--data", str(path), "--episode-ratio", "0.5"])
    assert args.episode_ratio == 0.5 and args.repeat_ratio == 0.0


# ----------------------------------------------------------------------------- episodes
@pytest.fixture(scope="module")
def ingredients():
    tok = get_tokenizer("byte")
    text = builtin_text("val")
    return tok, tok.encode(text), words_from(text)


@pytest.mark.parametrize("kind", ["passkey", "lines"])
def test_episodes_deterministic_exact_length_and_unique_answer(ingredients, kind):
    tok, filler, words = ingredients
    for seed in range(20):
        a = make_episode(kind, random.Random(seed), tok, filler, words, 300)
        b = make_episode(kind, random.Random(seed), tok, filler, words, 300)
        assert a == b
        assert a.length == 300
        prompt = tok.decode(a.prompt)
        assert prompt.count(a.answer_text) == 1
        assert tok.decode(a.answer) == " " + a.answer_text
        ctx = tok.decode(a.prompt[:a.context_len])
        assert a.answer_text in ctx  # the fact is in the context, before the question
        q = make_episode(kind, random.Random(seed), tok, filler, words, 300, qspace=True)  # the space asked for
        ends = ": " if kind == "lines" else "is "
        assert q.length == 300 and tok.decode(q.answer) == q.answer_text and tok.decode(q.prompt).endswith(ends)
        assert q.prompt[:q.context_len] == a.prompt[:a.context_len] and q.answer_text == a.answer_text


def test_repeat_rows_are_periodic_and_seeded(ingredients):
    from nanokv.episodes import repeat_row

    tok = ingredients[0]
    a, b = repeat_row(random.Random(3), tok, 200), repeat_row(random.Random(3), tok, 200)
    assert a == b and len(a) == 200
    text = tok.decode(a)
    unit = text.split(" ")[0] + " "
    assert text == (unit * 200)[:200]


def test_passkey_depth_is_honoured(ingredients):
    tok, filler, _ = ingredients
    for depth in (0.0, 0.25, 0.5, 1.0):
        ep = passkey_episode(random.Random(1), tok, filler, 500, depth=depth)
        n_fill = ep.context_len - len(tok.encode(" The pass key is 12345. Remember it. "))
        assert ep.needle_start == round(depth * n_fill)
        assert tok.decode(ep.prompt[ep.needle_start:]).startswith(" The pass key is " + ep.answer_text)


def test_lines_depth_picks_the_line(ingredients):
    tok, filler, words = ingredients
    first = lines_episode(random.Random(2), tok, filler, words, 400, depth=0.0)
    last = lines_episode(random.Random(2), tok, filler, words, 400, depth=1.0)
    assert first.needle_start < last.needle_start
    assert tok.decode(first.prompt[first.needle_start:]).startswith("line ")
    assert tok.decode(last.prompt[last.needle_start:last.context_len]).count("\n") == 1


def test_corpus_split_is_deterministic_and_disjoint():
    """A document goes to validation iff the first byte of its SHA-1 is below 25 (10% of 256),
    recomputed here from the documents; no document is on both sides; a second build (cache
    cleared) gives the same text."""
    import hashlib

    from nanokv import corpus

    train, val = builtin_text("train"), builtin_text("val")
    assert len(train) > 500_000 and len(val) > 50_000 and corpus_info()["python"]
    docs = corpus.builtin_documents()
    is_val = [hashlib.sha1(d.encode("utf-8")).digest()[0] < 25 for d in docs]
    assert val == "\n\n".join(d for d, v in zip(docs, is_val) if v)
    assert train == "\n\n".join(d for d, v in zip(docs, is_val) if not v)
    assert 0.05 < sum(is_val) / len(docs) < 0.15
    assert not {d for d, v in zip(docs, is_val) if v} & {d for d, v in zip(docs, is_val) if not v}
    corpus.builtin_documents.cache_clear()
    corpus.builtin_text.cache_clear()
    assert builtin_text("val") == val and builtin_text("train") == train


# ----------------------------------------------------------------------------- the committed model
@pytest.mark.skipif(not os.path.isfile(TINY_CHECKPOINT), reason="no committed checkpoint")
def test_committed_checkpoint_retrieves_passkeys():
    model = GPT.from_pretrained("nanokv-tiny")
    assert model.config.block_size >= 512 and os.path.getsize(TINY_CHECKPOINT) < 8 * 2**20
    tok = model.tokenizer
    text = builtin_text("val")
    rng = random.Random(12345)
    eps = [passkey_episode(rng, tok, tok.encode(text), model.config.block_size) for _ in range(20)]
    acc = exact_match(model, eps)
    print(f"passkey exact match on 20 held-out episodes: {acc:.2f}")
    assert acc >= 0.9


def test_default_curriculum_covers_every_length():
    """Without --curriculum, batches take lengths from a quarter of the block to all of it in steps of
    an eighth, the full length twice (leg 13, trained at 256 and 512 only, retrieved a passkey in 41% of
    episodes at 192 tokens; leg 14, on these lengths, in all of them)."""
    for block in (96, 512, 1024):
        lengths = train_tiny.curriculum(train_tiny.get_args(["--block-size", str(block)]))
        print(block, lengths)
        assert lengths[0] == block // 4 and lengths[-2:] == [block, block]
        assert all(0 < b - a <= block // 8 for a, b in zip(lengths[:-2], lengths[1:-1]))
    assert train_tiny.curriculum(train_tiny.get_args(["--block-size", "512"])) == [128, 192, 256, 320, 384, 448, 512, 512]


def test_small_block_sizes_train(tmp_path):
    """Block sizes below 96 train when the lengths allow: 64 with episodes and the tinybpe
    tokenizer (an episode needs {min_episode_length} tokens), 32 on a text file without episodes;
    a curriculum too short for the tokenizer's episodes gets a clear error before any step."""
    from nanokv.episodes import min_episode_length

    need = min_episode_length(get_tokenizer("tinybpe"))
    assert need <= 64 < min_episode_length(get_tokenizer("byte"))
    args = train_tiny.get_args(["--preset", "nano", "--block-size", "64", "--curriculum", "64", "--batch-size", "2",
                                "--steps", "2", "--eval-interval", "0", "--threads", "1", "--tokenizer", "tinybpe",
                                "--out", str(tmp_path / "a.pt")])
    train_tiny.train(args)
    args = train_tiny.get_args(["--preset", "nano", "--block-size", "64", "--batch-size", "2", "--steps", "2",
                                "--threads", "1", "--out", str(tmp_path / "a.pt")])
    with pytest.raises(ValueError, match=r"too short for a retrieval episode with the byte tokenizer"):
        train_tiny.train(args)
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be, that is the question. " * 100)
    args = train_tiny.get_args(["--preset", "nano", "--block-size", "32", "--batch-size", "2", "--steps", "2",
                                "--eval-interval", "1", "--threads", "1", "--data", str(path), "--out", str(tmp_path / "b.pt")])
    _, log, _ = train_tiny.train(args)
    assert {"train_loss", "val_loss", "val_bpb"} <= set(log[-1]) and "passkey" not in log[-1]
