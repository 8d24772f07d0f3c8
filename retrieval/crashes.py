"""A record of the fatal errors (native aborts, segfaults) that end a server process.

A native library's assertion (``abort()`` in faiss, a segfault in hnswlib) ends the process; no
``try`` catches it. :func:`arm`, called once at start-up, points :mod:`faulthandler` at
``<data_dir>/.fatal-error`` so that such a death leaves the Python stacks of every thread there, and
moves the previous run's record (if it died that way) to ``<data_dir>/.fatal-error.last`` and into the
log. The collection and job managers read it (:func:`last_crash`) to tell a death by a fatal error
(quarantine what was being opened or resumed) from a kill (``kill -9``, the OOM killer, a power loss:
try again, up to a limit). A run that ends without a fatal error leaves the record empty.
"""

from __future__ import annotations

import faulthandler
import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

RECORD = ".fatal-error"
LAST = ".fatal-error.last"

_armed: list = []  # the open record file (faulthandler keeps only its descriptor)


@dataclass(frozen=True)
class Crash:
    """The previous run's fatal error: ``error`` ("Aborted", "Segmentation fault"...), the dump, and
    whether the thread that died was running a job body."""

    error: str
    text: str
    in_job: bool


def arm(data_dir: Path) -> Crash | None:
    """Keep the previous run's fatal-error record (returned, and logged) and record this run's."""
    data_dir = Path(data_dir)
    cur, last = data_dir / RECORD, data_dir / LAST
    try:
        text = cur.read_text(errors="replace") if cur.exists() else ""
    except OSError:
        text = ""
    try:
        if text.strip():
            cur.replace(last)
        else:
            last.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("cannot keep the previous run's fatal-error record %s: %s", cur, e)
    crash = parse(text)
    if crash is not None:
        logger.error("the previous run of this server died of a fatal error (%s); its stacks:\n%s",
                     crash.error, text.rstrip())
    try:
        f = open(cur, "w")
    except OSError as e:  # e.g. a full disk: fatal errors still reach stderr
        logger.warning("cannot record fatal errors in %s (%s); they go to stderr only", cur, e)
        return crash
    faulthandler.enable(file=f, all_threads=True)
    _armed[:] = [f]
    return crash


def last_crash(data_dir: Path) -> Crash | None:
    """The previous run's fatal error, if it died of one (after :func:`arm` ran in this process)."""
    try:
        return parse((Path(data_dir) / LAST).read_text(errors="replace"))
    except OSError:
        return None


def parse(text: str) -> Crash | None:
    if not text.strip():
        return None
    m = re.search(r"Fatal Python error: ([^\n]+)", text)
    error = m.group(1).strip() if m else "fatal error"
    # the block of the thread that died: "Current thread 0x... (most recent call first):" up to a blank line
    m = re.search(r"Current thread[^\n]*\n((?:[ \t]+[^\n]*\n?)*)", text)
    current = m.group(1) if m else ""
    return Crash(error=error, text=text, in_job="retrieval/jobs/manager.py" in current.replace("\\", "/"))
