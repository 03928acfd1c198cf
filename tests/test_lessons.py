"""Every notebook in lessons/ runs top to bottom with small parameters (NANOKV_LESSON_QUICK=1)
and its final check cell passes. The committed notebooks carry their full-size outputs, so they
read on the web without running: `python tests/test_lessons.py --write [lessons/NN_name.ipynb ...]`
executes them at full size, saves them in place and records a digest of their code cells and of
the committed model in the notebook's metadata; a test fails when that digest no longer matches
(the outputs are stale: re-run --write)."""

import glob
import hashlib
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSONS = sorted(glob.glob(os.path.join(ROOT, "lessons", "*.ipynb")))
MODEL = os.path.join(ROOT, "nanokv", "assets", "tiny.pt")  # what the lessons' outputs were computed with


def code_digest(book) -> str:
    """SHA-256 of the code cells' sources, in order, and of the committed model file."""
    h = hashlib.sha256()
    for cell in book.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode("utf-8") + b"\0")
    with open(MODEL, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def ok_lines(cell) -> list[str]:
    """The check cell's printed lines that start with the word "ok"."""
    lines = [ln for o in cell.get("outputs", []) if o.get("output_type") == "stream"
             for ln in o.get("text", "").splitlines()]
    return [ln for ln in lines if ln == "ok" or ln.startswith("ok ")]


def execute(path, quick: bool, timeout: int = 300):
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    env_before = os.environ.get("NANOKV_LESSON_QUICK")
    os.environ["NANOKV_LESSON_QUICK"] = "1" if quick else "0"
    try:
        NotebookClient(book, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("NANOKV_LESSON_QUICK", None)
        else:
            os.environ["NANOKV_LESSON_QUICK"] = env_before
    return book


@pytest.mark.parametrize("path", LESSONS, ids=[os.path.basename(p) for p in LESSONS])
def test_lesson_runs_and_checks_pass(path):
    t0 = time.time()
    book = execute(path, quick=True)
    last = book.cells[-1]
    assert last.cell_type == "code" and "assert" in last.source, "a lesson ends with its check cell"
    # the check cell ends by printing a line that starts with the word "ok" (after every assert passed)
    assert ok_lines(last), last.outputs
    print(f"{os.path.basename(path)}: {time.time() - t0:.1f} s")


@pytest.mark.parametrize("path", LESSONS, ids=[os.path.basename(p) for p in LESSONS])
def test_committed_outputs_are_fresh(path):
    """The committed notebook was executed at full size from exactly its current code and the
    committed model: every code cell has run, the check cell printed "ok"."""
    import nbformat

    book = nbformat.read(path, as_version=4)
    name = os.path.relpath(path, ROOT)
    recorded = book.metadata.get("nanokv", {}).get("code_digest")
    assert recorded == code_digest(book), (
        f"{name}: its committed outputs are stale (code or model changed since it was executed); "
        f"run: python tests/test_lessons.py --write {name}")
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{name}: a code cell was never executed"
    assert ok_lines(code[-1]), f"{name}: the committed check cell did not print ok"
    assert not book.metadata["nanokv"].get("quick"), f"{name}: committed outputs must be the full-size run"


def test_lessons_have_params_and_titles():
    import nbformat

    for path in LESSONS:
        book = nbformat.read(path, as_version=4)
        assert book.cells[0].cell_type == "markdown" and book.cells[0].source.startswith("# ")
        assert any("parameters" in c.metadata.get("tags", []) for c in book.cells), path


if __name__ == "__main__" and "--write" in sys.argv:
    import nbformat

    for path in [os.path.abspath(p) for p in sys.argv[2:]] or LESSONS:
        t0 = time.time()
        book = execute(path, quick=False, timeout=900)  # a busy machine may be slow; the time is recorded
        seconds = round(time.time() - t0, 1)
        book.metadata["nanokv"] = {"code_digest": code_digest(book), "quick": False, "seconds": seconds}
        nbformat.write(book, path)
        print(f"wrote {os.path.basename(path)} with outputs in {seconds:.0f} s")
