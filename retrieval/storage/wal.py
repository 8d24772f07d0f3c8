"""Inspecting a SQLite write-ahead log for a torn, uncommitted or corrupt tail.

SQLite protects every WAL frame with a cumulative checksum and a salt copied from the WAL header; on
recovery it keeps the frames up to the last *commit* frame whose checksum chain is intact and silently
ignores the rest. That is correct, but silent. :func:`scan` reads the frame headers (cheap: no page
data is checksummed here) and :func:`diagnose` compares them with the number of frames SQLite accepted
(``PRAGMA wal_checkpoint(PASSIVE)`` reports it), so the loss can be told apart and reported:

* ``torn_bytes``: a partial frame at the end of the file (a write cut short by a crash);
* ``uncommitted_frames``: whole frames after the last commit frame (a transaction that never
  committed, hence was never acknowledged): normal after ``kill -9`` during a commit;
* ``rejected_frames``: frames up to a commit frame that SQLite refused (checksum mismatch): the log
  is corrupt and committed transactions after the damage are lost. The store serves the state before
  it; index snapshots that include later writes are refused by the shard (their ``seq`` is beyond
  the store's), and the index is rebuilt from the store.

Format (https://sqlite.org/fileformat.html#the_write_ahead_log): a 32-byte header (magic 0x377f0682
or 0x377f0683, version, page size, checkpoint sequence, salt-1, salt-2, checksum-1, checksum-2), then
frames of a 24-byte header (page number, database size in pages for commit frames else 0, salt-1,
salt-2, checksum-1, checksum-2) and one page. All fields big-endian.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

WAL_MAGIC = (0x377F0682, 0x377F0683)
HEADER = 32
FRAME_HEADER = 24


@dataclass
class WalScan:
    page_size: int = 0
    frames: int = 0              # whole frames carrying the header's salt, from the start
    last_commit: int = 0         # 1-based index of the last commit frame among them (0: none)
    torn_bytes: int = 0          # bytes of a partial frame right after them
    commit_ends: tuple = ()      # 1-based indexes of every commit frame among them

    def frame_offset(self, i: int) -> int:
        """Byte offset of frame ``i`` (1-based) in the file."""
        return HEADER + (i - 1) * (FRAME_HEADER + self.page_size)


def scan(wal_path: Path) -> WalScan | None:
    """Frame headers of a WAL file; None when there is no (valid-headed) WAL."""
    p = Path(wal_path)
    try:
        with open(p, "rb") as f:
            head = f.read(HEADER)
            if len(head) < HEADER:
                return None
            magic, _version, page_size, _ckpt, salt1, salt2, _c1, _c2 = struct.unpack(">8I", head)
            if magic not in WAL_MAGIC or page_size < 512 or page_size & (page_size - 1):
                return None
            out = WalScan(page_size=page_size)
            commits = []
            step = FRAME_HEADER + page_size
            size = p.stat().st_size
            pos = HEADER
            while pos + FRAME_HEADER <= size:
                f.seek(pos)
                fh = f.read(FRAME_HEADER)
                pgno, db_size, s1, s2, _c1, _c2 = struct.unpack(">6I", fh)
                if (s1, s2) != (salt1, salt2) or pgno == 0:
                    break  # frames of an earlier generation of the log (or garbage)
                if pos + step > size:
                    out.torn_bytes = size - pos
                    break
                out.frames += 1
                if db_size:
                    commits.append(out.frames)
                pos += step
            out.last_commit = commits[-1] if commits else 0
            out.commit_ends = tuple(commits)
            return out
    except OSError:
        return None


@dataclass
class WalReport:
    accepted_frames: int         # frames SQLite kept
    uncommitted_frames: int      # after the last commit frame
    rejected_frames: int         # up to the last commit frame, refused by SQLite (corruption)
    torn_bytes: int

    @property
    def clean(self) -> bool:
        return not (self.uncommitted_frames or self.rejected_frames or self.torn_bytes)


def diagnose(before: WalScan | None, accepted_frames: int) -> WalReport | None:
    """Compare the scan taken before SQLite opened the log with the frames it accepted."""
    if before is None:
        return None
    rejected = max(0, before.last_commit - accepted_frames)
    uncommitted = before.frames - before.last_commit
    return WalReport(accepted_frames, uncommitted, rejected, before.torn_bytes)


def report(path: Path, rep: WalReport | None) -> None:
    """Log what a diagnosis found (nothing when the log is clean)."""
    if rep is None or rep.clean:
        return
    if rep.rejected_frames:
        logger.error("write-ahead log of %s is corrupt: %d frame(s) up to a commit failed their checksums "
                     "and were discarded with everything after them; the store serves its last intact "
                     "state (%d frames kept)", path, rep.rejected_frames, rep.accepted_frames)
    if rep.uncommitted_frames or rep.torn_bytes:
        logger.warning("write-ahead log of %s ended in an unfinished transaction (%d uncommitted frame(s), "
                       "%d torn byte(s)); it was never acknowledged and was discarded", path,
                       rep.uncommitted_frames, rep.torn_bytes)
