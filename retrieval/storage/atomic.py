"""Crash-safe writes: the one place the package replaces a file or a folder that must survive a crash.

Files (:func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`save_npy`, :func:`save_npz`,
:func:`write_with`, and :func:`install_file` for writers that need a file name): the content goes to a temporary file in the same folder (``.<name>.<uuid>.tmp``),
the file is fsynced, renamed over the target, and the folder is fsynced. After a crash at any point
the target holds either its old content or the new content, never a mix; a leftover temporary file is
only garbage (:func:`remove_temps` deletes those of a folder).

Folders (:func:`replace_dir`): the old folder is renamed aside to ``.<name>.old-<uuid>`` first, the
parent fsynced, the new folder renamed into place, the parent fsynced, and only then is the old folder
deleted. A crash between the two renames leaves no folder under the final name but a whole aside one:
:func:`recover_dir` (call it before opening ``final``; :func:`replace_dir` calls it itself) renames it
back, or deletes it once the new folder is in place. So at every point the old or the new folder is
whole and found under its name after recovery.

Deleting a folder (:func:`remove_dir`) renames it to ``.<name>.trash-<uuid>`` first, so a crash
mid-delete never leaves a half-deleted folder under its name; :func:`recover_dir` removes the rest.

Crash tests: with ``RETRIEVAL_ATOMIC_CRASH_AT=<step>`` in the environment the process ``os._exit``\\ s
(status :data:`CRASH_EXIT`) at that step: ``file:synced`` (temp file written and fsynced, not renamed),
``file:renamed`` (renamed, folder not fsynced), ``dir:aside`` (old folder renamed aside, new not in
place), ``dir:renamed`` (new in place, old aside not deleted yet).

Thread-safety: the functions hold no state; callers serialise writers of one target (two concurrent
writers of one file both succeed and the last rename wins; two replacements of one folder must not
overlap).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

CRASH_ENV = "RETRIEVAL_ATOMIC_CRASH_AT"
CRASH_EXIT = 87
TMP_SUFFIX = ".tmp"
OLD_MARK = ".old-"
TRASH_MARK = ".trash-"


def _crash_point(step: str) -> None:
    """Test hook: exit the process at ``step`` without any cleanup (as a kill -9 would)."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(CRASH_EXIT)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (renames, creations, deletions in it) durable.

    Filesystems that cannot fsync a folder (EINVAL, ENOTSUP) are accepted; other errors raise."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under ``folder`` (and ``folder`` itself): its content is durable."""
    folder = Path(folder)
    for dirpath, _dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def _install(tmp: Path, path: Path, write: Callable[[], None]) -> None:
    """``write()`` fills and fsyncs ``tmp``; then rename it over ``path`` and fsync the folder. A
    failure before the rename removes ``tmp``."""
    try:
        write()
        _crash_point("file:synced")
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _crash_point("file:renamed")
    fsync_dir(path.parent)


def write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], Any]) -> None:
    """Replace ``path`` atomically and durably with what ``writer(f)`` writes to the binary file ``f``."""
    path = Path(path)
    tmp = _temp_for(path)

    def write() -> None:
        with open(tmp, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())

    _install(tmp, path, write)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` (temp file in the same folder, fsync, rename, fsync the folder)."""
    write_with(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    write_bytes(path, json.dumps(obj, indent=indent, sort_keys=sort_keys).encode())


def save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Stream ``arr`` into ``path`` as ``.npy`` (no second in-memory copy), atomically and durably."""
    write_with(path, lambda f: np.save(f, arr, allow_pickle=False))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` of ``arrays`` into ``path`` (streamed), atomically and durably (never pickled)."""
    write_with(path, lambda f: np.savez(f, **arrays))


def install_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """For writers that need a file name (h5py, torch, faiss): fsync the finished temporary file
    ``tmp`` (a sibling of ``path``), rename it over ``path`` and fsync the folder."""
    tmp, path = Path(tmp), Path(path)

    def write() -> None:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    _install(tmp, path, write)


def remove_temps(folder: str | os.PathLike) -> int:
    """Delete the temporary files :func:`write_with` leaves when a process dies mid-write; returns how
    many. Call it only where no other writer is active in ``folder`` (at open)."""
    folder = Path(folder)
    n = 0
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------------
def _asides(final: Path) -> list[Path]:
    prefix = f".{final.name}{OLD_MARK}"
    parent = final.parent
    if not parent.is_dir():
        return []
    return [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]


def recover_dir(final: str | os.PathLike) -> bool:
    """Finish or undo a :func:`replace_dir` of ``final`` that a crash interrupted.

    ``final`` missing and an aside copy present: the replacement died between its renames, so the old
    folder is renamed back (returns True). ``final`` present: leftover aside copies are deleted. Call it
    before opening ``final``, never while a replacement of ``final`` is running."""
    final = Path(final)
    asides = _asides(final)
    if not asides:
        _remove_trash(final)
        return False
    restored = False
    if not os.path.lexists(final):
        # Only one aside exists unless replacements crashed repeatedly without recovery; the one
        # renamed last (newest ctime) is the folder that was under the final name most recently.
        keep = max(asides, key=lambda p: p.stat().st_ctime_ns)
        os.rename(keep, final)
        fsync_dir(final.parent)
        logger.warning("restored %s from %s (a replacement was interrupted by a crash)", final, keep.name)
        asides.remove(keep)
        restored = True
    for p in asides:
        shutil.rmtree(p, ignore_errors=True)
    _remove_trash(final)
    return restored


def recover_all(parent: str | os.PathLike) -> list[Path]:
    """:func:`recover_dir` for every folder of ``parent`` with an aside or trash copy (at open);
    returns the folders restored."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    finals = set()
    for p in parent.iterdir():
        for mark in (OLD_MARK, TRASH_MARK):
            if p.name.startswith(".") and mark in p.name:
                finals.add(p.name[1:].rsplit(mark, 1)[0])
    return [parent / name for name in sorted(finals) if name and recover_dir(parent / name)]


def _remove_trash(final: Path) -> None:
    prefix = f".{final.name}{TRASH_MARK}"
    if final.parent.is_dir():
        for p in final.parent.iterdir():
            if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete folder ``path`` so that a crash midway leaves it whole or gone from its name: rename it
    to a ``.<name>.trash-<uuid>`` sibling, fsync the parent, then delete that."""
    path = Path(path)
    trash = path.parent / f".{path.name}{TRASH_MARK}{uuid.uuid4().hex}"
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(new: str | os.PathLike, final: str | os.PathLike, *, sync: bool = True) -> None:
    """Put folder ``new`` in place of ``final`` (which may not exist), so that a crash at any point leaves
    the old or the new folder whole (found under ``final`` after :func:`recover_dir`).

    ``sync``: fsync every file of ``new`` first (pass False when its writer fsynced them already).
    ``new`` must be on the same filesystem as ``final`` (best: a sibling temporary folder)."""
    new, final = Path(new), Path(final)
    parent = final.parent
    recover_dir(final)
    if sync:
        fsync_tree(new)
    aside = None
    if os.path.lexists(final):
        aside = parent / f".{final.name}{OLD_MARK}{uuid.uuid4().hex}"
        os.rename(final, aside)
        fsync_dir(parent)
        _crash_point("dir:aside")
    try:
        os.rename(new, final)
    except BaseException:
        if aside is not None and not os.path.lexists(final):
            os.rename(aside, final)  # put the old folder back; the new one stays where it was
            fsync_dir(parent)
        raise
    if new.parent != parent:
        fsync_dir(new.parent)
    fsync_dir(parent)
    _crash_point("dir:renamed")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
