"""The docs cannot rot: every ```python block of README.md and docs/*.md runs against a real server.

The blocks of one file run in order in one namespace (a later block uses what an earlier one made),
with ``127.0.0.1:50051`` replaced by the test server's address and the repository as the working
folder (examples name shipped files under ``bench/datasets``). Blocks that are not Python to run are
fenced by their language (```sh, ```bash, ```yaml, ```text) and are not executed here; a ```python
block that must not run (it needs a GPU, a cluster, a model download) is listed in ``NOT_RUN`` with
the reason, so nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# (file, index of the ```python block in that file) -> why it is not executed
NOT_RUN: dict[tuple[str, int], str] = {
    ("docs/benchmarks.md", 0): "a template for a new bench/ann adapter module: the method bodies are what "
                               "the reader writes (running it would register a fake 'annoy' adapter)",
    ("docs/operations.md", 0): "connects to db.internal over TLS with an API key file and client certificates "
                               "that do not exist here (needs a TLS server fixture)",
}
# documents whose fences are not yet all labelled (owned elsewhere): line -> what the block is
UNLABELLED_OK = {"docs/operations.md:186": "a `retrieval status` terminal session"}
# documents whose blocks take minutes on a 2-core CPU (real MiniLM scoring): run with the slow tests
SLOW = {"docs/crossencoder.md"}


def python_blocks(doc: str) -> list[tuple[int, int, str]]:
    """``[(index, line, source)]`` of the ```python blocks of ``doc`` (index among them, 1-based line)."""
    text = (ROOT / doc).read_text()
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) == "python":
            out.append((len(out), text.count("\n", 0, m.start()) + 2, m.group(2)))
    return out


def test_fences_name_their_language():
    """An unlabelled fence would be neither run nor flagged: every block says what it is."""
    bare = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        opening = True
        for i, line in enumerate(text.splitlines(), 1):
            if line.startswith("```"):
                if opening and line.strip() == "```" and f"{doc}:{i}" not in UNLABELLED_OK:
                    bare.append(f"{doc}:{i}")
                opening = not opening
    assert not bare, f"fences without a language: {bare}"


def _fresh(server) -> None:
    """Drop what the previous document made, so each starts on an empty server (names like "docs"
    recur between documents)."""
    from retrieval.client import Client

    with Client(server.address) as c:
        for info in c.list_collections():
            c.drop_collection(info["name"])
        for g in c.list_graphs():
            c.drop_graph(g["name"])


@pytest.mark.parametrize("doc", [pytest.param(d, marks=[pytest.mark.slow] if d in SLOW else [])
                                 for d in DOCS if python_blocks(d)])
def test_python_blocks_run(doc, server, monkeypatch):
    monkeypatch.chdir(ROOT)
    _fresh(server)
    ns: dict = {"__name__": f"docs:{doc}"}
    blocks = python_blocks(doc)
    if all((doc, index) in NOT_RUN for index, _, _ in blocks):
        pytest.skip("; ".join(NOT_RUN[doc, index] for index, _, _ in blocks))
    for index, line, src in blocks:
        if (doc, index) in NOT_RUN:
            continue
        code = compile(src.replace("127.0.0.1:50051", server.address), f"{doc}:{line}", "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(code, ns)  # noqa: S102  (the docs are this repository's own)
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{doc}, the python block at line {line}: {type(e).__name__}: {e}")


def test_not_run_entries_name_python_blocks():
    """A NOT_RUN entry for a block that no longer exists would hide nothing: keep the list honest."""
    for doc, index in NOT_RUN:
        assert index < len(python_blocks(doc)), (doc, index)
