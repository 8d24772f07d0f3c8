"""Index snapshots: a folder per snapshot, written atomically and verified on load.

Layout: ``<shard>/snapshots/<seq:020d>/`` holding the backend's files, ``labels.npy`` (uint64 point id
of every label, ``2**64-1`` for hidden labels) and ``manifest.json``::

    {"format": 1, "seq": S, "kind": "hnsw", "d": 128, "metric": "l2", "spec": {...},
     "files": {"hnsw.bin": {"bytes": n, "sha256": "..."}, ...}}

``seq`` is the write sequence the index includes: every write with a sequence number <= S is in it,
writes after S are replayed from the point store on load. A snapshot is written into a temporary
folder, fsynced, then renamed into place (:func:`retrieval.storage.atomic.replace_dir`), so a crash
leaves either the old or the new snapshot. A snapshot whose files do not match their checksums is
reported and skipped.

Temporary folders are named ``.tmp-<pid>-<process token>-<uuid>``: :func:`cleanup` (after a commit)
deletes only those of processes that are gone (or of an earlier process that had the same pid), never
one another writer still fills. Writers of one ``root`` are serialised by their owner (the shard);
:func:`recover` runs at open.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from retrieval.storage import atomic

logger = logging.getLogger(__name__)

FORMAT = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


TMP_PREFIX = ".tmp-"
_TOKEN = uuid.uuid4().hex[:12]  # tells this process's temp folders from those of an earlier one with our pid


def begin(root: Path) -> Path:
    """A fresh temporary folder under ``root`` to write a snapshot into (named after its owner)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{os.getpid()}-{_TOKEN}-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def is_stale_temp(p: Path) -> bool:
    """Whether temp folder ``p`` was left by a writer that is gone: a dead pid, our pid with another
    process token (pid reuse after a restart), or an unnamed owner (written by an older version)."""
    parts = p.name[len(TMP_PREFIX):].split("-")
    if len(parts) != 3 or not parts[0].isdigit():
        return True
    pid, token = int(parts[0]), parts[1]
    if pid == os.getpid():
        return token != _TOKEN
    return not _pid_alive(pid)


def commit(root: Path, tmp: Path, seq: int, meta: dict, files: list[str]) -> Path:
    """Checksum and fsync ``files`` in ``tmp``, write the manifest, and rename it to its final name."""
    entries = {}
    for name in files:
        p = tmp / name
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
        entries[name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format": FORMAT, "seq": seq, **meta, "files": entries}
    atomic.write_json(tmp / "manifest.json", manifest)
    atomic.fsync_dir(tmp)
    final = root / f"{seq:020d}"
    # same seq written again (e.g. after a rebuild): the old one is renamed aside first, never lost
    atomic.replace_dir(tmp, final, sync=False)
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


def recover(root: Path) -> None:
    """At open: finish or undo snapshot replacements a crash interrupted (see :mod:`atomic`)."""
    atomic.recover_all(root)


def cleanup(root: Path, keep: Path | None) -> None:
    """Remove every snapshot other than ``keep`` and the temporary folders of writers that are gone.

    A temporary folder of a live writer is left alone (it is renamed into place or aborted by it)."""
    if not root.exists():
        return
    for p in root.iterdir():
        if p == keep or not p.is_dir():
            continue
        if p.name.startswith(TMP_PREFIX) and not is_stale_temp(p):
            continue
        if p.name.startswith(".") and atomic.OLD_MARK in p.name:
            continue  # the aside copy of a replacement: recover() decides
        shutil.rmtree(p, ignore_errors=True)
