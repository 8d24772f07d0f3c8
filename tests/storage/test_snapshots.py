"""Index snapshots: atomic commit, verification, and detection of truncated / corrupted files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retrieval.storage import snapshots


def _write(root, seq, payload: bytes = b"x" * 1000, extra: bytes = b"labels"):
    tmp = snapshots.begin(root)
    (tmp / "index.bin").write_bytes(payload)
    (tmp / "labels.bin").write_bytes(extra)
    return snapshots.commit(root, tmp, seq, {"kind": "hnsw", "d": 4, "metric": "l2"}, ["index.bin", "labels.bin"])


def test_commit_and_verify(tmp_path):
    root = tmp_path / "snaps"
    final = _write(root, 7)
    assert final.name == f"{7:020d}"
    m = snapshots.verify(final)
    assert m["seq"] == 7 and m["kind"] == "hnsw" and m["format"] == snapshots.FORMAT
    assert set(m["files"]) == {"index.bin", "labels.bin"} and m["files"]["index.bin"]["bytes"] == 1000
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())  # temp folder renamed away


def test_candidates_newest_first_and_cleanup(tmp_path):
    root = tmp_path / "snaps"
    a = _write(root, 3)
    b = _write(root, 12)
    c = _write(root, 100)
    leftover = root / f"{snapshots.TMP_PREFIX}{_dead_pid()}-0123456789ab-{'0' * 32}"  # an interrupted write
    leftover.mkdir()
    assert snapshots.candidates(root) == [c, b, a]  # numeric, not lexical, order; temp folders excluded
    snapshots.cleanup(root, c)
    assert [p.name for p in root.iterdir()] == [c.name] and not leftover.exists()
    assert snapshots.candidates(tmp_path / "absent") == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_cleanup_keeps_the_temp_folder_of_a_live_writer(tmp_path):
    """Issue 11 item 4: one writer's cleanup deleted the folder another writer was filling."""
    root = tmp_path / "snaps"
    other = snapshots.begin(root)  # a write in flight (this process)
    (other / "index.bin").write_bytes(b"x")
    c = _write(root, 3)
    snapshots.cleanup(root, c)
    assert other.exists() and snapshots.is_stale_temp(other) is False
    assert snapshots.is_stale_temp(root / f"{snapshots.TMP_PREFIX}{_dead_pid()}-0123456789ab-{'0' * 32}")
    (other / "labels.bin").write_bytes(b"y")
    d = snapshots.commit(root, other, 4, {"kind": "hnsw", "d": 4, "metric": "l2"}, ["index.bin", "labels.bin"])
    snapshots.cleanup(root, d)
    assert snapshots.candidates(root) == [d]


def test_recover_restores_a_snapshot_whose_replacement_crashed(tmp_path):
    """A same-seq replacement killed between its renames: recover() puts the old snapshot back."""
    root = tmp_path / "snaps"
    final = _write(root, 5, b"old")
    aside = root / f".{final.name}.old-{'1' * 32}"
    os.rename(final, aside)  # the state right after replace_dir's first rename
    assert snapshots.candidates(root) == []
    snapshots.recover(root)
    assert snapshots.candidates(root) == [final] and (final / "index.bin").read_bytes() == b"old"
    snapshots.verify(final)


def test_same_seq_replaces(tmp_path):
    root = tmp_path / "snaps"
    _write(root, 5, b"old")
    final = _write(root, 5, b"newer")
    assert (final / "index.bin").read_bytes() == b"newer"
    snapshots.verify(final)
    assert [p.name for p in root.iterdir()] == [final.name]  # the aside copy of the old one is gone


def test_truncated_file_detected(tmp_path):
    final = _write(tmp_path / "s", 1)
    p = final / "index.bin"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated"):
        snapshots.verify(final)


@pytest.mark.parametrize("offset", [0, 499, 999])
def test_flipped_byte_detected(tmp_path, offset):
    final = _write(tmp_path / "s", 1, bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8)))
    p = final / "index.bin"
    data = bytearray(p.read_bytes())
    data[offset] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        snapshots.verify(final)


def test_missing_file_and_manifest(tmp_path):
    final = _write(tmp_path / "s", 1)
    (final / "labels.bin").unlink()
    with pytest.raises(ValueError, match="lacks labels.bin"):
        snapshots.verify(final)
    final = _write(tmp_path / "t", 1)
    (final / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest"):
        snapshots.verify(final)


def test_corrupt_or_foreign_manifest(tmp_path):
    final = _write(tmp_path / "s", 1)
    mp = final / "manifest.json"
    mp.write_text(mp.read_text()[:20])
    with pytest.raises(ValueError, match="corrupt manifest"):
        snapshots.verify(final)
    final = _write(tmp_path / "t", 1)
    mp = final / "manifest.json"
    m = json.loads(mp.read_text())
    m["format"] = 99
    mp.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="format 99"):
        snapshots.verify(final)


def test_abort_removes_temp(tmp_path):
    tmp = snapshots.begin(tmp_path / "s")
    (tmp / "f").write_bytes(b"1")
    snapshots.abort(tmp)
    assert not tmp.exists()
