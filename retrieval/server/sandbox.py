"""Opening the files a client names, so that nothing outside the allowed folders is ever read.

:func:`retrieval.server.auth.resolve_client_file` checks a client's path when a request or job arrives.
That alone is a time-of-check / time-of-use gap: a job opens its input later, and by then the file (or a
folder above it) may have been replaced by a symbolic link, or a folder input may hold links that point
out. So the code that reads a client's file opens it here, and reads from the opened file:

- the last component is opened with ``O_NOFOLLOW`` (a symlink there is refused), non-blocking (a FIFO
  does not hang the job) and close-on-exec;
- the *opened* file is checked: a regular file (or a folder, for :func:`open_dir`), one hard link only
  (a hard link into the folder can name any file its creator could read: copy the file instead), and its
  real path, read back from the open descriptor (``/proc/self/fd/N``; elsewhere ``realpath`` plus a
  ``(st_dev, st_ino)`` comparison), inside one of the allowed folders. Symlinks in the folders *above*
  the file are thereby caught too, whenever they were swapped in;
- the caller reads from the returned file object (or passes its descriptor on), so the check and the
  read are on the same inode.

Folder inputs (:func:`open_dir`): the folder itself is opened and checked as above, listed through its
descriptor, and each file is opened relative to that descriptor (``dir_fd``): a renamed or swapped
folder cannot redirect the reads. A listed entry that is a symbolic link is refused (even one that
points inside the allowed folders: one rule, no surprises); ``..`` and names with a ``/`` cannot be
opened. Paths given here must not contain ``..`` components at all.

The allowed folders themselves are the operator's settings (``security.client_file_dirs``): an allowed
folder that is itself a symlink is resolved (followed) when the check runs, and files under its target
are allowed. Only links at or below it are distrusted.

Folders for libraries that take only a folder name (:func:`folder_view`, e.g. a model folder for
transformers' ``from_pretrained``): the folder and each of its files are opened as above, and the
library is given a private folder whose entries lead to the *opened* files (``/proc/self/fd/N`` links
while the descriptors are held; a copy read from them where there is no ``/proc``).

Errors: :class:`~retrieval.errors.PermissionDenied` (outside the allowed folders, a symlink, a hard
link, changed while opened), :class:`~retrieval.errors.NotFound` (missing),
:class:`~retrieval.errors.InvalidArgument` (not a regular file / folder, unreadable, a bad path). Each
names the path and the allowed folders.

Thread-safety: the functions are stateless; a :class:`ConfinedDir` may be shared for reading
(``open`` is safe from several threads) but is closed once.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePath

from retrieval.errors import InvalidArgument, NotFound, PermissionDenied

logger = logging.getLogger(__name__)

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_FILE_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NOCTTY | _O_NONBLOCK | _O_BINARY
_PROC_FD = Path("/proc/self/fd")


def _shown(path: object) -> str:
    return repr(str(path).encode("unicode_escape").decode("ascii")[:300])


def _dirs(allowed: Iterable[str | os.PathLike[str]]) -> list[Path]:
    out = [Path(os.path.realpath(d)) for d in allowed]
    if not out:
        raise PermissionDenied("no folder is allowed for client files (security.client_file_dirs is empty)")
    return out


def _where(dirs: Sequence[Path]) -> str:
    return f"the folders clients may read from are {', '.join(map(str, dirs))} (security.client_file_dirs)"


def inside(real: Path, dirs: Sequence[Path]) -> bool:
    """True when the real path ``real`` is one of ``dirs`` or lies below one of them."""
    return any(real == d or d in real.parents for d in dirs)


def _check_path(path: str | os.PathLike[str], what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgument(f"{what} must be a path, got {type(path).__name__}")
    s = os.fspath(path)
    if not isinstance(s, str) or not s or "\x00" in s or len(s) > 4096:
        raise InvalidArgument(f"{what} {_shown(s)} is not a valid path (empty, a NUL byte or over 4096 characters)")
    if ".." in PurePath(s).parts:
        raise InvalidArgument(f"{what} {_shown(s)} contains '..'; give the file's own path")
    return os.path.abspath(s)


def _open_error(e: OSError, path: str, what: str, dirs: Sequence[Path]) -> Exception:
    if e.errno in (errno.ELOOP, errno.EMLINK) or (e.errno == errno.ENOTDIR and os.path.islink(path)):
        return PermissionDenied(f"{what} {_shown(path)} is a symbolic link; links are not followed in client "
                                f"files (name the file itself); {_where(dirs)}")
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"{what} {_shown(path)} does not exist on the server")
    if e.errno == errno.EACCES:
        return InvalidArgument(f"{what} {_shown(path)} is not readable (permission denied)")
    return InvalidArgument(f"{what} {_shown(path)} cannot be opened: {e.strerror or e}")


def _real_of_fd(fd: int, path: str, st: os.stat_result) -> Path | None:
    """The real path of the open descriptor ``fd`` (None when it cannot be told)."""
    try:
        target = os.readlink(_PROC_FD / str(fd))
    except OSError:
        target = None
    if target is not None and target.startswith("/"):
        if target.endswith(" (deleted)") and not os.path.exists(target):
            return None
        return Path(target)
    # no /proc: resolve the name and make sure it still leads to the inode that is open
    real = os.path.realpath(path)
    try:
        st2 = os.stat(real)
    except OSError:
        return None
    return Path(real) if (st2.st_dev, st2.st_ino) == (st.st_dev, st.st_ino) else None


def _check_opened(fd: int, path: str, what: str, dirs: Sequence[Path], want_dir: bool) -> Path:
    """Check an open descriptor (type, hard links, real path inside ``dirs``); returns its real path."""
    st = os.fstat(fd)
    if want_dir:
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{what} {_shown(path)} is not a folder")
    else:
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{what} {_shown(path)} is a folder; a file is expected here")
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{what} {_shown(path)} is not a regular file (a device, pipe or socket)")
        if st.st_nlink > 1:
            raise PermissionDenied(
                f"{what} {_shown(path)} has {st.st_nlink} hard links; a hard link may point at a file outside the "
                f"allowed folders, so client files must have exactly one: copy the file instead of linking it; "
                f"{_where(dirs)}")
    real = _real_of_fd(fd, path, st)
    if real is None:
        raise PermissionDenied(f"{what} {_shown(path)} changed while it was being opened (moved, deleted or "
                               f"replaced); try again once it is in place")
    if not inside(real, dirs):
        raise PermissionDenied(f"{what} {_shown(path)} is outside the folders clients may read from (it is "
                               f"really {_shown(real)}); {_where(dirs)}")
    return real


def _clear_nonblock(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_NONBLOCK)
    except (ImportError, OSError):  # no fcntl (Windows): the flag is 0 there anyway
        pass


def _as_file(fd: int) -> io.BufferedReader:
    _clear_nonblock(fd)
    return os.fdopen(fd, "rb")


def open_file(path: str | os.PathLike[str], allowed: Iterable[str | os.PathLike[str]],
              what: str = "input file") -> io.BufferedReader:
    """Open the regular file ``path`` for reading, confined to the ``allowed`` folders (see the module
    docstring). Returns a binary file object positioned at 0; the caller reads from it and closes it."""
    dirs = _dirs(allowed)
    p = _check_path(path, what)
    try:
        fd = os.open(p, _FILE_FLAGS)
    except OSError as e:
        raise _open_error(e, p, what, dirs) from None
    try:
        _check_opened(fd, p, what, dirs, want_dir=False)
    except BaseException:
        os.close(fd)
        raise
    return _as_file(fd)


class ConfinedDir:
    """A folder opened by :func:`open_dir`: list it and open its files through its descriptor."""

    def __init__(self, fd: int, path: Path, real: Path, dirs: Sequence[Path], what: str) -> None:
        self.fd = fd
        self.path = path
        self.real = real
        self._dirs = list(dirs)
        self._what = what

    def files(self, suffixes: Iterable[str] | None = None) -> list[str]:
        """Names of the regular files in the folder, sorted; ``suffixes`` (lower-case, with the dot)
        restricts them by extension. Entries that are symbolic links (and would be selected) are refused
        with PermissionDenied; subfolders, pipes and devices are skipped."""
        suf = None if suffixes is None else tuple(s.lower() for s in suffixes)
        names: list[str] = []
        with os.scandir(self.fd) as it:
            for e in it:
                if suf is not None and not e.name.lower().endswith(suf):
                    continue
                if e.is_symlink():
                    raise PermissionDenied(
                        f"{_shown(self.path / e.name)} in {self._what} {_shown(self.path)} is a symbolic link; links "
                        f"in folder inputs are not followed: put the file itself in the folder; {_where(self._dirs)}")
                if e.is_file(follow_symlinks=False):
                    names.append(e.name)
        return sorted(names)

    def open(self, name: str, what: str = "input file") -> io.BufferedReader:
        """Open the file ``name`` of this folder (one component: no ``/``, not ``.`` / ``..``)."""
        shown = self.path / name if isinstance(name, str) else name
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\x00" in name \
                or (os.sep != "/" and os.sep in name):
            raise InvalidArgument(f"{what} {_shown(shown)}: a folder entry must be a plain file name")
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=self.fd)
        except OSError as e:
            raise _open_error(e, str(shown), what, self._dirs) from None
        try:
            _check_opened(fd, str(shown), what, self._dirs, want_dir=False)
        except BaseException:
            os.close(fd)
            raise
        return _as_file(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ConfinedDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - a forgotten close
        try:
            self.close()
        except Exception:
            pass


def open_dir(path: str | os.PathLike[str], allowed: Iterable[str | os.PathLike[str]],
             what: str = "input folder") -> ConfinedDir:
    """Open the folder ``path``, confined to the ``allowed`` folders; the folder itself must not be a
    symbolic link (an allowed folder named in the settings may be)."""
    dirs = _dirs(allowed)
    p = _check_path(path, what)
    try:
        fd = os.open(p, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOTDIR and not os.path.islink(p):
            raise InvalidArgument(f"{what} {_shown(p)} is not a folder") from None
        raise _open_error(e, p, what, dirs) from None
    try:
        real = _check_opened(fd, p, what, dirs, want_dir=True)
    except BaseException:
        os.close(fd)
        raise
    return ConfinedDir(fd, Path(p), real, dirs, what)


def is_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder, not following a symlink at the end (a hint to pick
    :func:`open_file` or :func:`open_dir`; each checks again what it opens)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def open_path(path: str | os.PathLike[str], allowed: Iterable[str | os.PathLike[str]],
              what: str = "input") -> io.BufferedReader | ConfinedDir:
    """:func:`open_dir` when ``path`` is a folder, else :func:`open_file`."""
    return open_dir(path, allowed, what) if is_dir(path) else open_file(path, allowed, what)


def fd_path(f: io.IOBase | int) -> str:
    """A path that reopens the very file behind an open descriptor (``/proc/self/fd/N``), for libraries
    that only take names; the caller keeps ``f`` open while it is used."""
    fd = f if isinstance(f, int) else f.fileno()
    return str(_PROC_FD / str(fd))


def check_dir(path: str | os.PathLike[str], allowed: Iterable[str | os.PathLike[str]],
              what: str = "input folder") -> list[str]:
    """Open the folder ``path`` and each regular file in it as :func:`folder_view` does (refusing what it
    refuses), read nothing, and return the file names: a cheap check when a job starts."""
    with open_dir(path, allowed, what) as d:
        names = d.files()
        for name in names:
            d.open(name, f"file in {what}").close()
    return names


@contextlib.contextmanager
def folder_view(path: str | os.PathLike[str], allowed: Iterable[str | os.PathLike[str]],
                scratch: str | os.PathLike[str], what: str = "input folder") -> Iterator[Path]:
    """A private folder standing for the client folder ``path`` as it was checked, for a library that
    opens files by name inside a folder it is given (transformers' ``from_pretrained``).

    ``path`` is opened with :func:`open_dir` and each regular file in it with :meth:`ConfinedDir.open`
    (a symbolic link among them, a hard-linked file or a real path outside the ``allowed`` folders is
    refused, as everywhere here). The view, a new folder under ``scratch``, holds one entry per file,
    same name, leading to the *opened* file: a symbolic link to ``/proc/self/fd/N`` (no copy; the
    descriptor stays open while the view is in use, and the link reopens that very inode whatever is
    at ``path`` by then), or, where ``/proc`` cannot reopen descriptors, a copy read from the
    descriptor. Subfolders of ``path`` are left out. On exit the descriptors are closed and the view is
    removed. The view is for this process only (``/proc/self``): do not hand it to a child process.
    """
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(open_dir(path, allowed, what))
        view = Path(tempfile.mkdtemp(prefix="view-", dir=scratch))
        stack.callback(shutil.rmtree, view, True)
        for name in d.files():
            f = stack.enter_context(d.open(name, f"file in {what}"))
            link = fd_path(f)
            try:
                same = os.path.samestat(os.stat(link), os.fstat(f.fileno()))
            except OSError:
                same = False
            if same:
                os.symlink(link, view / name)
            else:  # no /proc: copy what the descriptor reads
                with open(view / name, "wb") as out:
                    shutil.copyfileobj(f, out, 1 << 22)
        yield view
