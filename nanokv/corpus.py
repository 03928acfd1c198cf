"""
Built-in text that needs no download: Python's own English documentation.

Documents are the pydoc topic pages (`pydoc_data.topics`) and the longer docstrings of the
standard library's top-level modules (read with `ast`, nothing is imported). A document goes
to validation when the first byte of its SHA-1 is below 10% of 256, so the split is
deterministic and a document keeps its side even when a Python release adds or edits others.
The text changes a little between Python versions: `corpus_info()` gives its hash and the
Python version so checkpoints can record them.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sys
import sysconfig

MIN_DOC_CHARS = 200


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    root = sysconfig.get_paths()["stdlib"]
    for fname in sorted(f for f in os.listdir(root) if f.endswith(".py")):
        try:
            with open(os.path.join(root, fname), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOC_CHARS:
                    docs.append(doc)
    return tuple(docs)


def is_val_document(doc: str, val_fraction: float = 0.1) -> bool:
    return hashlib.sha1(doc.encode("utf-8")).digest()[0] < int(256 * val_fraction)


@functools.lru_cache(maxsize=4)
def builtin_text(split: str = "train", val_fraction: float = 0.1) -> str:
    """The built-in corpus, one split ("train" or "val"), documents joined by blank lines."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    docs = [d for d in builtin_documents() if is_val_document(d, val_fraction) == (split == "val")]
    return "\n\n".join(docs)


def file_text(path: str, split: str = "train", val_fraction: float = 0.1) -> str:
    """A user's text file, split by position: the last val_fraction is validation."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if len(text) < 100:
        raise ValueError(f"data file {path!r} is empty or too short ({len(text)} characters; need >= 100)")
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut] if split == "train" else text[cut:]


def corpus_info() -> dict:
    text = "\n\n".join(builtin_documents())
    return {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text),
            "python": sys.version.split()[0]}
