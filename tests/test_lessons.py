"""Every notebook in lessons/ runs top to bottom with small parameters (NANOKV_LESSON_QUICK=1)
and its final check cell passes. The committed notebooks carry no outputs;
`python tests/test_lessons.py --write` executes them at full size and saves them in place."""

import glob
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSONS = sorted(glob.glob(os.path.join(ROOT, "lessons", "*.ipynb")))


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
    assert any("ok" in o.get("text", "") for o in last.outputs), last.outputs
    print(f"{os.path.basename(path)}: {time.time() - t0:.1f} s")


def test_lessons_have_params_and_titles():
    import nbformat

    for path in LESSONS:
        book = nbformat.read(path, as_version=4)
        assert book.cells[0].cell_type == "markdown" and book.cells[0].source.startswith("# ")
        assert any("parameters" in c.metadata.get("tags", []) for c in book.cells), path


if __name__ == "__main__" and "--write" in sys.argv:
    import nbformat

    for path in sys.argv[2:] or LESSONS:
        t0 = time.time()
        book = execute(path, quick=False)
        nbformat.write(book, path)
        print(f"wrote {os.path.basename(path)} with outputs in {time.time() - t0:.0f} s")
