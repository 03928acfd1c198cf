"""
Train a tiny GPT on a CPU, with no download, that can read text and retrieve a fact from
far back in its context (the skill KV-cache compression can destroy).

    python train_tiny.py                          # tiny byte-level model on Python's own docs
    python train_tiny.py --data input.txt         # any text file instead
    python train_tiny.py --resume out/tiny.pt     # continue a run
    python train_tiny.py --init nanokv-tiny       # fine-tune the committed model (fresh optimizer)
    python train_tiny.py --init nanokv-tiny-byte --tokenizer bytedigits   # widen a byte model to
                                                  # digit pairs (how the committed model was made)

Each batch mixes natural text with synthetic retrieval episodes (nanokv/episodes.py):
passkey (needle in a haystack) and line retrieval, plus `--repeat-ratio` rows of a random
string repeated (pure copying, which makes induction heads form early). Of the rows that are
not repeats, `--episode-ratio` are episodes. The loss weights the answer tokens
`--answer-weight` times the others. Batch lengths are drawn from `--curriculum` (short
sequences make the copy mechanism form sooner; many lengths make retrieval work at every
length). The learning rate warms up linearly, then follows a cosine down to `--min-lr-frac`
of its peak.

The checkpoint at --out holds config, tokenizer, weights, optimizer, RNG states and the
training arguments (so --resume continues exactly); --export writes a compact fp16 copy
(no optimizer) loadable with GPT.from_pretrained(path).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from gpt import GPT, GPTConfig
from nanokv.corpus import builtin_text, corpus_info, file_text
from nanokv.episodes import exact_match, make_episode, min_episode_length, repeat_row, words_from
from nanokv.tokenizer import get_tokenizer


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every option's default."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--preset", default="tiny", help="model size preset from gpt.PRESETS")
    p.add_argument("--n-layer", type=int, help="override the preset's layers")
    p.add_argument("--n-head", type=int, help="override the preset's heads")
    p.add_argument("--n-embd", type=int, help="override the preset's width")
    p.add_argument("--block-size", type=int, default=512, help="context length")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=6000, help="length of the learning-rate schedule")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-frac", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--seed", type=int, default=1337, help="seed of every random choice")
    p.add_argument("--data", help="train on this text file instead of the built-in corpus "
                                  "(episodes and repeat rows are then off unless asked for)")
    p.add_argument("--tokenizer", default="byte", choices=["byte", "bytedigits", "tinybpe", "gpt2"],
                   help="byte: UTF-8 bytes; bytedigits: bytes plus digit pairs (a byte model given with --init is "
                        "widened to it); tinybpe: nanokv's committed 2048-token BPE; gpt2: GPT-2's BPE")
    p.add_argument("--train-tokenizer", action="store_true",
                   help="train tinybpe's vocabulary on the built-in corpus's training split "
                        "(nanokv/assets/tinybpe.tiktoken; needs the tokenizers package) and exit")
    p.add_argument("--gpt2-dir", help="offline GPT-2 tokenizer files (else $NANOKV_GPT2_DIR, else tiktoken's download)")
    p.add_argument("--episode-ratio", type=float, default=None,
                   help="fraction of the non-repeat rows that are retrieval episodes [0.5; 0 with --data]")
    p.add_argument("--lines-share", type=float, default=0.5, help="fraction of episodes that are line retrieval")
    p.add_argument("--repeat-ratio", type=float, default=None,
                   help="fraction of rows that are a random string repeated (a copy warm-up, see "
                        "nanokv.episodes.repeat_row) [0.2; 0 with --data]")
    p.add_argument("--answer-weight", type=float, default=10.0, help="loss weight of answer tokens")
    p.add_argument("--qspace", action="store_true",
                   help="episodes' questions end with the space before the value (the answer is the bare value; "
                        "nanokv.episodes, qspace)")
    p.add_argument("--curriculum", default=None,
                   help="comma-separated batch lengths drawn uniformly [block/4, 3 block/8, ..., block, block]")
    p.add_argument("--eval-interval", type=int, default=500, help="evaluate and save every this many steps (0: at the end)")
    p.add_argument("--eval-episodes", type=int, default=40, help="episodes per retrieval task at each evaluation")
    p.add_argument("--eval-length", type=int, help="episode length of the evaluation [the longest curriculum length]")
    p.add_argument("--out", default="out/tiny.pt", help="training checkpoint (with optimizer)")
    p.add_argument("--export", help="also write an fp16 checkpoint without optimizer here at the end")
    p.add_argument("--resume", help="continue from this training checkpoint")
    p.add_argument("--init", help="start from this model's weights (any checkpoint GPT.from_pretrained reads, e.g. "
                                  "nanokv-tiny) with a fresh optimizer and schedule: fine-tuning")
    p.add_argument("--stop-after", type=int, help="stop (and save) after this step, keeping the --steps schedule")
    p.add_argument("--ema", type=float, default=0.0,
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.998); "
                        "evaluation, checkpoints' model and --export then use the average (0 = off)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    if args.episode_ratio is None:  # synthetic rows only on the built-in corpus, unless asked for
        args.episode_ratio = 0.0 if args.data else 0.5
    if args.repeat_ratio is None:
        args.repeat_ratio = 0.0 if args.data else 0.2
    for name in ("episode_ratio", "lines_share", "repeat_ratio"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    if args.resume and args.init:
        raise ValueError("--resume continues a run and --init starts a new one from weights: pass one of them")
    if not 0.0 <= args.ema < 1.0:
        raise ValueError(f"--ema must be in [0, 1) (0 = off), got {args.ema}")
    if not 0.0 <= args.min_lr_frac <= 1.0:
        raise ValueError(f"--min-lr-frac must be in [0, 1], got {args.min_lr_frac}")
    if args.block_size < 8:
        raise ValueError(f"--block-size must be >= 8, got {args.block_size}")
    if args.curriculum is None:
        b = args.block_size
        # every eighth of the block from a quarter to all of it, the full length twice: a model trained
        # on a few lengths only retrieves at those (leg 13 at 256 and 512: passkey 41% at 192 tokens)
        args.curriculum = ",".join(str(max(8, b // 4 + k * b // 8)) for k in range(7)) + f",{b}"
    lengths = curriculum(args)
    if any(n < 8 or n > args.block_size for n in lengths):
        raise ValueError(f"--curriculum lengths must be in [8, --block-size={args.block_size}], got {lengths}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); "
                         "use --device cpu")
    if args.data is not None and os.path.isdir(args.data):
        raise ValueError(f"--data {args.data!r} is a directory; pass one text file")


def curriculum(args) -> list[int]:
    """--curriculum as a list of batch lengths."""
    try:
        return [int(x) for x in args.curriculum.split(",")]
    except ValueError:
        raise ValueError(f"--curriculum must be comma-separated integers, got {args.curriculum!r}") from None


class Data:
    """Token streams for train and validation, plus the episode ingredients."""

    def __init__(self, args):
        self.tok = get_tokenizer(args.tokenizer, args.gpt2_dir)
        if args.data:
            train, val = file_text(args.data, "train"), file_text(args.data, "val")
        else:
            train, val = builtin_text("train"), builtin_text("val")
        self.train, self.val = self.tok.encode(train), self.tok.encode(val)
        self.n_val_bytes = len(val.encode("utf-8"))
        self.words = {"train": words_from(train), "val": words_from(val)}
        if len(self.train) < 2 * args.block_size or len(self.val) < args.block_size + 1:
            raise ValueError("the text is too short for --block-size; use a longer file")
        if args.episode_ratio > 0:  # every batch length must hold an episode of either kind
            need = min_episode_length(self.tok)
            short = [n for n in curriculum(args) if n + 1 < need]
            if short:
                raise ValueError(f"--curriculum lengths {short} are too short for a retrieval episode with the "
                                 f"{self.tok.name} tokenizer (at least {need - 1} tokens); use longer lengths, "
                                 "or --episode-ratio 0")

    def batch(self, rng: random.Random, args, T: int):
        """x, y (B, T) and per-target weights (B, T)."""
        xs, ws = [], []
        for _ in range(args.batch_size):
            w = [1.0] * T
            if rng.random() < args.repeat_ratio:
                seq = repeat_row(rng, self.tok, T + 1)
            elif rng.random() < args.episode_ratio:
                kind = "lines" if rng.random() < args.lines_share else "passkey"
                ep = make_episode(kind, rng, self.tok, self.train, self.words["train"], T + 1, qspace=args.qspace)
                seq = ep.prompt + ep.answer
                for i in range(len(ep.answer)):  # the targets that are answer tokens
                    w[T - 1 - i] = args.answer_weight
            else:
                start = rng.randrange(0, len(self.train) - T - 1)
                seq = self.train[start:start + T + 1]
            xs.append(seq)
            ws.append(w)
        t = torch.tensor(xs, dtype=torch.long)
        return t[:, :-1], t[:, 1:], torch.tensor(ws)


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def val_loss(model, data, args, max_tokens=65536):
    """Validation loss over the first max_tokens tokens of the val split: (nats per token, the
    unit the training loss is printed in, and bits per byte, comparable across tokenizers)."""
    model.eval()
    T = args.block_size
    total_nats, n_tok = 0.0, 0
    ids = torch.tensor(data.val[: max_tokens + 1], dtype=torch.long)
    for s in range(0, len(ids) - T - 1, T):
        x, y = ids[s:s + T][None].to(args.device), ids[s + 1:s + T + 1][None].to(args.device)
        _, loss = model(x, y)
        total_nats += loss.item() * T
        n_tok += T
    model.train()
    byte_per_tok = data.n_val_bytes / len(data.val)
    nats = total_nats / n_tok
    return nats, nats / math.log(2) / byte_per_tok


@torch.no_grad()
def retrieval_accuracy(model, data, n, length, seed=0, qspace=False):
    model.eval()
    out = {}
    for kind in ("passkey", "lines"):
        rng = random.Random(seed)
        eps = [make_episode(kind, rng, data.tok, data.val, data.words["val"], length, qspace=qspace) for _ in range(n)]
        out[kind] = exact_match(model, eps)
    model.train()
    return out


def configure_optimizer(model, args):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def save(path, model, opt, step, rng, args, log, ema=None):
    """The training checkpoint. With --ema its "model" is the average and "raw_model" the trained
    weights (resume continues both)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {} if ema is None else {"raw_model": model.state_dict()}
    (model if ema is None else ema).save_checkpoint(
        path, optimizer=opt.state_dict(), step=step, rng_state=list(rng.getstate()[1]), **extra,
        rng_version=rng.getstate()[0], torch_rng=torch.get_rng_state(),
        train_args=vars(args), log=log, corpus=None if args.data else corpus_info())


def train(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    data = Data(args)
    step, log = 0, []
    if args.resume:
        model = GPT.from_pretrained(args.resume)
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
        if "optimizer" not in ckpt:
            raise ValueError(f"{args.resume!r} has no optimizer state (an exported checkpoint?); cannot resume")
        if "raw_model" in ckpt:  # trained with --ema: "model" is the average
            model.load_state_dict(ckpt["raw_model"])
        step, log = ckpt["step"], ckpt.get("log", [])
        rng.setstate((ckpt["rng_version"], tuple(ckpt["rng_state"]), None))
        torch.set_rng_state(ckpt["torch_rng"])
    elif args.init:
        model = GPT.from_pretrained(args.init).float()
        if model.tokenizer_name == "byte" and args.tokenizer == "bytedigits":
            model = widen_to_bytedigits(model)
        if model.tokenizer_name != args.tokenizer:
            raise ValueError(f"--init {args.init!r} was trained with the {model.tokenizer_name} tokenizer; "
                             f"pass --tokenizer {model.tokenizer_name}")
    else:
        overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)}
        config = GPTConfig.preset(args.preset, block_size=args.block_size,
                                  vocab_size=data.tok.vocab_size, **overrides)
        model = GPT(config, tokenizer=args.tokenizer)
    if args.block_size > model.config.block_size:
        raise ValueError(f"--block-size {args.block_size} is larger than the model's block_size "
                         f"{model.config.block_size}")
    model.to(args.device).train()
    ema = None
    if args.ema:  # the average starts from the checkpoint's "model" (the average, if it had one)
        ema = GPT.from_pretrained(args.resume) if args.resume else copy.deepcopy(model)
        ema.to(args.device).eval().requires_grad_(False)
    opt = configure_optimizer(model, args)
    if args.resume:
        opt.load_state_dict(ckpt["optimizer"])
    lengths = curriculum(args)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config}", file=sys.stderr)
    t0 = time.time()
    end = min(args.steps, args.stop_after or args.steps)
    losses = []
    bar = tqdm(range(step, end), initial=step, total=args.steps, desc="train")
    for step in bar:
        T = rng.choice(lengths)
        x, y, w = (t.to(args.device) for t in data.batch(rng, args, T))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        logits, _ = model(x)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss = (ce * w.flatten()).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1.0 - args.ema)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", T=T)  # nats per token (answer tokens weighted)
        last = step + 1 == end
        if args.eval_interval and ((step + 1) % args.eval_interval == 0 or last):
            nats, bpb = val_loss(ema or model, data, args)
            acc = {} if not args.episode_ratio else retrieval_accuracy(
                ema or model, data, args.eval_episodes, args.eval_length or max(lengths), qspace=args.qspace)
            recent = losses[-args.eval_interval:]
            entry = {"step": step + 1, "train_loss": round(sum(recent) / len(recent), 4), "val_loss": round(nats, 4),
                     "val_bpb": round(bpb, 4), **acc, "minutes": round((time.time() - t0) / 60, 2)}
            log.append(entry)
            tqdm.write(str(entry))
            save(args.out, model, opt, step + 1, rng, args, log, ema)
    if not args.eval_interval:
        save(args.out, model, opt, end, rng, args, log, ema)
    print(f"training checkpoint (with optimizer): {os.path.abspath(args.out)}", file=sys.stderr)
    if args.export:
        (ema or model).save_checkpoint(args.export, half=True, train_args=vars(args), log=log,
                                       corpus=None if args.data else corpus_info())
        print(f"exported fp16 model: {os.path.abspath(args.export)} (GPT.from_pretrained(path))", file=sys.stderr)
    return model, log, losses


def widen_to_bytedigits(model: GPT) -> GPT:
    """A byte-level model with bytedigits' vocabulary: the 256 byte rows of the tied embedding are
    kept, and each digit-pair token starts as the mean of its bytes' rows (" 48" from " ", "4", "8"),
    so everything the model learned about bytes carries over and fine-tuning teaches the pairs."""
    from nanokv.tokenizer import ByteDigitTokenizer

    tok = ByteDigitTokenizer()
    config = GPTConfig.from_dict({**model.config.__dict__, "vocab_size": tok.vocab_size})
    wide = GPT(config, tokenizer=tok.name)
    state = model.state_dict()
    old = state["lm_head.weight"]  # (256, C), tied to wte
    new = torch.stack([old[list(tok.pieces(i))].mean(0) for i in range(tok.vocab_size)])  # (456, C)
    state["lm_head.weight"] = state["transformer.wte.weight"] = new
    wide.load_state_dict(state)
    return wide


def train_tokenizer():
    """Write nanokv/assets/tinybpe.tiktoken from the built-in corpus's training documents."""
    from nanokv.corpus import builtin_documents, is_val_document
    from nanokv.tokenizer import TINYBPE_FILE, train_bpe

    ranks = train_bpe([d for d in builtin_documents() if not is_val_document(d)])
    print(f"wrote {TINYBPE_FILE} ({len(ranks)} tokens)")


if __name__ == "__main__":
    try:
        if "--train-tokenizer" in sys.argv[1:]:
            train_tokenizer()
            sys.exit(0)
        train(get_args())
    except (ValueError, OSError) as e:  # bad arguments, missing files, a tokenizer not reachable offline
        sys.exit(f"train_tiny.py: error: {e}")
