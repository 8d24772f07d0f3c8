"""The background side of a :class:`retrieval.vectors.shard.Shard` (a mixin): the indexer that
moves delta rows into the index in time-sliced chunks, trains faiss indexes once enough points
exist, writes snapshots, and rebuilds indexes whose hidden slots are not reused (faiss) once they are
a quarter of the index. See the shard module for the locking and snapshot rules these follow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np

from retrieval.core.faults import is_disk_full
from retrieval.indexes import registry
from retrieval.indexes.base import IndexSpec, VectorIndex
from retrieval.storage import snapshots
from retrieval.storage.points import PointStore
from retrieval.vectors.delta import NO_ID

logger = logging.getLogger("retrieval.vectors.shard")


class _WriteActivity:
    """Process-wide: writes in flight and when the last one started. Indexers of every shard yield to
    writes of any shard, since they compete for the same CPU cores."""

    in_flight = 0
    last = 0.0


WRITES = _WriteActivity()
DISK_FULL_BACKOFF_S = 5.0


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


class Indexer:
    """The indexer task, snapshots and rebuilds of a shard."""

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
