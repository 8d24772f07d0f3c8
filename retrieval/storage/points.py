"""The system of record for one shard's points: SQLite in WAL mode.

Schema (one database file per shard)::

    points(id INTEGER PRIMARY KEY, vector BLOB, payload TEXT, seq INTEGER)   -- live points
    tombstones(id INTEGER PRIMARY KEY, seq INTEGER)                        -- deletes not yet in a snapshot
    meta(key TEXT PRIMARY KEY, value)                                      -- last_seq, ...

* ``id`` is the uint64 point id mapped order-preservingly to SQLite's signed 64 bits
  (``key = id - 2**63``), so ``ORDER BY id`` is uint64 order.
* ``vector`` is the original float32 vector, little-endian, ``d * 4`` bytes.
* ``payload`` is a compact JSON object or NULL.
* ``seq`` is the write sequence number of the batch that last wrote the row. Every committed batch
  (upsert or delete) takes the next ``seq``; ``meta.last_seq`` is updated in the same transaction.
  An index snapshot records the ``seq`` it includes; recovery replays the rows and tombstones with a
  larger ``seq`` (:meth:`PointStore.changes_since`).

Durability: ``synchronous=FULL`` (default) fsyncs the WAL on every commit, so an acknowledged write
survives a power cut; ``NORMAL`` survives a ``kill -9`` of the process but not a power cut.

Thread-safety: a PointStore owns two connections, one for writes and one for reads; each must be
used by one thread at a time (the shard runs each on its own single-thread executor). WAL lets the
reader run concurrently with the writer and see only committed data.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from retrieval.core.faults import is_disk_full
from retrieval.errors import Cancelled, InvalidArgument, ResourceExhausted, Unavailable
from retrieval.storage import wal

logger = logging.getLogger(__name__)

SIGN = np.uint64(1 << 63)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (id INTEGER PRIMARY KEY, vector BLOB NOT NULL, payload TEXT, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS points_seq ON points(seq);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones(seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
INSERT OR IGNORE INTO meta(key, value) VALUES ('last_seq', 0);
"""


def to_keys(ids: np.ndarray) -> np.ndarray:
    """uint64 ids -> int64 SQLite keys (order preserving)."""
    return (np.asarray(ids, dtype=np.uint64) ^ SIGN).view(np.int64)


def from_keys(keys) -> np.ndarray:
    """int64 SQLite keys -> uint64 ids."""
    return np.asarray(keys, dtype=np.int64).view(np.uint64) ^ SIGN


def _translate(e: sqlite3.Error) -> Exception:
    msg = str(e)
    if is_disk_full(e):
        return ResourceExhausted("the disk holding the data folder is full; the write was not stored")
    if isinstance(e, sqlite3.OperationalError) and ("disk I/O error" in msg or "unable to open" in msg):
        return Unavailable(f"storage error, the write was not stored: {msg}")
    if isinstance(e, sqlite3.OperationalError) and msg == "interrupted":
        return Cancelled("the call was cancelled (client gone or deadline passed) while reading the store")
    return e


class PointStore:
    """SQLite-backed points of one shard. See the module docstring for the format."""

    def __init__(self, path: Path, dim: int, synchronous: str = "FULL", inspect_wal: bool = True) -> None:
        self.path = Path(path)
        self.dim = dim
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise InvalidArgument(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        wal_before = wal.scan(Path(f"{self.path}-wal")) if inspect_wal else None
        self._w = self._connect(synchronous)
        if wal_before is not None:  # before any write: report a torn or corrupt log tail SQLite dropped
            self.wal_report = wal.diagnose(wal_before, int(self._w.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]))
            wal.report(self.path, self.wal_report)
        else:
            self.wal_report = None
        self._w.executescript(_SCHEMA)
        self._r = self._connect(synchronous)
        # Reads of a cancelled call stop: the shard sets `cancel_token` around each reader job.
        self.cancel_token = None
        self._r.set_progress_handler(self._should_interrupt, 10_000)
        self.last_seq = int(self._w.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0])
        self._tombstones = int(self._w.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0])

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={synchronous.upper()}")
        con.execute("PRAGMA temp_store=MEMORY")
        con.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache
        return con

    def _should_interrupt(self) -> int:
        t = self.cancel_token
        return 1 if t is not None and t.is_set() else 0

    def close(self) -> None:
        for con in (self._r, self._w):
            try:
                con.close()
            except sqlite3.Error:  # already closed
                pass

    # ------------------------------------------------------------------------------------------
    # Writes (writer thread)
    # ------------------------------------------------------------------------------------------
    def upsert(self, ids: np.ndarray, vectors: np.ndarray, payloads: list[str | None] | None) -> int:
        """Insert or replace points in one transaction; returns the batch's ``seq``.

        ``ids`` uint64 (n,), unique; ``vectors`` float32 (n, d); ``payloads`` compact JSON or None.
        """
        seq = self.last_seq + 1
        keys = to_keys(ids).tolist()
        vecs = np.ascontiguousarray(vectors, dtype="<f4")
        rows = vecs.view(np.dtype((np.void, vecs.shape[1] * 4))).ravel() if len(vecs) else []
        pls = payloads if payloads is not None else [None] * len(keys)
        con = self._w
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany(
                    "INSERT OR REPLACE INTO points(id, vector, payload, seq) VALUES (?, ?, ?, ?)",
                    zip(keys, (bytes(r) for r in rows), pls, [seq] * len(keys)),
                )
                if self._tombstones:
                    con.executemany("DELETE FROM tombstones WHERE id = ?", ((k,) for k in keys))
                con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:  # SQLite may have rolled back already (e.g. on a full disk)
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise _translate(e) from e
        self.last_seq = seq
        if self._tombstones:
            self._tombstones = int(con.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0])
        return seq

    def delete(self, ids: np.ndarray | None = None, where: tuple[str, list] | None = None) -> tuple[int, np.ndarray]:
        """Delete by ids or by a filter's SQL; returns ``(seq, deleted ids)``. ``seq`` is 0 when
        nothing was deleted (no write happened)."""
        con = self._w
        seq = self.last_seq + 1
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                if ids is not None:
                    keys = to_keys(ids).tolist()
                    deleted: list[int] = []
                    for i in range(0, len(keys), 500):
                        chunk = keys[i : i + 500]
                        q = f"DELETE FROM points WHERE id IN ({','.join('?' * len(chunk))}) RETURNING id"
                        deleted.extend(r[0] for r in con.execute(q, chunk))
                else:
                    sql, params = where
                    deleted = [r[0] for r in con.execute(f"DELETE FROM points WHERE {sql} RETURNING id", params)]
                if not deleted:
                    con.execute("ROLLBACK")
                    return 0, np.zeros(0, np.uint64)
                con.executemany("INSERT OR REPLACE INTO tombstones(id, seq) VALUES (?, ?)", ((k, seq) for k in deleted))
                con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise _translate(e) from e
        self.last_seq = seq
        self._tombstones += len(deleted)
        return seq, from_keys(deleted)

    def purge_tombstones(self, upto_seq: int) -> None:
        """Forget deletes that a durable snapshot (including ``upto_seq``) already reflects."""
        try:
            self._w.execute("DELETE FROM tombstones WHERE seq <= ?", (upto_seq,))
        except sqlite3.Error as e:
            logger.warning("could not purge tombstones of %s: %s", self.path, e)
            return
        self._tombstones = int(self._w.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0])

    def checkpoint(self) -> None:
        """Fold the WAL back into the database file (on snapshot and shutdown)."""
        try:
            self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            logger.warning("WAL checkpoint of %s failed: %s", self.path, e)

    # ------------------------------------------------------------------------------------------
    # Reads (reader thread)
    # ------------------------------------------------------------------------------------------
    def _decode(self, rows, with_vectors: bool, with_payloads: bool):
        ids = from_keys([r[0] for r in rows]) if rows else np.zeros(0, np.uint64)
        vecs = None
        if with_vectors:
            vecs = (np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
                    if rows else np.zeros((0, self.dim), np.float32))
        pls = [r[2] for r in rows] if with_payloads else None
        return ids, vecs, pls

    def get(self, ids: np.ndarray, with_vectors: bool, with_payloads: bool):
        """Points with these ids, in id order; missing ids are omitted. Returns (ids, vectors|None, payloads|None)."""
        keys = sorted(set(to_keys(ids).tolist()))
        rows: list = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows.extend(self._r.execute(
                f"SELECT id, {'vector' if with_vectors else 'NULL'}, {'payload' if with_payloads else 'NULL'} "
                f"FROM points WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY id", chunk))
        rows.sort(key=lambda r: r[0])
        return self._decode(rows, with_vectors, with_payloads)

    def payloads_of(self, ids: np.ndarray) -> dict[int, str | None]:
        """``{id: payload}`` for the ids that exist."""
        got, _, pls = self.get(ids, False, True)
        return dict(zip(got.tolist(), pls))

    def count(self, where: tuple[str, list] | None = None) -> int:
        if where is None:
            return int(self._r.execute("SELECT COUNT(*) FROM points").fetchone()[0])
        sql, params = where
        return int(self._r.execute(f"SELECT COUNT(*) FROM points WHERE {sql}", params).fetchone()[0])

    def scroll(self, start_id: int, limit: int, where: tuple[str, list] | None, with_vectors: bool, with_payloads: bool):
        """Up to ``limit`` points with id >= ``start_id`` in id order."""
        key = int(to_keys(np.array([start_id], np.uint64))[0])
        cond, params = where if where is not None else ("1", [])
        rows = self._r.execute(
            f"SELECT id, {'vector' if with_vectors else 'NULL'}, {'payload' if with_payloads else 'NULL'} "
            f"FROM points WHERE id >= ? AND {cond} ORDER BY id LIMIT ?", [key, *params, limit]).fetchall()
        return self._decode(rows, with_vectors, with_payloads)

    def match(self, where: tuple[str, list], limit: int | None = None, with_vectors: bool = False):
        """Ids (and vectors) of the points matching a filter, up to ``limit`` rows."""
        sql, params = where
        q = f"SELECT id, {'vector' if with_vectors else 'NULL'}, NULL FROM points WHERE {sql}"
        if limit is not None:
            q += " LIMIT ?"
            params = [*params, limit]
        rows = self._r.execute(q, params).fetchall()
        ids, vecs, _ = self._decode(rows, with_vectors, False)
        return ids, vecs

    def iter_points(self, block: int = 65536, max_seq: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All points (optionally only those with seq <= max_seq) in blocks of (ids, vectors)."""
        last, op = -(2**63), ">="
        while True:
            if max_seq is None:
                rows = self._r.execute(f"SELECT id, vector, NULL FROM points WHERE id {op} ? ORDER BY id LIMIT ?",
                                       (last, block)).fetchall()
            else:
                rows = self._r.execute(
                    f"SELECT id, vector, NULL FROM points WHERE id {op} ? AND seq <= ? ORDER BY id LIMIT ?",
                    (last, max_seq, block)).fetchall()
            op = ">"
            if not rows:
                return
            last = rows[-1][0]
            ids, vecs, _ = self._decode(rows, True, False)
            yield ids, vecs

    def changes_since(self, seq: int, block: int = 65536, with_payloads: bool = False) -> Iterator[tuple]:
        """Writes after ``seq``: yields ("upsert", ids, vectors, seqs) and ("delete", ids, None, seqs)
        blocks, ``seqs`` int64 per row (with ``with_payloads``, a fifth item: the payloads of the
        upserted rows, None for deletes). Each id appears once with its latest state, so the order of
        application is free."""
        rows = self._r.execute("SELECT id, seq FROM tombstones WHERE seq > ?", (seq,)).fetchall()
        if rows:
            out = ("delete", from_keys([r[0] for r in rows]), None, np.array([r[1] for r in rows], np.int64))
            yield (*out, None) if with_payloads else out
        last, op = -(2**63), ">="
        while True:
            rows = self._r.execute(
                f"SELECT id, vector, seq, {'payload' if with_payloads else 'NULL'} FROM points "
                f"WHERE seq > ? AND id {op} ? ORDER BY id LIMIT ?", (seq, last, block)
            ).fetchall()
            op = ">"
            if not rows:
                return
            last = rows[-1][0]
            ids, vecs, _ = self._decode([(r[0], r[1], None) for r in rows], True, False)
            out = ("upsert", ids, vecs, np.array([r[2] for r in rows], np.int64))
            yield (*out, [r[3] for r in rows]) if with_payloads else out


def scan_payloads(path: Path, block: int = 65536, dim: int = 0) -> tuple[int, list[tuple]]:
    """Every point's id and payload, read in one transaction on a separate read-only connection (for
    building payload indexes on a worker thread): ``(last_seq the read saw, [(ids, payloads), ...])``;
    with ``dim``, also the vectors: ``[(ids, payloads, vectors (n, dim) float32), ...]``."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False,
                          timeout=30)
    try:
        con.execute("BEGIN")
        seq = int(con.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0])
        out = []
        last, op = -(2**63), ">="
        while True:
            rows = con.execute(f"SELECT id, payload{', vector' if dim else ''} FROM points WHERE id {op} ? "
                               "ORDER BY id LIMIT ?", (last, block)).fetchall()
            op = ">"
            if not rows:
                break
            last = rows[-1][0]
            part = (from_keys([r[0] for r in rows]), [r[1] for r in rows])
            if dim:
                part += (np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), dim),)
            out.append(part)
        con.execute("COMMIT")
        return seq, out
    finally:
        con.close()
