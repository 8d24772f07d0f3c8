"""Attaching collection folders built elsewhere (``index_builder``) to a data folder.

A *collection folder* is exactly what the server keeps under ``<data_dir>/collections/``::

    collection.json                       CollectionConfig (+ "installed_at")
    shard-<i>/points.sqlite               the point store (retrieval.storage.points)
    shard-<i>/snapshots/<seq>/            index files, labels.npy, manifest.json (retrieval.storage.snapshots)

:func:`validate_folder` checks one before it is served: nothing but regular files and folders (no
symlinks, devices or pipes, and no file with more than one hard link: a hard link is another name of a
file that may lie outside the folders clients may read from, e.g. another collection's point store), a
valid ``collection.json``, one ``shard-<i>`` per shard and nothing else, a point store with the right
vector size, and a snapshot whose checksums, kind, dimension and metric match and whose write sequence
the point store has. A folder that is copied in is copied through descriptors, checking each file as
it is opened (:func:`_copy_tree`), so an entry swapped for a link after the check is not copied.

Installing is atomic per collection: the new folder is validated in a staging folder whose name
starts with ``.`` (the server deletes such leftovers at start-up), renamed to its final name, then
the old folder (when replacing) is removed. The folder name of a replacement is ``<name>@<hex>``,
since the old folder still holds ``<name>`` until the new one serves; ``collection.json`` records
``installed_at``, and if a crash leaves two folders with one collection name, the newest install wins
at the next start (:func:`resolve_duplicates`).

Thread-safety: the functions here do file work only; the server runs them in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import stat
import time
import uuid
from pathlib import Path

import numpy as np

from retrieval.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from retrieval.storage import atomic, snapshots
from retrieval.storage.names import validate_name
from retrieval.vectors.config import CollectionConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "collection.json"
_SQLITE_SIDE = ("points.sqlite", "points.sqlite-wal", "points.sqlite-shm")


def read_config(folder: Path):
    """The :class:`CollectionConfig` in ``folder/collection.json`` (validated), and the raw dict."""
    p = Path(folder) / CONFIG_FILE
    if not p.is_file():
        raise InvalidArgument(f"{str(folder)!r} is not a collection folder: it has no {CONFIG_FILE}")
    try:
        raw = json.loads(p.read_text())
        config = CollectionConfig.from_json(raw).validate()
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"{str(p)!r} is not a valid collection config: {e}") from None
    return config, raw


def _hard_link_error(p: Path, nlink: int) -> InvalidArgument:
    return InvalidArgument(f"{str(p)!r} has {nlink} hard links; a hard link may be another name of a file outside "
                           "the collection folder (outside the folders clients may read from), so a collection "
                           "folder holds files with one link only: copy the file instead of linking it")


def _check_tree(folder: Path) -> None:
    """Only regular files with one hard link, and folders, below ``folder``; symlinks, hard-linked
    files, devices and pipes are refused (InvalidArgument naming the entry)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                raise InvalidArgument(f"{str(p)!r} is a symbolic link; a collection folder holds plain files only")
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise InvalidArgument(f"{str(p)!r} is not a regular file or folder")
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                raise _hard_link_error(p, st.st_nlink)


_NOFOLLOW = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _copy_tree(source: Path, dest: Path) -> None:
    """Copy the collection folder ``source`` to the new folder ``dest`` through descriptors: each folder
    is entered relative to its parent's descriptor without following a link (``os.fwalk``), each file
    opened with ``O_NOFOLLOW`` and checked on the opened descriptor (a regular file with one hard link)
    before it is read, so an entry swapped for a link or a hard link after :func:`_check_tree` is
    refused, not copied. Modification times are kept."""
    dest.mkdir()
    for dirpath, dirnames, filenames, dirfd in os.fwalk(source, follow_symlinks=False):
        out = dest / Path(dirpath).relative_to(source)
        for name in dirnames:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):  # a folder swapped for a link meanwhile: fwalk does not enter it
                raise InvalidArgument(f"{str(Path(dirpath) / name)!r} is a symbolic link; a collection folder "
                                      "holds plain files only")
            (out / name).mkdir()
        for name in filenames:
            p = Path(dirpath) / name
            try:
                fd = os.open(name, _NOFOLLOW, dir_fd=dirfd)
            except OSError as e:
                if os.path.islink(p) or e.errno == errno.ELOOP:
                    raise InvalidArgument(f"{str(p)!r} is a symbolic link; a collection folder holds plain files "
                                          "only") from None
                raise InvalidArgument(f"{str(p)!r} cannot be read: {e.strerror or e}") from None
            with open(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise InvalidArgument(f"{str(p)!r} is not a regular file or folder")
                if st.st_nlink > 1:
                    raise _hard_link_error(p, st.st_nlink)
                with open(out / name, "xb") as w:
                    shutil.copyfileobj(f, w, 1 << 22)
            os.utime(out / name, ns=(st.st_atime_ns, st.st_mtime_ns))


def _store_info(path: Path, d: int) -> tuple[int, int]:
    """(last_seq, vector bytes of one row or -1) of a point store, read-only."""
    wal = Path(f"{path}-wal")
    # immutable: read the file alone, creating no -wal / -shm beside it (a closed store has an empty WAL)
    flags = "mode=ro" if wal.exists() and wal.stat().st_size else "mode=ro&immutable=1"
    try:
        con = sqlite3.connect(f"file:{path}?{flags}", uri=True, timeout=5)
    except sqlite3.Error as e:
        raise InvalidArgument(f"{str(path)!r} cannot be opened as a point store: {e}") from None
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"points", "meta", "tombstones"} <= tables:
            raise InvalidArgument(f"{str(path)!r} is not a point store (tables: {sorted(tables)})")
        row = con.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        last_seq = int(row[0]) if row else 0
        one = con.execute("SELECT length(vector) FROM points LIMIT 1").fetchone()
    except sqlite3.DatabaseError as e:
        raise InvalidArgument(f"{str(path)!r} is not a valid point store: {e}") from None
    finally:
        con.close()
    nbytes = int(one[0]) if one else -1
    if nbytes not in (-1, 4 * d):
        raise InvalidArgument(f"{str(path)!r} stores vectors of {nbytes // 4} values; the collection has "
                              f"dimension {d}")
    return last_seq, nbytes


def validate_folder(folder: Path):
    """Check a collection folder (see the module docstring); returns its :class:`CollectionConfig`.
    Raises :class:`InvalidArgument` naming the file at fault."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        raise InvalidArgument(f"{str(folder)!r} is not a folder")
    _check_tree(folder)
    config, _ = read_config(folder)
    index_metric = "l2" if config.metric == "l2" else "ip"
    expected = {CONFIG_FILE} | {f"shard-{i}" for i in range(config.shards)}
    extra = sorted(p.name for p in folder.iterdir() if p.name not in expected)
    if extra:
        raise InvalidArgument(f"{str(folder)!r} holds unexpected entries {extra[:5]}; a collection folder with "
                              f"{config.shards} shards holds {CONFIG_FILE} and shard-0..shard-{config.shards - 1}")
    for i in range(config.shards):
        sd = folder / f"shard-{i}"
        if not sd.is_dir():
            raise InvalidArgument(f"{str(folder)!r} lacks {sd.name}/ (collection.json says {config.shards} shards)")
        odd = sorted(p.name for p in sd.iterdir() if p.name not in (*_SQLITE_SIDE, "snapshots"))
        if odd:
            raise InvalidArgument(f"{str(sd)!r} holds unexpected entries {odd[:5]}")
        store = sd / "points.sqlite"
        if not store.is_file():
            raise InvalidArgument(f"{str(sd)!r} has no points.sqlite")
        last_seq, _ = _store_info(store, config.dimension)
        snaps = snapshots.candidates(sd / "snapshots")
        if not snaps:
            if last_seq:
                logger.warning("%s has no index snapshot: the server indexes its points when it opens it", sd)
            continue
        snap = snaps[0]
        try:
            manifest = snapshots.verify(snap)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        want = (config.index.kind, config.dimension, index_metric)
        got = (manifest.get("kind"), manifest.get("d"), manifest.get("metric"))
        if got != want:
            raise InvalidArgument(f"snapshot {str(snap)!r} is for kind/dimension/metric {got}, but "
                                  f"collection.json says {want}")
        if int(manifest["seq"]) > last_seq:
            raise InvalidArgument(f"snapshot {str(snap)!r} includes write {manifest['seq']} but the point store "
                                  f"ends at write {last_seq}")
        labels = np.load(snap / "labels.npy", mmap_mode="r")
        if labels.ndim != 1 or len(labels) != int(manifest.get("labels", -1)):
            raise InvalidArgument(f"snapshot {str(snap)!r}: labels.npy has shape {labels.shape}, the manifest "
                                  f"says {manifest.get('labels')} labels")
    return config


def write_config(folder: Path, config, **extra) -> None:
    """Write ``collection.json`` atomically (temporary file, fsync, rename, fsync the folder)."""
    atomic.write_json(Path(folder) / CONFIG_FILE, {**config.to_json(), **extra})


def stage(source: Path, staging: Path, name: str, move: bool = False):
    """Copy (or, with ``move``, rename) the collection folder ``source`` to ``staging``, validate the
    copy, and rename the collection in it to ``name``. Returns the config. Validation runs on the
    copy, so a source changed meanwhile cannot slip through."""
    validate_name(name, "collection name")
    source = Path(source)
    if not source.is_dir():
        raise NotFound(f"collection folder {str(source)!r} does not exist")
    if (source / CONFIG_FILE).is_symlink():
        raise InvalidArgument(f"{str(source / CONFIG_FILE)!r} is a symbolic link; a collection folder holds plain files only")
    read_config(source)  # not a collection folder at all: say so before walking it
    _check_tree(source)  # before copying or moving: say what is wrong before touching anything
    try:
        if move:
            os.rename(source, staging)  # then validate_folder checks the moved tree, which only the server holds
        else:
            _copy_tree(source, staging)  # what is copied is checked as it is read (no link followed or copied)
        config = validate_folder(staging)
        config = CollectionConfig(name=name, dimension=config.dimension, metric=config.metric, index=config.index,
                               shards=config.shards, created_at=config.created_at)
        write_config(staging, config, installed_at=time.time())
        atomic.fsync_tree(staging)  # whole on disk before it is renamed into place
    except BaseException:
        if move and staging.exists() and not source.exists():
            with contextlib.suppress(OSError):
                os.rename(staging, source)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config


def folders_by_name(root: Path) -> dict[str, list[Path]]:
    """Collection folders under ``root`` grouped by the collection name in their config."""
    out: dict[str, list[Path]] = {}
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        try:
            raw = json.loads((p / CONFIG_FILE).read_text())
            out.setdefault(str(raw["name"]), []).append(p)
        except (OSError, ValueError, KeyError):
            continue
    return out


def _installed_at(folder: Path) -> tuple[float, float, str]:
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
        return float(raw.get("installed_at", 0)), float(raw.get("created_at", 0)), folder.name
    except (OSError, ValueError):
        return 0.0, 0.0, folder.name


def trash(folder: Path) -> None:
    """Rename a folder to a ``.trash-`` name (atomic), then delete it."""
    t = folder.parent / f".trash-{uuid.uuid4().hex}"
    os.rename(folder, t)
    atomic.fsync_dir(folder.parent)
    shutil.rmtree(t, ignore_errors=True)


def resolve_duplicates(root: Path) -> None:
    """Where several folders hold one collection name (a crash during a replacing import), keep the
    newest install and delete the others."""
    for name, folders in folders_by_name(root).items():
        if len(folders) < 2:
            continue
        keep = max(folders, key=_installed_at)
        for f in folders:
            if f != keep:
                logger.warning("collection %s: %s was replaced by %s; removing it", name, f.name, keep.name)
                trash(f)


def target_folder(root: Path, name: str) -> Path:
    """Where a collection being installed goes: ``root/name`` when free, else ``root/name@<hex>``."""
    p = root / name
    return p if not p.exists() else root / f"{name}@{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def data_dir_lock(data_dir: Path):
    """Hold the data folder's lock (the one a running server holds); FailedPrecondition when taken."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FailedPrecondition(f"data folder {data_dir} is in use by {holder} (a running server?); "
                                     "stop it, or push the build to it with --push HOST:PORT") from None
        yield
    finally:
        f.close()


def install_offline(data_dir: Path, built: Path, name: str, replace: bool = False) -> Path:
    """Install the collection folder ``built`` into ``data_dir`` (no server running on it) as
    ``name``; with ``replace`` an existing collection of that name is replaced, else AlreadyExists.
    ``built`` is moved (renamed) when it is on the same file system, copied otherwise. Returns the
    installed folder."""
    validate_name(name, "collection name")
    root = Path(data_dir) / "collections"
    with data_dir_lock(data_dir):
        root.mkdir(parents=True, exist_ok=True)
        existing = folders_by_name(root).get(name, [])
        if existing and not replace:
            raise AlreadyExists(f"collection {name!r} already exists in {data_dir}; pass --replace to replace it")
        staging = root / f".import-{uuid.uuid4().hex}"
        try:
            stage(built, staging, name, move=True)
        except OSError:  # another file system: copy instead
            stage(built, staging, name, move=False)
        target = target_folder(root, name)
        os.rename(staging, target)
        atomic.fsync_dir(root)
        for old in existing:
            trash(old)
    return target


def snapshot_seqs(folder: Path) -> list[int]:
    """Per shard of a collection folder, the write sequence of its newest snapshot (0: none)."""
    config, _ = read_config(folder)
    out = []
    for i in range(config.shards):
        snaps = snapshots.candidates(Path(folder) / f"shard-{i}" / "snapshots")
        out.append(int(snaps[0].name) if snaps else 0)
    return out
