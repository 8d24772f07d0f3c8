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
import dataclasses
import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.core.faults import is_disk_full
from retrieval.errors import Cancelled, FailedPrecondition
from retrieval.indexes import registry
from retrieval.indexes.base import IndexSpec, QueryParams, VectorIndex
from retrieval.indexes.exact import knn
from retrieval.storage import snapshots
from retrieval.storage.points import PointStore, scan_payloads
from retrieval.vectors import filters as flt
from retrieval.vectors import payload_index as pidx_mod
from retrieval.vectors.delta import NO_ID, Delta

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


class _WriteActivity:
    """Process-wide: writes in flight and when the last one started. Indexers of every shard yield to
    writes of any shard, since they compete for the same CPU cores."""

    in_flight = 0
    last = 0.0


WRITES = _WriteActivity()
DISK_FULL_BACKOFF_S = 5.0


def prepare_vectors(x: np.ndarray, metric: str) -> np.ndarray:
    """Stored vectors (n, d) float32 -> index-ready vectors: L2-normalised rows for ``"cosine"``, else ``x``."""
    if metric != "cosine":
        return x
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_snapshot(root: Path, index: VectorIndex, labels: np.ndarray, seq: int, spec: IndexSpec, d: int,
                   index_metric: str) -> Path:
    """Save ``index`` with its label map (uint64 point id per label, NO_ID for hidden labels) as the
    snapshot of write ``seq`` under ``root`` (``<shard>/snapshots``), atomically; older snapshots are
    removed once the new one is in place. Returns the snapshot folder. Used by the shard and by the
    offline builder (``index_builder``), so both write one format."""
    meta = {"kind": spec.kind, "d": d, "metric": index_metric, "spec": registry.spec_to_dict(spec),
            "labels": int(len(labels))}
    tmp = snapshots.begin(root)
    try:
        files = index.save(tmp)
        np.save(tmp / "labels.npy", np.asarray(labels, np.uint64))
        final = snapshots.commit(root, tmp, seq, meta, [*files, "labels.npy"])
    except BaseException:
        snapshots.abort(tmp)
        raise
    snapshots.cleanup(root, final)
    return final


PAYLOAD_INDEXES_FILE = "payload_indexes.json"  # in the collection folder: {"indexes": [{"key", "type"}]}


def read_payload_specs(collection_folder: Path) -> dict[str, str]:
    """The payload index definitions of a collection folder, ``{key: type}`` ({} without the file)."""
    try:
        d = json.loads((Path(collection_folder) / PAYLOAD_INDEXES_FILE).read_text())
    except FileNotFoundError:
        return {}
    return {e["key"]: e["type"] for e in d.get("indexes", [])}


def merge_topk(D1: np.ndarray, I1: np.ndarray, D2: np.ndarray, I2: np.ndarray, k: int):
    """Merge two (nq, *) result sets into the k nearest per row (ties keep the first set first)."""
    D = np.hstack([D1, D2])
    I = np.hstack([I1, I2])
    order = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


class Shard:
    """An in-process shard; also the local implementation of :class:`retrieval.vectors.handles.ShardHandle`."""

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
            D = np.full((len(xq), k), np.inf, np.float32)
            I = np.full((len(xq), k), NO_ID, np.uint64)
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
            D = np.full((len(xq), k), np.inf, np.float32)
            I = np.full((len(xq), k), NO_ID, np.uint64)
        if len(self.delta):
            D2, I2 = self.delta.search(xq, k, self.index_metric)
            D, I = merge_topk(D, I, D2, I2, k)
        return D, I

    async def search_filtered(self, xq: np.ndarray, k: int, params: QueryParams, where: tuple[str, list]):
        """k-NN among the points matching a filter: from the payload indexes when they answer it
        exactly (``where`` is a :class:`filters.SqlWhere` carrying the filter; see
        :mod:`retrieval.vectors.payload_index`), else by SQL over the payloads."""
        self._check_open()
        f = getattr(where, "filter", None)
        if f is not None and self.pidx.columns:
            mask = self.pidx.evaluate(f)
            if mask is not None:
                return await self._search_matching(xq, k, params, np.flatnonzero(mask))
            dk = self.pidx.datetime_keys()
            if dk and self.pidx.touches(f, dk):  # range conditions on datetime keys also read timestamps
                where = flt.to_sql(f, datetime_keys=dk)
        thr = self.settings.filter_exact_threshold
        ids, vecs = await self._on_reader(lambda: self.store.match(where, thr + 1, True))
        if len(ids) <= thr or params.exact:
            if params.exact and len(ids) > thr:
                ids, vecs = await self._on_reader(lambda: self.store.match(where, None, True))
            return self._exact_over(xq, k, ids, vecs)
        ids, _ = await self._on_reader(lambda: self.store.match(where, None, False))
        allowed = np.zeros(self.next_label, bool)
        labs = [lab for lab in map(self.lab_of_ext.get, ids.tolist()) if lab is not None]
        allowed[np.asarray(labs, np.int64)] = True
        if self.index.is_trained() and labs:
            D, L = self.index.search(xq, k, params, allowed)
            I = np.where(L >= 0, self.ext_of_lab[np.maximum(L, 0)], NO_ID)
        else:
            D = np.full((len(xq), k), np.inf, np.float32)
            I = np.full((len(xq), k), NO_ID, np.uint64)
        if len(self.delta):
            D2, I2 = self.delta.search(xq, k, self.index_metric, allowed_ids=ids)
            D, I = merge_topk(D, I, D2, I2, k)
        # A graph search may strand a query among too few allowed points: redo those rows exactly.
        short = np.flatnonzero((I != NO_ID).sum(1) < min(k, len(ids)))
        if len(short):
            got, vecs, _ = await self._on_reader(lambda: self.store.get(ids, True, False))
            D[short], I[short] = self._exact_over(xq[short], k, got, vecs)
        return D, I

    async def _search_matching(self, xq: np.ndarray, k: int, params: QueryParams, slots: np.ndarray):
        """k-NN among the points in payload-index ``slots`` (the matches of a filter), as planned by
        :func:`payload_index.plan_filtered`: exact over the matches when few, else the vector index
        with an allowed-label mask (and a wider beam when the selectivity is low)."""
        p = self.pidx
        nq = len(xq)
        D = np.full((nq, k), np.inf, np.float32)
        I = np.full((nq, k), NO_ID, np.uint64)
        thr = self.settings.filter_exact_threshold
        if p.vec is not None:
            thr = max(thr, self.settings.filter_exact_in_memory)
        plan = pidx_mod.plan_filtered(len(slots), p.count_live(), k, thr, params.ef, params.exact)
        if plan.kind == "none":
            return D, I
        if plan.kind == "exact" and p.vec is not None:  # every matching point's vector is in memory
            return p.exact_knn(xq, slots, k, self.index_metric)
        p.sync_labels(self.index, self.ext_of_lab, self.next_label)
        ext = p.ext_of_slot[slots]
        labs = p.lab[slots]
        in_idx = labs >= 0
        if len(self.delta) and not in_idx.all():  # points not indexed yet are in the delta
            D, I = self.delta.search(xq, k, self.index_metric, allowed_ids=ext[~in_idx])
        li = labs[in_idx]
        if plan.kind == "exact":
            if len(li):
                if self.spec.kind in ("hnsw", "exact"):  # these keep the exact (index-ready) vectors
                    D2, R = knn(xq, self.index.get_vectors(li), k, self.index_metric)
                    ei = ext[in_idx]
                    I2 = np.where(R >= 0, ei[np.maximum(R, 0)], NO_ID)
                else:  # lossy codes (PQ, SQ): the original vectors from the store
                    got, vecs, _ = await self._on_reader(lambda: self.store.get(ext[in_idx], True, False))
                    D2, I2 = self._exact_over(xq, k, got, vecs)
                D, I = merge_topk(D, I, D2, I2, k)
            return D, I
        if len(li) and self.index.is_trained():
            allowed = np.zeros(self.next_label, bool)
            allowed[li] = True
            D2, L = self.index.search(xq, k, dataclasses.replace(params, ef=plan.ef), allowed)
            I2 = np.where(L >= 0, self.ext_of_lab[np.maximum(L, 0)], NO_ID)
            D, I = merge_topk(D, I, D2, I2, k)
        # A graph search may strand a query among too few allowed points: redo those rows exactly.
        short = np.flatnonzero((I != NO_ID).sum(1) < min(k, len(ext)))
        if len(short):
            got, vecs, _ = await self._on_reader(lambda: self.store.get(ext, True, False))
            D[short], I[short] = self._exact_over(xq[short], k, got, vecs)
        return D, I

    # ------------------------------------------------------------------------------------------
    # Payload indexes (definitions are the collection's; contents derive from the point store)
    # ------------------------------------------------------------------------------------------
    def _build_payload_index(self, specs: dict[str, str]):
        """Worker thread: ``(seq, PayloadIndexSet)`` of every stored point as of write ``seq``."""
        t0 = time.perf_counter()
        seq, rows = scan_payloads(self.store.path, dim=self.d)
        pset = pidx_mod.scan_build(specs, rows, self.d, self.prepare)
        logger.info("shard %s: built payload indexes %s over %d points in %.2f s", self.name, sorted(specs),
                    pset.count_live(), time.perf_counter() - t0)
        return seq, pset

    async def set_payload_indexes(self, specs: dict[str, str]) -> None:
        """Make the payload indexes exactly ``specs`` (``{key: type}``). Dropped keys go at once; new
        ones are built from the point store on a worker thread while writes go on, then the writes
        applied meanwhile are caught up from the store (in-memory application paused) and the new
        set replaces the old one."""
        self._check_open()
        cur = self.pidx.specs()
        if all(cur.get(key) == t for key, t in specs.items()):
            for key in set(cur) - set(specs):
                self.pidx.drop(key)
            if not self.pidx.columns:
                self.pidx = pidx_mod.PayloadIndexSet()
            return
        loop = asyncio.get_running_loop()
        seq, pset = await loop.run_in_executor(None, self._build_payload_index, dict(specs))
        self._paused = True
        try:
            it = self.store.changes_since(seq, with_payloads=True)
            while True:
                block = await self._on_reader(next, it, None)
                if block is None:
                    break
                kind, ids, vecs, _, pls = block
                if kind == "delete":
                    pset.delete(ids)
                else:
                    pset.upsert(ids, pls, self.prepare(vecs))
            self.pidx = pset
        finally:
            self._paused = False
            self._drain()

    def payload_index_info(self) -> list[dict]:
        """``[{"key", "type", "points"}]``: points = live points with at least one indexed value."""
        return self.pidx.info()

    def _exact_over(self, xq, k, ids: np.ndarray, vecs: np.ndarray):
        if len(ids) == 0:
            return np.full((len(xq), k), np.inf, np.float32), np.full((len(xq), k), NO_ID, np.uint64)
        D, R = knn(xq, self.prepare(vecs), k, self.index_metric)
        return D, np.where(R >= 0, ids[np.maximum(R, 0)], NO_ID)

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
    # The indexer
    # ------------------------------------------------------------------------------------------
    async def _indexer(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(1.0, self.settings.snapshot_interval_s / 4))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._closed:
                return
            try:
                await self._index_pending()
                await self._maybe_rebuild()
                await self._maybe_snapshot()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if is_disk_full(e):  # snapshots cannot be written; the store and searches are unaffected
                    logger.warning("shard %s: disk full, index snapshot not written; retrying in %.0f s",
                                   self.name, DISK_FULL_BACKOFF_S)
                    await asyncio.sleep(DISK_FULL_BACKOFF_S)
                    continue
                logger.exception("shard %s: indexer step failed; retrying in 1 s", self.name)
                await asyncio.sleep(1.0)

    async def _index_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while len(self.delta) and not self._closed:
            if not self.index.is_trained():
                need = self.index.train_size()
                if len(self.delta) < need:
                    self.state = "untrained"
                    return
                self.state = "training"
                _, xt, _ = self.delta.live_arrays()
                rng = np.random.default_rng(0)
                if len(xt) > 4 * need:
                    xt = xt[rng.choice(len(xt), 4 * need, replace=False)]
                await loop.run_in_executor(None, self.index.train, xt)
                logger.info("shard %s: trained %s on %d points", self.name, self.spec.kind, len(xt))
            self.state = "indexing"
            if self._snapshot_lock.locked():  # an explicit snapshot is saving the index: add nothing meanwhile
                async with self._snapshot_lock:
                    pass
                continue
            # Writes first: acknowledged ingest must not wait behind index builds (both need the CPU).
            # The delta is searched exactly meanwhile; past write_priority_rows the indexer stops yielding.
            if (WRITES.in_flight or time.monotonic() - WRITES.last < 0.05) \
                    and len(self.delta) < self.settings.write_priority_rows:
                await asyncio.sleep(0.01)
                continue
            with self.lock:  # searches on the pool wait for this slice (at most indexer_slice_ms)
                rows, ids, vecs = self.delta.take(self._chunk)
                labels = np.arange(self.next_label, self.next_label + len(rows), dtype=np.int64)
                t0 = time.perf_counter()
                self.index.add(vecs, labels)
                dt = time.perf_counter() - t0
                self._grow_labels(self.next_label + len(rows))
                self.ext_of_lab[labels] = ids
                self.lab_of_ext.update(zip(ids.tolist(), labels.tolist()))
                self.next_label += len(rows)
                self.delta.consume(rows)
            # keep each slice near the target so searches never wait long behind the indexer
            target = self.settings.indexer_slice_ms / 1000
            if dt > 0:
                self._chunk = int(min(65536, max(16, self._chunk * min(2.0, max(0.5, target / dt)))))
            await asyncio.sleep(0)
        if self.state in ("indexing", "training", "untrained"):
            self.state = "ready"

    def _grow_labels(self, n: int) -> None:
        if n > len(self.ext_of_lab):
            new = np.full(max(n, 2 * len(self.ext_of_lab), 1024), NO_ID, np.uint64)
            new[: len(self.ext_of_lab)] = self.ext_of_lab
            self.ext_of_lab = new

    # ------------------------------------------------------------------------------------------
    # Snapshots
    # ------------------------------------------------------------------------------------------
    def _snapshot_seq_now(self) -> int:
        m = self.delta.min_seq()
        return self.applied_seq if m is None else m - 1

    async def _maybe_snapshot(self, force: bool = False) -> None:
        if not self.index.is_trained():
            return
        seq = self._snapshot_seq_now()
        if seq <= self.snapshot_seq:
            return
        due = (self._written_since_snapshot >= self.settings.snapshot_every
               or time.monotonic() - self._last_snapshot_t >= self.settings.snapshot_interval_s)
        if force or (due and not len(self.delta)):
            await self.snapshot()

    async def snapshot(self) -> int:
        """Write a snapshot of the index now, or wait for the one in flight if it covers every write
        applied now; returns the seq of the newest snapshot (the indexer is paused while it saves)."""
        want = self._snapshot_seq_now()
        async with self._snapshot_lock:
            if self.snapshot_seq >= want:  # the snapshot we waited for (or an earlier one) covers us
                return self.snapshot_seq
            seq = self._snapshot_seq_now()
            if seq <= self.snapshot_seq or not self.index.is_trained():
                return self.snapshot_seq
            labels = self.ext_of_lab[: self.next_label].copy()
            root = self.folder / "snapshots"
            index = self.index

            def write():
                with self._snapshot_files:
                    return write_snapshot(root, index, labels, seq, self.spec, self.d, self.index_metric)

            t0 = time.perf_counter()
            # shielded: if the caller is cancelled (close), the write goes on in its thread; close waits
            # for it, and the thread lock keeps a later write from starting before this one ends
            self._snapshot_write = asyncio.get_running_loop().run_in_executor(None, write)
            await asyncio.shield(self._snapshot_write)
            await asyncio.get_running_loop().run_in_executor(self._wexec, self.store.purge_tombstones, seq)
            if self.index is index:  # a rebuild swapped the index meanwhile: its snapshot is still due
                self.snapshot_seq = seq
            self._written_since_snapshot = 0
            self._last_snapshot_t = time.monotonic()
            logger.info("shard %s: snapshot at seq %d in %.2f s", self.name, seq, time.perf_counter() - t0)
            return seq

    # ------------------------------------------------------------------------------------------
    # Rebuilds (reclaim hidden slots of backends without native delete)
    # ------------------------------------------------------------------------------------------
    async def _maybe_rebuild(self) -> None:
        st = self.index.stats()
        if self.index.capabilities.native_delete or st.hidden < max(1024, self.settings.rebuild_hidden_fraction * (st.live + st.hidden)):
            return
        await self.rebuild()

    async def rebuild(self) -> None:
        """Build a fresh index from the point store, then swap it in and replay what changed meanwhile."""
        loop = asyncio.get_running_loop()
        self.state = "rebuilding"
        upto = self.applied_seq
        spec, d, metric, threads = self.spec, self.d, self.index_metric, self.settings.index_threads
        path = self.store.path

        def build():
            store = PointStore(path, d, self.settings.synchronous, inspect_wal=False)
            try:
                index = registry.create(spec, d, metric, threads)
                ids_all, vec_all = [], []
                for ids, vecs in store.iter_points(max_seq=upto):
                    ids_all.append(ids)
                    vec_all.append(self.prepare(vecs))
                ids = np.concatenate(ids_all) if ids_all else np.zeros(0, np.uint64)
                xb = np.vstack(vec_all) if vec_all else np.zeros((0, d), np.float32)
                if not index.is_trained():
                    if len(xb) < index.train_size():
                        return None
                    index.train(xb[: 4 * index.train_size()])
                for i in range(0, len(xb), 65536):
                    index.add(xb[i : i + 65536], np.arange(i, min(i + 65536, len(xb)), dtype=np.int64))
                return index, ids
            finally:
                store.close()

        built = await loop.run_in_executor(None, build)
        if built is None:
            self.state = "ready"
            return
        index, ids = built
        # Swap: pause in-memory application of new writes, install, replay the writes after `upto`.
        self._paused = True
        try:
            self._install(index, ids, upto)
            await self._replay(upto)
        finally:
            self._paused = False
            self._drain()
        self.snapshot_seq = 0  # force a new snapshot of the rebuilt index
        self.state = "ready"
        logger.info("shard %s: rebuilt %s with %d points", self.name, self.spec.kind, len(ids))

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
