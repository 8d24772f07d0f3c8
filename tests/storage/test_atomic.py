"""retrieval.storage.atomic: crash-safe file writes and folder replacement.

The crash tests run the write in a child process that ``os._exit``\\ s at a named step (the
``RETRIEVAL_ATOMIC_CRASH_AT`` hook, as a kill -9 would: no cleanup, no ``finally``), then check what
is on disk, run the recovery and check that the old or the new content is there, whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from retrieval.drafting import DatastoreCatalog
from retrieval.storage import atomic

REPO = Path(__file__).resolve().parents[2]


def _child(code: str, crash_at: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != atomic.CRASH_ENV}
    if crash_at:
        env[atomic.CRASH_ENV] = crash_at
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode in (0, atomic.CRASH_EXIT), r.stderr
    return r.returncode


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _make(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


# ---- files ------------------------------------------------------------------------------------------
def test_file_writers_round_trip_and_leave_no_temp(tmp_path):
    atomic.write_bytes(tmp_path / "b", b"\x00\x01")
    atomic.write_text(tmp_path / "t", "héllo")
    atomic.write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    a = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    atomic.save_npy(tmp_path / "a.npy", a)
    atomic.save_npz(tmp_path / "z.npz", x=a, y=np.arange(4))
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "j.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=1)
    assert np.array_equal(np.load(tmp_path / "a.npy"), a)
    with np.load(tmp_path / "z.npz") as z:
        assert np.array_equal(z["x"], a) and z["y"].tolist() == [0, 1, 2, 3]
    atomic.write_bytes(tmp_path / "b", b"second")  # replaces
    assert (tmp_path / "b").read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b", "j.json", "t", "z.npz"]


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temp(tmp_path):
    p = tmp_path / "f"
    atomic.write_bytes(p, b"old")

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.write_with(p, boom)
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["f"]


def test_install_file_for_writers_that_need_a_name(tmp_path):
    tmp = tmp_path / ".out.tmp"
    with open(tmp, "wb") as f:  # as h5py or faiss would: by name, no fsync
        np.save(f, np.arange(3))
    atomic.install_file(tmp, tmp_path / "out.npy")
    assert np.load(tmp_path / "out.npy").tolist() == [0, 1, 2] and not tmp.exists()


WRITE_FILE = """
from retrieval.storage import atomic
atomic.write_bytes({path!r}, b"new" * 1000)
"""


@pytest.mark.parametrize("step, want", [("file:synced", b"old"), ("file:renamed", b"new" * 1000), (None, b"new" * 1000)])
def test_file_write_killed_at_each_step_leaves_old_or_new(tmp_path, step, want):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    rc = _child(WRITE_FILE.format(path=str(p)), step)
    assert rc == (atomic.CRASH_EXIT if step else 0)
    assert p.read_bytes() == want
    atomic.remove_temps(tmp_path)  # at open: the dead writer's temp file, if any, goes
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


# ---- folders ----------------------------------------------------------------------------------------
OLD = {"a.bin": b"old-a" * 100, "sub/b.txt": b"old-b"}
NEW = {"a.bin": b"new-a" * 200, "c.json": b"{}"}

REPLACE_DIR = """
from pathlib import Path
from retrieval.storage import atomic
atomic.replace_dir(Path({new!r}), Path({final!r}))
"""


def test_replace_dir_without_crash(tmp_path):
    final = _make(tmp_path / "store", OLD)
    new = _make(tmp_path / ".store.tmp", NEW)
    atomic.replace_dir(new, final)
    assert _tree(final) == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    fresh = _make(tmp_path / ".other.tmp", OLD)  # nothing there yet: a plain install
    atomic.replace_dir(fresh, tmp_path / "other")
    assert _tree(tmp_path / "other") == OLD


@pytest.mark.parametrize("step, want", [("dir:aside", OLD), ("dir:renamed", NEW), (None, NEW)])
def test_replace_dir_killed_at_each_step_recovers_a_whole_folder(tmp_path, step, want):
    final = _make(tmp_path / "store", OLD)
    new = _make(tmp_path / ".store.tmp-job1", NEW)
    rc = _child(REPLACE_DIR.format(new=str(new), final=str(final)), step)
    assert rc == (atomic.CRASH_EXIT if step else 0)
    if step == "dir:aside":  # the window that lost the folder before: nothing under its name
        assert not final.exists() and any(atomic.OLD_MARK in p.name for p in tmp_path.iterdir())
    restored = atomic.recover_dir(final)
    assert restored == (step == "dir:aside")
    assert _tree(final) == want
    assert not any(atomic.OLD_MARK in p.name for p in tmp_path.iterdir())  # no aside copy left
    if step == "dir:aside":  # the new folder was not lost either: a rerun can still install it
        atomic.replace_dir(new, final)
        assert _tree(final) == NEW


def test_replace_dir_recovers_an_earlier_crash_first(tmp_path):
    final = _make(tmp_path / "store", OLD)
    os.rename(final, tmp_path / f".store{atomic.OLD_MARK}{'a' * 32}")  # a crash in the window
    new = _make(tmp_path / ".store.tmp", NEW)
    atomic.replace_dir(new, final)
    assert _tree(final) == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path):
    final = _make(tmp_path / "store", OLD)
    with pytest.raises(FileNotFoundError):
        atomic.replace_dir(tmp_path / "missing", final, sync=False)
    assert _tree(final) == OLD and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_remove_dir_and_recover_all(tmp_path):
    a = _make(tmp_path / "a.old-x", OLD)  # names may contain the marker text itself
    atomic.remove_dir(a)
    assert list(tmp_path.iterdir()) == []
    _make(tmp_path / f".a.old-x{atomic.OLD_MARK}{'b' * 32}", OLD)  # crash in a replacement of "a.old-x"
    _make(tmp_path / f".gone{atomic.TRASH_MARK}{'c' * 32}", NEW)  # crash in a drop of "gone"
    assert atomic.recover_all(tmp_path) == [tmp_path / "a.old-x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.old-x"] and _tree(tmp_path / "a.old-x") == OLD


# ---- the datastore's replacement ----------------------------------------------------------------------
REBUILD_DATASTORE = """
from retrieval.drafting import DatastoreCatalog
DatastoreCatalog({root!r}).build("ds", [{inp!r}], vocab_size=9, overwrite=True)
"""


@pytest.mark.parametrize("step", ["dir:aside", "dir:renamed"])
def test_datastore_replacement_killed_between_the_renames_is_recoverable(tmp_path, step):
    """Issue 11 item 6: the old datastore was removed before the new one was renamed in; a kill in
    between left none. Now the catalog's open finds the old (or the new) one, whole."""
    old_in, new_in = tmp_path / "old.ids", tmp_path / "new.ids"
    old_in.write_text("1 2 3 4\n2 3 4 5\n")
    new_in.write_text("5 6 7 8 1\n6 7 8\n8 8 1 2\n")
    root = tmp_path / "stores"
    DatastoreCatalog(root).build("ds", [str(old_in)], vocab_size=9)
    rc = _child(REBUILD_DATASTORE.format(root=str(root), inp=str(new_in)), step)
    assert rc == atomic.CRASH_EXIT
    cat = DatastoreCatalog(root)  # opening the catalog recovers
    assert cat.names() == ["ds"]
    ds = cat.open("ds")
    if step == "dir:aside":
        assert ds.manifest["n_docs"] == 2 and ds.tokens.tolist() == [1, 2, 3, 4, 9, 2, 3, 4, 5, 9]
    else:
        assert ds.manifest["n_docs"] == 3 and ds.count([8, 1]) == 2
    assert len(ds.sa) == len(ds.tokens)
    assert not any(atomic.OLD_MARK in p.name for p in root.iterdir())
    cat.drop("ds")
    assert cat.names() == [] and not any(p.name.startswith(".ds") for p in root.iterdir())
