"""Index snapshots: atomic commit, verification, and detection of truncated / corrupted files."""

from __future__ import annotations

import json

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
    leftover = snapshots.begin(root)  # an interrupted write
    assert snapshots.candidates(root) == [c, b, a]  # numeric, not lexical, order; temp folders excluded
    snapshots.cleanup(root, c)
    assert [p.name for p in root.iterdir()] == [c.name] and not leftover.exists()
    assert snapshots.candidates(tmp_path / "absent") == []


def test_same_seq_replaces(tmp_path):
    root = tmp_path / "snaps"
    _write(root, 5, b"old")
    final = _write(root, 5, b"newer")
    assert (final / "index.bin").read_bytes() == b"newer"
    snapshots.verify(final)


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
