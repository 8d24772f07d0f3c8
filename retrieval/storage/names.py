"""Names that reach the file system (collections, graphs, datastores, snapshots).

A valid name is 1..128 characters of ``[A-Za-z0-9_.-]``, starting with a letter or a digit, so it can
never be ``.``/``..``, contain a path separator, a NUL byte or a non-ASCII look-alike, and a folder
named after it always stays inside its parent.
"""

from __future__ import annotations

import re
from pathlib import Path

from retrieval.errors import InvalidArgument

MAX_NAME_LEN = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a valid object name, else raise :class:`InvalidArgument`."""
    if not isinstance(name, str):
        raise InvalidArgument(f"{what} must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidArgument(f"{what} must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidArgument(f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LEN}")
    if _NAME_RE.fullmatch(name) is None:
        shown = name.encode("unicode_escape").decode("ascii")[:80]
        raise InvalidArgument(
            f"{what} {shown!r} is not valid: use 1..{MAX_NAME_LEN} characters of letters, digits, "
            "'_', '.' and '-', starting with a letter or digit"
        )
    return name


def child_path(parent: Path, name: str, what: str = "name") -> Path:
    """``parent / name`` for a validated ``name``; guaranteed to stay inside ``parent``."""
    validate_name(name, what)
    path = (parent / name).resolve()
    if path.parent != parent.resolve():  # defence in depth; the regex already rules this out
        raise InvalidArgument(f"{what} {name!r} escapes its folder")
    return path
