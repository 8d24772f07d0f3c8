"""What counts as a full disk, for every store (the point store, snapshots, jobs, engines)."""

from __future__ import annotations

import errno
import sqlite3

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e``, or an error it was raised from (its chain, up to 8 deep), is a full disk or
    quota: ``OSError`` ENOSPC / EDQUOT, or SQLite's "database or disk is full"."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(e, sqlite3.OperationalError) and "disk is full" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False
