"""One shard of a collection: the point store, the index, the delta buffer and the indexer.

Write path (``upsert`` / ``delete``)::

    validate (collection) -> commit to SQLite (writer thread, durable) -> apply in memory in seq order
    (hide the old labels in the index, put new vectors into the delta) -> acknowledge

Read path (``search``): index search (hidden labels excluded) + exact search over the delta, merged.
An id is in at most one of them, so results never hold a stale or deleted point.

The indexer (one asyncio task per shard) moves delta rows into the index in time-sliced chunks on
the event-loop thread, trains faiss indexes once enough points exist, writes snapshots, and rebuilds
indexes whose hidden slots are not reused (faiss) once they are a quarter of the index.

Recovery (``open``): load the newest intact snapshot (seq S), then replay the point store's changes
after S. No snapshot: every point is replayed into the delta and indexed in the background.

Snapshots are serialised per shard: one write in flight at a time (an asyncio lock, plus a thread
lock around the file writes, which a cancelled caller cannot release early); a request that finds
one in flight waits for it and returns at once if that one covered every write applied when it was
asked, else it writes a fresh one. While a snapshot is saved the indexer adds nothing to the index.

Thread-safety: all methods must be called from the event-loop thread that opened the shard, except
:meth:`search_locked`, which the search pool calls (:mod:`retrieval.vectors.coalesce`). SQLite work
runs on the shard's own writer and reader threads, snapshot saves and rebuilds on worker threads.
``lock`` guards what a search reads (the index, the label map, the delta) against the event-loop
thread's changes to them; the loop holds it only for in-memory steps (at most one indexer slice).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import Cancelled, FailedPrecondition
from retrieval.indexes import registry
from retrieval.indexes.base import IndexSpec, QueryParams, VectorIndex
from retrieval.indexes.exact import knn
from retrieval.storage import snapshots
from retrieval.storage.points import PointStore
from retrieval.vectors import payload_index as pidx_mod
from retrieval.vectors.delta import NO_ID, Delta
from retrieval.vectors.results import empty_results, merge_topk, prepare_vectors
from retrieval.vectors.shard_filtered import FilteredSearch
from retrieval.vectors.shard_indexer import WRITES, Indexer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSettings:
    """Tuning shared by every shard (from the server settings)."""

    index_threads: int = 0              # threads for index adds and batch searches (0: all cores)
    synchronous: str = "FULL"           # SQLite durability: FULL (power-cut safe) or NORMAL (kill -9 safe)
    snapshot_every: int = 50_000        # snapshot after this many points written since the last one...
    snapshot_interval_s: float = 60.0   # ...or after this long with any write, once the index caught up
    filter_exact_threshold: int = 2048  # filters matching at most this many points are searched exactly
    filter_exact_in_memory: int = 32768  # ...and, over payload indexes (vectors in memory), this many
    search_threads: int = 0             # the search pool's threads (0: all cores)
    coalesce_max_queries: int = 256     # most queries one coalesced native search call answers (1: off)
    indexer_slice_ms: float = 20.0      # longest the indexer holds the event loop per chunk
    rebuild_hidden_fraction: float = 0.25
    write_priority_rows: int = 200_000  # the indexer yields to in-flight writes until the delta holds this many


PAYLOAD_INDEXES_FILE = "payload_indexes.json"  # in the collection folder: {"indexes": [{"key", "type"}]}


def read_payload_specs(collection_folder: Path) -> dict[str, str]:
    """The payload index definitions of a collection folder, ``{key: type}`` ({} without the file)."""
    try:
        d = json.loads((Path(collection_folder) / PAYLOAD_INDEXES_FILE).read_text())
    except FileNotFoundError:
        return {}
    return {e["key"]: e["type"] for e in d.get("indexes", [])}


class Shard(FilteredSearch, Indexer):
    """An in-process shard; also the local implementation of :class:`retrieval.vectors.handles.ShardHandle`.

    Filtered search and payload indexes are in :class:`~retrieval.vectors.shard_filtered.FilteredSearch`;
    the indexer, snapshots and rebuilds in :class:`~retrieval.vectors.shard_indexer.Indexer`."""

    is_local = True  # search() may be called synchronously on the event-loop thread

    def __init__(self, folder: Path, d: int, metric: str, spec: IndexSpec, settings: ShardSettings,
                 name: str = "") -> None:
        self.folder = Path(folder)
        self.d = d
        self.metric = metric                     # "l2", "ip" or "cosine"
        self.index_metric = "l2" if metric == "l2" else "ip"
        self.spec = spec
        self.settings = settings
        self.name = name
        self.store: PointStore | None = None
        self.index: VectorIndex | None = None
        self.delta = Delta(d)
        self.ext_of_lab = np.zeros(0, np.uint64)  # point id of each label (NO_ID: hidden)
        self.lab_of_ext: dict[int, int] = {}      # live labels only
        self.next_label = 0
        self.applied_seq = 0
        self.snapshot_seq = 0
        self.state = "opening"
        self._wexec = ThreadPoolExecutor(1, thread_name_prefix=f"w-{name}")
        self._rexec = ThreadPoolExecutor(1, thread_name_prefix=f"r-{name}")
        self._pending: dict[int, tuple] = {}
        self._paused = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._snapshot_write: asyncio.Future | None = None  # the snapshot write in progress
        self._snapshot_lock = asyncio.Lock()   # one snapshot() at a time (the event-loop side)
        self._snapshot_files = threading.Lock()  # one write_snapshot() at a time (the worker-thread side)
        self._written_since_snapshot = 0
        self._last_snapshot_t = time.monotonic()
        self._chunk = 256
        self.failed: str | None = None
        self.lock = threading.Lock()  # a search on a pool thread vs the loop's in-memory updates
        self.pidx = pidx_mod.PayloadIndexSet()  # payload indexes (event-loop thread only)

    # ------------------------------------------------------------------------------------------
    # Opening and recovery
    # ------------------------------------------------------------------------------------------
    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.store = await loop.run_in_executor(
            self._wexec, lambda: PointStore(self.folder / "points.sqlite", self.d, self.settings.synchronous))
        index, labels, seq = await loop.run_in_executor(None, self._load_snapshot)
        if index is None:
            index = registry.create(self.spec, self.d, self.index_metric, self.settings.index_threads)
        self._install(index, labels, seq)
        await self._replay(seq)
        # payload indexes: rebuilt from the point store (so they equal a rebuild after any crash)
        specs = read_payload_specs(self.folder.parent)
        if specs:
            _, self.pidx = await loop.run_in_executor(None, self._build_payload_index, specs)
        self.applied_seq = self.store.last_seq
        self.snapshot_seq = seq
        self.state = "ready"
        self._task = asyncio.create_task(self._indexer(), name=f"indexer-{self.name}")
        self._wake.set()

    def _load_snapshot(self):
        root = self.folder / "snapshots"
        snapshots.recover(root)
        for folder in snapshots.candidates(root):
            try:
                manifest = snapshots.verify(folder)
                if (manifest["kind"], manifest["d"], manifest["metric"]) != (self.spec.kind, self.d, self.index_metric):
                    raise ValueError(f"snapshot {folder} is for {manifest['kind']}/{manifest['d']}/{manifest['metric']}")
                if manifest["seq"] > self.store.last_seq:
                    raise ValueError(f"snapshot {folder} claims seq {manifest['seq']} beyond the store's {self.store.last_seq}")
                index = registry.load(self.spec, folder, self.d, self.index_metric, self.settings.index_threads)
                labels = np.load(folder / "labels.npy")
                logger.info("shard %s: loaded snapshot seq %d (%d labels)", self.name, manifest["seq"], len(labels))
                return index, labels, int(manifest["seq"])
            except Exception as e:  # corrupt, truncated or foreign: fall back to an older one or a rebuild
                logger.error("shard %s: skipping snapshot %s: %s", self.name, folder, e)
        return None, np.zeros(0, np.uint64), 0

    def _install(self, index: VectorIndex, labels: np.ndarray, seq: int) -> None:
        """Make ``index`` (with its label map) the live index and empty the delta."""
        ext_of_lab = labels.astype(np.uint64, copy=True)
        live = np.flatnonzero(ext_of_lab != NO_ID)
        lab_of_ext = dict(zip(ext_of_lab[live].tolist(), live.tolist()))
        with self.lock:
            self.index = index
            self.ext_of_lab, self.lab_of_ext = ext_of_lab, lab_of_ext
            self.next_label = len(labels)
            self.delta = Delta(self.d)

    async def _replay(self, seq: int) -> None:
        """Apply every write after ``seq`` from the point store (idempotent)."""
        loop = asyncio.get_running_loop()
        it = self.store.changes_since(seq)
        while True:
            block = await loop.run_in_executor(self._rexec, next, it, None)
            if block is None:
                break
            kind, ids, vecs, seqs = block
            # payload indexes are built from the store after the replay at open, and a rebuild leaves
            # them as they are (they do not depend on the vector index): only the labels are dropped
            if kind == "delete":
                self._apply_delete(ids, replay=True)
            else:
                self._apply_upsert(ids, self.prepare(vecs), seqs, replay=True)

    # ------------------------------------------------------------------------------------------
    # In-memory application of committed writes (event-loop thread, in seq order)
    # ------------------------------------------------------------------------------------------
    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Stored vectors -> index-ready vectors (L2-normalised for cosine)."""
        return prepare_vectors(x, self.metric)

    def _hide(self, ids: np.ndarray) -> None:
        """Remove ``ids`` from the index (caller holds ``lock``)."""
        if not self.lab_of_ext:
            return
        pop = self.lab_of_ext.pop
        labs = [lab for lab in (pop(i, -1) for i in ids.tolist()) if lab >= 0]
        if labs:
            arr = np.asarray(labs, np.int64)
            self.index.remove(arr)
            self.ext_of_lab[arr] = NO_ID

    def _apply_upsert(self, ids: np.ndarray, xv: np.ndarray, seqs, payloads: list[str | None] | None = None,
                      replay: bool = False) -> None:
        if replay:
            self.pidx.unlabel(ids)
        else:
            self.pidx.upsert(ids, payloads, xv)
        with self.lock:
            self._hide(ids)
            self.delta.put(ids, xv, seqs)
        self._written_since_snapshot += len(ids)

    def _apply_delete(self, ids: np.ndarray, replay: bool = False) -> None:
        if replay:
            self.pidx.unlabel(ids)
        else:
            self.pidx.delete(ids)
        with self.lock:
            self._hide(ids)
            self.delta.drop(ids)
        self._written_since_snapshot += len(ids)

    def _drain(self) -> None:
        applied = False
        while not self._paused and (self.applied_seq + 1) in self._pending:
            seq = self.applied_seq + 1
            apply, fut = self._pending.pop(seq)
            try:
                apply(seq)
            except Exception as e:  # committed but not applied: serve from a rebuild rather than wrong data
                logger.exception("shard %s: applying write %d failed", self.name, seq)
                self.failed = f"applying write {seq} failed: {e}"
                if not fut.done():
                    fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(None)
            self.applied_seq = seq
            applied = True
        if applied:
            self._wake.set()

    async def _commit(self, commit, make_apply):
        """Run ``commit`` on the writer thread -> (seq, result); then apply in order and return result."""
        self._check_open()
        loop = asyncio.get_running_loop()
        WRITES.in_flight += 1
        WRITES.last = time.monotonic()
        try:
            seq, result = await loop.run_in_executor(self._wexec, commit)
            if seq == 0:
                return result
            fut = loop.create_future()
            self._pending[seq] = (make_apply(result), fut)
            self._drain()
            await fut
            return result
        finally:
            WRITES.in_flight -= 1

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"collection shard {self.name} is closed")
        if self.state == "opening":
            raise FailedPrecondition(f"collection shard {self.name} is still opening")

    # ------------------------------------------------------------------------------------------
    # Writes
    # ------------------------------------------------------------------------------------------
    async def upsert(self, ids: np.ndarray, vectors: np.ndarray, payloads: list[str | None] | None) -> int:
        """Durably upsert validated points; returns the batch's seq."""
        xv = self.prepare(vectors)

        def commit():
            seq = self.store.upsert(ids, vectors, payloads)
            return seq, seq

        return await self._commit(commit, lambda seq: lambda s: self._apply_upsert(ids, xv, s, payloads))

    async def delete(self, ids: np.ndarray | None = None, where: tuple[str, list] | None = None) -> int:
        """Durably delete by ids or by filter SQL; returns the number of points deleted."""

        def commit():
            seq, deleted = self.store.delete(ids=ids, where=where)
            return seq, deleted

        deleted = await self._commit(commit, lambda dl: lambda s: self._apply_delete(dl))
        return len(deleted)

    # ------------------------------------------------------------------------------------------
    # Reads
    # ------------------------------------------------------------------------------------------
    def search(self, xq: np.ndarray, k: int, params: QueryParams) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of index-ready ``xq`` (nq, d) -> (D float32 (nq, k), ids uint64 (nq, k), NO_ID padded)."""
        self._check_open()
        if params.exact:
            return self._exact_all(xq, k)
        if self.index.is_trained():
            D, L = self.index.search(xq, k, params)
            I = np.where(L >= 0, self.ext_of_lab[np.maximum(L, 0)] if len(self.ext_of_lab) else NO_ID, NO_ID)
        else:
            D, I = empty_results(len(xq), k)
        if len(self.delta):
            D2, I2 = self.delta.search(xq, k, self.index_metric)
            D, I = merge_topk(D, I, D2, I2, k)
        return D, I

    def search_locked(self, xq: np.ndarray, k: int, params: QueryParams) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` from any thread (the search pool): holds ``lock`` while it reads."""
        with self.lock:
            return self.search(xq, k, params)

    async def asearch(self, xq: np.ndarray, k: int, params: QueryParams) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` for callers that treat every shard handle alike (Ray shards are remote)."""
        return self.search(xq, k, params)

    def _live_labels(self) -> np.ndarray:
        return np.flatnonzero(self.ext_of_lab[: self.next_label] != NO_ID).astype(np.int64)

    def _exact_all(self, xq: np.ndarray, k: int):
        labels = self._live_labels()
        if len(labels):
            xb = self.index.get_vectors(labels)
            D, R = knn(xq, xb, k, self.index_metric)
            I = np.where(R >= 0, self.ext_of_lab[labels[np.maximum(R, 0)]], NO_ID)
        else:
            D, I = empty_results(len(xq), k)
        if len(self.delta):
            D2, I2 = self.delta.search(xq, k, self.index_metric)
            D, I = merge_topk(D, I, D2, I2, k)
        return D, I

    async def read(self, fn):
        """Run ``fn(store)`` on the reader thread (get, count, scroll, payloads)."""
        self._check_open()
        return await self._on_reader(fn, self.store)

    async def _on_reader(self, fn, *args):
        """Run ``fn(*args)`` on the reader thread; if the calling task is cancelled (client gone,
        deadline passed) a job not started yet is skipped and a running SQLite query is interrupted."""
        self._check_open()  # a call that resumes after close() began must not reach the closed store
        token = threading.Event()
        store = self.store

        def job():
            if token.is_set():
                raise Cancelled("the call was cancelled before its read started")
            store.cancel_token = token
            try:
                return fn(*args)
            finally:
                store.cancel_token = None

        fut = asyncio.get_running_loop().run_in_executor(self._rexec, job)
        try:
            return await fut
        except asyncio.CancelledError:
            token.set()
            raise

    # ------------------------------------------------------------------------------------------
    # Introspection and shutdown
    # ------------------------------------------------------------------------------------------
    def info(self) -> dict:
        st = self.index.stats() if self.index is not None else None
        return {
            "indexed": st.live if st else 0,
            "pending": len(self.delta),
            "deleted_in_index": st.hidden if st else 0,
            "last_seq": self.applied_seq,
            "snapshot_seq": self.snapshot_seq,
            "memory_bytes": (st.memory_bytes if st else 0) + self.delta.memory_bytes() + self.ext_of_lab.nbytes
            + 100 * len(self.lab_of_ext) + self.pidx.memory_bytes(),
            "state": "failed" if self.failed else self.state,
            "location": "local",
            "payload_indexes": self.pidx.info(),
        }

    async def ainfo(self) -> dict:
        """:meth:`info` for callers that treat every shard handle alike."""
        return self.info()

    async def wait_indexed(self, timeout: float) -> bool:
        """Wait until the delta is empty (or the index is untrained and waiting for points)."""
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if not len(self.delta) or self.state == "untrained":
                return True
            await asyncio.sleep(0.01)
        return False

    async def close(self, snapshot: bool = True) -> None:
        """Stop the indexer, write a final snapshot (when useful) and close the point store."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._snapshot_write is not None and not self._snapshot_write.done():
            try:  # a snapshot the cancelled indexer was writing
                await self._snapshot_write
            except Exception:
                pass
        if snapshot and self.index is not None and self.store is not None:
            try:
                await self._maybe_snapshot(force=True)
            except Exception:
                logger.exception("shard %s: final snapshot failed (the point store is intact)", self.name)
        loop = asyncio.get_running_loop()
        # Reads already queued finish before the store closes: closing an SQLite connection while
        # another thread steps a statement on it is not safe.
        await loop.run_in_executor(None, self._rexec.shutdown, True)
        if self.store is not None:
            await loop.run_in_executor(self._wexec, self.store.checkpoint)
            await loop.run_in_executor(self._wexec, self.store.close)
        await loop.run_in_executor(None, self._wexec.shutdown, True)

    def destroy_files(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
