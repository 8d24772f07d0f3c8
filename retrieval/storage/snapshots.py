"""Index snapshots: a folder per snapshot, written atomically and verified on load.

Layout: ``<shard>/snapshots/<seq:020d>/`` holding the backend's files, ``labels.npy`` (uint64 point id
of every label, ``2**64-1`` for hidden labels) and ``manifest.json``::

    {"format": 1, "seq": S, "kind": "hnsw", "d": 128, "metric": "l2", "spec": {...},
     "files": {"hnsw.bin": {"bytes": n, "sha256": "..."}, ...}}

``seq`` is the write sequence the index includes: every write with a sequence number <= S is in it,
writes after S are replayed from the point store on load. A snapshot is written into a temporary
folder, fsynced, then renamed into place, so a crash leaves either the old or the new snapshot.
A snapshot whose files do not match their checksums is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

FORMAT = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(root: Path) -> Path:
    """A fresh temporary folder under ``root`` to write a snapshot into."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def commit(root: Path, tmp: Path, seq: int, meta: dict, files: list[str]) -> Path:
    """Checksum and fsync ``files`` in ``tmp``, write the manifest, and rename it to its final name."""
    entries = {}
    for name in files:
        p = tmp / name
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
        entries[name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format": FORMAT, "seq": seq, **meta, "files": entries}
    mp = tmp / "manifest.json"
    with open(mp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = root / f"{seq:020d}"
    if final.exists():  # same seq written again (e.g. after a rebuild): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def verify(folder: Path) -> dict:
    """The manifest of a complete, intact snapshot; raises ValueError otherwise."""
    mp = folder / "manifest.json"
    if not mp.exists():
        raise ValueError(f"snapshot {folder} has no manifest")
    try:
        manifest = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"snapshot {folder} has a corrupt manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"snapshot {folder} has format {manifest.get('format')}, expected {FORMAT}")
    for name, entry in manifest["files"].items():
        p = folder / name
        if not p.exists():
            raise ValueError(f"snapshot {folder} lacks {name}")
        if p.stat().st_size != entry["bytes"]:
            raise ValueError(f"snapshot file {p} has {p.stat().st_size} bytes, expected {entry['bytes']} (truncated)")
        if _sha256(p) != entry["sha256"]:
            raise ValueError(f"snapshot file {p} does not match its checksum (corrupt)")
    return manifest


def candidates(root: Path) -> list[Path]:
    """Complete snapshot folders, newest first."""
    if not root.exists():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(out, key=lambda p: int(p.name), reverse=True)


def cleanup(root: Path, keep: Path | None) -> None:
    """Remove temporary folders and every snapshot other than ``keep``."""
    if not root.exists():
        return
    for p in root.iterdir():
        if p != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
