"""Collections: validation, routing to shards, fan-out and merge; and the manager that owns them.

A collection lives in ``<data_dir>/collections/<name>/``: ``collection.json`` (its settings, written
once, atomically) and one folder per shard (``shard-0/``...) holding that shard's point store and
index snapshots. Ids are routed to shards by a fixed hash (splitmix64), so a point always lives in
the same shard.

Start-up survives what a bad collection does (:class:`CollectionManager`): while a collection is
opened and its replayed writes are indexed, a marker ``<collection>/.opening`` is on disk. A marker
found at the next start means that process died in there: after a fatal error (a native abort, see
:mod:`retrieval.crashes`), or the second death in a row without one, the collection is *quarantined*
(not served; FAILED_PRECONDITION with the reason; ``retrieval collections repair|drop``). A
collection that cannot be opened (e.g. the disk is full) is *unavailable* (UNAVAILABLE with the
reason) and opened again in the background, with backoff, until it works. Both are listed with their
state and reason; the other collections serve meanwhile.

Thread-safety: like the shards, a collection is used from the server's event-loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval import crashes
from retrieval.core.faults import is_disk_full
from retrieval.device import torch_device
from retrieval.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                              RetrievalError, Unavailable)
from retrieval.indexes import registry
from retrieval.indexes.base import IndexSpec, QueryParams
from retrieval.storage import atomic
from retrieval.storage.names import validate_name
from retrieval.vectors import filters as flt
from retrieval.vectors import importing
from retrieval.vectors import payload_index as pidx
from retrieval.vectors.coalesce import Coalescer, search_pool
from retrieval.vectors.collection_checks import CollectionChecks, _each, shard_of  # shard_of: also imported from here
from retrieval.vectors.config import MAX_DIM, MAX_SHARDS, METRICS, CollectionConfig  # noqa: F401 (re-exported)
from retrieval.vectors.delta import NO_ID
from retrieval.vectors.handles import ShardFactory, ShardHandle, local_shard
from retrieval.vectors.results import merge_topk
from retrieval.vectors.shard import PAYLOAD_INDEXES_FILE, ShardSettings, read_payload_specs

logger = logging.getLogger(__name__)

COALESCE_QUERIES = 16  # searches of at most this many queries are coalesced; larger ones go to the pool as they are


@dataclass(frozen=True)
class Limits:
    max_k: int = 1024
    max_batch: int = 10_000          # queries per search, points per upsert / get / delete
    max_payload_bytes: int = 65_536  # per point
    max_ef: int = 100_000
    max_scroll: int = 10_000
    max_points: int = 0              # stored points per collection (0: no limit)
    max_pending_bytes: int = 1 << 30  # vector bytes acknowledged but not indexed yet (0: no limit)
    retry_after_ms: int = 100        # base of the retry-after hint of backpressure errors
    search_chunk: int = 1024         # queries per slice of a batch search (deadline checks between)


@dataclass
class SearchResult:
    distances: np.ndarray                 # (nq, k) float32, ascending, inf padded
    ids: np.ndarray                       # (nq, k) uint64, 2**64-1 padded
    payloads: list[str] | None = None     # nq * k JSON strings ("" for padding / no payload)
    vectors: np.ndarray | None = None     # (nq * k, d) float32 (zeros for padding)


def _in_use(fn):
    """Count a call as in flight on its collection, so that :meth:`Collection.close` (drop, a replacing
    import, shutdown) lets it finish against the version it started on instead of pulling the shards
    away under it. The servicers look a collection up and call it in one event-loop step, so no call
    can start on a collection after it left the manager."""

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        self._users += 1
        try:
            return await fn(self, *args, **kwargs)
        finally:
            self._users -= 1
            if self._users == 0 and self._idle is not None:
                self._idle.set()

    return wrapper


class Collection(CollectionChecks):
    def __init__(self, folder: Path, config: CollectionConfig, settings: ShardSettings, limits: Limits,
                 shard_factory: ShardFactory | None = None) -> None:
        self.folder = folder
        self.config = config
        self.limits = limits
        self.d = config.dimension
        make = shard_factory or local_shard
        self.shards: list[ShardHandle] = [
            make(folder / f"shard-{i}", config.dimension, config.metric, config.index, settings, f"{config.name}/{i}")
            for i in range(config.shards)]
        # in-process shards are searched on the search pool (small queries coalesced); remote ones in parallel
        self._local = all(sh.is_local for sh in self.shards)
        self._pool = search_pool(settings.search_threads)
        self._coalescer = Coalescer(self._search_local, self._pool, max_batch=settings.coalesce_max_queries)
        self._reserved = 0  # points of upserts admitted but not yet applied (for max_points)
        self._users = 0     # calls in flight (see _in_use)
        self._idle: asyncio.Event | None = None

    @property
    def name(self) -> str:
        return self.config.name

    async def open(self) -> None:
        await asyncio.gather(*(s.open() for s in self.shards))

    async def close(self, snapshot: bool = True, drain_timeout: float = 60.0) -> None:
        """Wait (up to ``drain_timeout`` s) for the calls in flight, then close every shard."""
        if self._users:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except asyncio.TimeoutError:
                logger.warning("collection %s: closing with %d calls still in flight after %.0f s",
                               self.name, self._users, drain_timeout)
        await asyncio.gather(*(s.close(snapshot) for s in self.shards), return_exceptions=True)

    # ------------------------------------------------------------------------------------------
    # Writes
    # ------------------------------------------------------------------------------------------
    @_in_use
    async def upsert(self, ids: np.ndarray, vectors: np.ndarray, payloads: list[str] | None) -> tuple[int, int]:
        """Validate and durably upsert; returns (count, seq of the last shard batch)."""
        ids = self.check_ids(ids)
        self.check_batch(len(ids), "upsert")
        if len(vectors) != len(ids):
            raise InvalidArgument(f"{len(ids)} ids but {len(vectors)} vectors")
        self.check_vectors(vectors)
        if len(np.unique(ids)) != len(ids):
            u, c = np.unique(ids, return_counts=True)
            raise InvalidArgument(f"ids must be unique within a request; {int(u[c > 1][0])} appears {int(c.max())} times")
        pls = self.check_payloads(payloads, ids)
        reserve = await self.check_capacity(ids)
        self._reserved += reserve
        try:
            if len(self.shards) == 1:
                seq = await self.shards[0].upsert(ids, vectors, pls)
                return len(ids), seq
            route = shard_of(ids, len(self.shards))
            tasks = []
            for s, shard in enumerate(self.shards):
                sel = np.flatnonzero(route == s)
                if len(sel):
                    tasks.append(shard.upsert(ids[sel], vectors[sel], [pls[i] for i in sel] if pls else None))
            seqs = await _each(tasks)
            return len(ids), max(seqs)
        finally:
            self._reserved -= reserve

    @_in_use
    async def delete(self, ids: np.ndarray | None = None, filter: flt.Filter | None = None) -> int:
        if (ids is None or len(ids) == 0) == (filter is None or filter.is_empty()):
            raise InvalidArgument("delete needs exactly one of: ids, a non-empty filter")
        if ids is not None and len(ids):
            ids = np.unique(self.check_ids(ids))
            self.check_batch(len(ids), "delete")
            route = shard_of(ids, len(self.shards))
            counts = await _each((sh.delete(ids=ids[route == s]) for s, sh in enumerate(self.shards)
                                            if (route == s).any()))
            return int(sum(counts))
        where = self._where(filter)
        counts = await _each(sh.delete(where=where) for sh in self.shards)
        return int(sum(counts))

    # ------------------------------------------------------------------------------------------
    # Search
    # ------------------------------------------------------------------------------------------
    @_in_use
    async def search(self, xq: np.ndarray, k: int, params: QueryParams, filter: flt.Filter | None = None,
                     with_payloads: bool = False, with_vectors: bool = False) -> SearchResult:
        self.check_batch(len(xq), "search")
        self.check_k(k)
        self.check_vectors(xq, "queries")
        if params.ef > self.limits.max_ef:
            raise InvalidArgument(f"ef = {params.ef} is above the limit of {self.limits.max_ef}")
        xp = self.shards[0].prepare(xq)
        where = flt.to_sql(flt.validate_filter(filter)) if filter is not None and not filter.is_empty() else None
        step = self.limits.search_chunk
        if len(xp) <= step:
            D, I = await self._search_chunk(xp, k, params, where)
        else:
            # Slices: between them other calls get the event loop, and a cancelled call (client gone,
            # deadline passed) stops here: grpc.aio cancels the task at the next await.
            Ds, Is = [], []
            for i in range(0, len(xp), step):
                if i:
                    await asyncio.sleep(0)
                D, I = await self._search_chunk(xp[i : i + step], k, params, where)
                Ds.append(D)
                Is.append(I)
            D, I = np.vstack(Ds), np.vstack(Is)
        res = SearchResult(distances=D, ids=I)
        if with_payloads or with_vectors:
            await self._attach(res, with_payloads, with_vectors)
        return res

    async def _search_chunk(self, xp: np.ndarray, k: int, params: QueryParams, where):
        if params.exact and where is None:
            # Exact means exact: read the original vectors from the point store (a lossy index such
            # as PQ cannot give them back), through the filtered path with a match-everything filter.
            where = ("1", [])
        if where is not None:
            parts = await _each(sh.search_filtered(xp, k, params, where) for sh in self.shards)
        elif self._local:
            if len(xp) <= COALESCE_QUERIES and self._coalescer.max_batch > 1:
                return await self._coalescer.search(xp, k, params)
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._search_local, xp, k, params)
        else:
            parts = await asyncio.gather(*(sh.asearch(xp, k, params) for sh in self.shards))
        D, I = parts[0]
        for D2, I2 in parts[1:]:
            D, I = merge_topk(D, I, D2, I2, k)
        return D, I

    def _search_local(self, xp: np.ndarray, k: int, params: QueryParams):
        """Unfiltered k-NN over the in-process shards; called on a search-pool thread (or inline)."""
        D, I = self.shards[0].search_locked(xp, k, params)
        for sh in self.shards[1:]:
            D2, I2 = sh.search_locked(xp, k, params)
            D, I = merge_topk(D, I, D2, I2, k)
        return D, I

    async def _attach(self, res: SearchResult, with_payloads: bool, with_vectors: bool) -> None:
        flat = res.ids.ravel()
        valid = flat != NO_ID
        want = np.unique(flat[valid])
        pay: dict[int, str | None] = {}
        vec: dict[int, np.ndarray] = {}
        route = shard_of(want, len(self.shards))

        def fetch(store, ids):
            return store.get(ids, with_vectors, with_payloads)

        got = await _each((sh.read(lambda st, ids=want[route == s]: fetch(st, ids))
                                     for s, sh in enumerate(self.shards) if (route == s).any()))
        for ids, vecs, pls in got:
            idl = ids.tolist()
            if with_payloads:
                pay.update(zip(idl, pls))
            if with_vectors:
                vec.update(zip(idl, vecs))
        fl = flat.tolist()
        if with_payloads:
            res.payloads = [pay.get(i) or "" for i in fl]
        if with_vectors:
            out = np.zeros((len(fl), self.d), np.float32)
            for j, i in enumerate(fl):
                v = vec.get(i)
                if v is not None:
                    out[j] = v
            res.vectors = out

    # ------------------------------------------------------------------------------------------
    # Reads
    # ------------------------------------------------------------------------------------------
    @_in_use
    async def get(self, ids: np.ndarray, with_vectors: bool, with_payloads: bool):
        ids = np.unique(np.asarray(ids, np.uint64))
        self.check_batch(len(ids), "get")
        route = shard_of(ids, len(self.shards))
        parts = await _each((sh.read(lambda st, sel=ids[route == s]: st.get(sel, with_vectors, with_payloads))
                                       for s, sh in enumerate(self.shards) if (route == s).any()))
        return self._merge_points(parts, with_vectors, with_payloads)

    def _merge_points(self, parts, with_vectors, with_payloads, limit: int | None = None):
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint64)
        order = np.argsort(ids, kind="stable")
        if limit is not None:
            order = order[:limit]
        vecs = np.vstack([p[1] for p in parts])[order] if with_vectors and parts else (
            np.zeros((0, self.d), np.float32) if with_vectors else None)
        pls = None
        if with_payloads:
            allp = [x for p in parts for x in p[2]]
            pls = [allp[i] for i in order.tolist()]
        return ids[order], vecs, pls

    @_in_use
    async def count(self, filter: flt.Filter | None = None) -> int:
        where = self._where(filter) if filter is not None and not filter.is_empty() else None
        counts = await _each(sh.read(lambda st: st.count(where)) for sh in self.shards)
        return int(sum(counts))

    @_in_use
    async def scroll(self, filter: flt.Filter | None, start_id: int, limit: int, with_vectors: bool,
                     with_payloads: bool):
        """Up to ``limit`` points with id >= start_id, in id order, and the next start id (or None)."""
        limit = limit or 100
        if limit > self.limits.max_scroll:
            raise ResourceExhausted(f"scroll limit {limit} is above the maximum of {self.limits.max_scroll}")
        where = self._where(filter) if filter is not None and not filter.is_empty() else None
        parts = await _each((sh.read(
            lambda st: st.scroll(start_id, limit + 1, where, with_vectors, with_payloads)) for sh in self.shards))
        ids, vecs, pls = self._merge_points(parts, with_vectors, with_payloads, limit + 1)
        nxt = None
        if len(ids) > limit:
            nxt = int(ids[limit])
            ids = ids[:limit]
            vecs = vecs[:limit] if vecs is not None else None
            pls = pls[:limit] if pls is not None else None
        return ids, vecs, pls, nxt

    # ------------------------------------------------------------------------------------------
    def info(self, points: int, shard_infos: list[dict] | None = None) -> dict:
        if shard_infos is None:
            shard_infos = [s.info() for s in self.shards]
        shard_infos = [dict(shard=i, **s) for i, s in enumerate(shard_infos)]
        states = {s["state"] for s in shard_infos}
        state = "ready" if states == {"ready"} else sorted(states - {"ready"})[0]
        return {
            "name": self.name, "dimension": self.d, "metric": self.config.metric, "index": self.config.index,
            "shards": len(self.shards), "points": points,
            "indexed": sum(s["indexed"] for s in shard_infos), "pending": sum(s["pending"] for s in shard_infos),
            "memory_bytes": sum(s["memory_bytes"] for s in shard_infos), "state": state,
            "device": torch_device() if self.config.index.kind == "exact" else "cpu",
            "shard_info": shard_infos, "created_at": self.config.created_at,
            "payload_indexes": self._sum_payload_indexes(shard_infos),
        }

    @_in_use
    async def describe(self) -> dict:
        counts = await _each(sh.read(lambda st: st.count(None)) for sh in self.shards)
        infos = await _each(sh.ainfo() for sh in self.shards)
        info = self.info(int(sum(counts)), list(infos))
        for s, c in zip(info["shard_info"], counts):
            s["points"] = int(c)
        return info

    async def wait_indexed(self, timeout: float = 60.0) -> bool:
        return all(await asyncio.gather(*(s.wait_indexed(timeout) for s in self.shards)))

    # ------------------------------------------------------------------------------------------
    # Payload indexes (see retrieval.vectors.payload_index): definitions in <folder>/payload_indexes.json
    # (written atomically), contents built by each shard from its point store
    # ------------------------------------------------------------------------------------------
    @property
    def payload_index_specs(self) -> dict[str, str]:
        """``{key: type}`` of the collection's payload indexes, in creation order."""
        specs = self.__dict__.get("_pidx_specs")
        if specs is None:
            specs = self.__dict__["_pidx_specs"] = read_payload_specs(self.folder)
        return specs

    def _pidx_lock(self) -> asyncio.Lock:
        lock = self.__dict__.get("_pidx_lock_obj")
        if lock is None:
            lock = self.__dict__["_pidx_lock_obj"] = asyncio.Lock()
        return lock

    def _where(self, filter: flt.Filter):
        """The SQL of a filter, with range conditions on datetime-indexed keys reading timestamps."""
        dk = frozenset(k for k, t in self.payload_index_specs.items() if t == "datetime")
        return flt.to_sql(flt.validate_filter(filter), datetime_keys=dk)

    def _sum_payload_indexes(self, shard_infos: list[dict]) -> list[dict]:
        points: dict[str, int] = {}
        for s in shard_infos:
            for e in s.get("payload_indexes", []):
                points[e["key"]] = points.get(e["key"], 0) + int(e["points"])
        return [{"key": k, "type": t, "points": points.get(k, 0)} for k, t in self.payload_index_specs.items()]

    async def _save_payload_specs(self, specs: dict[str, str]) -> None:
        doc = {"indexes": [{"key": k, "type": t} for k, t in specs.items()]}
        await asyncio.get_running_loop().run_in_executor(
            None, atomic.write_json, self.folder / PAYLOAD_INDEXES_FILE, doc)
        self.__dict__["_pidx_specs"] = dict(specs)

    @_in_use
    async def create_payload_index(self, key: str, type: str) -> dict:
        """Index payload ``key`` as ``type`` (one of :data:`payload_index.TYPES`), built from the stored
        points (on worker threads); returns ``{"key", "type", "points"}``. ALREADY_EXISTS for an indexed
        key, INVALID_ARGUMENT for a bad key or type."""
        pidx.validate_key(key)
        pidx.validate_type(type)
        if not self._local:
            raise FailedPrecondition("payload indexes need in-process shards (not --ray)")
        async with self._pidx_lock():
            old = self.payload_index_specs
            if key in old:
                raise AlreadyExists(f"collection {self.name!r} already has a payload index on {key!r} "
                                    f"(type {old[key]}); drop it first to change its type")
            new = {**old, key: type}
            try:
                await _each(sh.set_payload_indexes(new) for sh in self.shards)
                await self._save_payload_specs(new)
            except BaseException:
                await asyncio.gather(*(sh.set_payload_indexes(old) for sh in self.shards), return_exceptions=True)
                raise
        return next(e for e in self.list_payload_indexes() if e["key"] == key)

    @_in_use
    async def drop_payload_index(self, key: str) -> None:
        """Drop the payload index on ``key``; NOT_FOUND when there is none."""
        pidx.validate_key(key)
        async with self._pidx_lock():
            old = self.payload_index_specs
            if key not in old:
                raise NotFound(f"collection {self.name!r} has no payload index on {key!r}")
            new = {k: t for k, t in old.items() if k != key}
            await self._save_payload_specs(new)
            await _each(sh.set_payload_indexes(new) for sh in self.shards)

    def list_payload_indexes(self) -> list[dict]:
        """``[{"key", "type", "points"}]``: points = stored points with at least one indexed value there."""
        infos = [sh.info() for sh in self.shards] if self._local else []
        return self._sum_payload_indexes(infos)


MARKER = ".opening"          # in a collection folder while it is opened and its replay is indexed
CATCH_UP_TIMEOUT_S = 600.0   # the marker goes after this long even if the replay is not indexed yet
SETTLE_S = 2.0               # start-up waits up to this long for each collection's replay to be indexed,
SETTLE_TOTAL_S = 10.0        # and this long in all
QUARANTINED, UNAVAILABLE = "quarantined", "unavailable"


def _read_marker(folder: Path) -> dict | None:
    """The marker's content; None without one ({} for an unreadable one: still a marker)."""
    try:
        text = (folder / MARKER).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        d = json.loads(text)
        return d if isinstance(d, dict) else {}
    except ValueError:
        return {}


def _write_marker(folder: Path, deaths: int) -> None:
    """Durably note that ``folder`` is being opened (``deaths``: earlier starts that died doing it).
    Best effort: where it cannot be written (a full disk) the collection opens without it."""
    try:
        fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, json.dumps({"deaths": deaths, "pid": os.getpid(), "at": time.time()}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic.fsync_dir(folder)
    except OSError as e:
        logger.warning("cannot write %s (%s); opening without it", folder / MARKER, e)
        with contextlib.suppress(OSError):
            (folder / MARKER).unlink()


def _clear_marker(folder: Path) -> None:
    try:
        (folder / MARKER).unlink()
        atomic.fsync_dir(folder)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("cannot remove %s: %s", folder / MARKER, e)


def _why(e: BaseException) -> str:
    """A failed open, for a person."""
    if is_disk_full(e):
        return "the disk holding the data folder is full"
    return f"{type(e).__name__}: {e}" if not isinstance(e, RetrievalError) else str(e)


@dataclass
class Unserved:
    """A collection folder the manager holds but does not serve: ``state`` is "quarantined" (its open
    killed the server; waits for repair or drop), "unavailable" (it could not be opened; retried in
    the background; a retry under way says so in ``reason``, the state stays "unavailable")."""

    name: str
    folder: Path
    config: CollectionConfig | None
    state: str
    reason: str
    since: float = field(default_factory=time.time)
    attempts: int = 0

    def error(self) -> RetrievalError:
        if self.state == QUARANTINED:
            return FailedPrecondition(
                f"collection {self.name!r} is quarantined: {self.reason}. `retrieval collections repair "
                f"{self.name}` opens it again (--index SPEC rebuilds its index from the stored points with a "
                f"corrected spec), `retrieval collections drop {self.name}` deletes it")
        return Unavailable(f"collection {self.name!r} is unavailable: {self.reason}")

    async def describe(self) -> dict:
        c = self.config
        return {"name": self.name, "dimension": c.dimension if c else 0, "metric": c.metric if c else "",
                "index": c.index if c else None, "shards": c.shards if c else 0, "points": 0, "indexed": 0,
                "pending": 0, "memory_bytes": 0, "state": self.state, "reason": self.reason, "device": "",
                "shard_info": [], "created_at": c.created_at if c else 0.0}


class CollectionManager:
    """All collections of a data folder. Create and drop are atomic: a crash leaves a collection
    either fully there or absent. Collections that are not served (quarantined, unavailable) are
    held as :class:`Unserved`: listed and described with their reason; every other call on them is
    FAILED_PRECONDITION (quarantined) or UNAVAILABLE."""

    def __init__(self, data_dir: Path, settings: ShardSettings, limits: Limits,
                 shard_factory: ShardFactory | None = None, retry_s: tuple[float, float] = (1.0, 30.0)) -> None:
        """``shard_factory``: where shards live (default in process; see :mod:`retrieval.vectors.handles`).
        ``retry_s``: first and longest wait between attempts to open an unavailable collection."""
        self.root = Path(data_dir) / "collections"
        self.settings = settings
        self.limits = limits
        self.shard_factory = shard_factory
        self.retry_s = retry_s
        self._collections: dict[str, Collection] = {}
        self._unserved: dict[str, Unserved] = {}
        self._retries: dict[str, asyncio.Task] = {}
        self._catching_up: dict[Path, asyncio.Task] = {}
        self._lock = asyncio.Lock()
        self._importing: set[str] = set()
        self._closed = False

    def _new(self, folder: Path, config: CollectionConfig) -> Collection:
        return Collection(folder, config, self.settings, self.limits, self.shard_factory)

    async def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        importing.resolve_duplicates(self.root)  # a crash during a replacing import: the newest install wins
        crash = crashes.last_crash(self.root.parent)
        # a fatal error in a job's own thread is the job's doing (see JobManager), not an open's
        native = crash is not None and not crash.in_job
        folders = sorted(self.root.iterdir())
        marked = sum(1 for p in folders if not p.name.startswith(".") and (p / MARKER).exists())
        settle_left = SETTLE_TOTAL_S
        for p in folders:
            if p.name.startswith("."):  # leftovers of an interrupted create or drop
                shutil.rmtree(p, ignore_errors=True)
                continue
            if not p.is_dir():
                logger.warning("%s is not a collection folder; it is left untouched", p)
                continue
            name = p.name.split("@", 1)[0]
            try:
                config = CollectionConfig.from_json(json.loads((p / "collection.json").read_text())).validate()
                name = config.name
            except Exception as e:
                logger.exception("collection folder %s: cannot read its settings", p)
                self._unavailable(Unserved(name, p, None, UNAVAILABLE,
                                           f"its settings file collection.json cannot be read ({_why(e)})"))
                continue
            marker = _read_marker(p)
            deaths = 0
            if marker is not None:
                prev = marker.get("deaths", 0)
                deaths = (prev if isinstance(prev, int) and prev >= 0 else 0) + 1
                if native or deaths >= 2:
                    how = (f"a fatal error ({crash.error})" if native else
                           f"an unexplained stop (killed?) on {deaths} starts in a row")
                    reason = (f"the server died while opening this collection on its last start ({how}: a native "
                              "library abort or crash while loading its index or indexing its replayed writes); "
                              "it is not opened again by itself, so that it cannot keep the others offline")
                    if native and marked > 1:
                        reason += (f" ({marked} collections were being opened then and all are quarantined; "
                                   "repair them one at a time)")
                    logger.error("collection %s: quarantined: %s", name, reason)
                    self._unserved[name] = Unserved(name, p, config, QUARANTINED, reason)
                    continue
                logger.warning("collection %s: the server stopped while opening it on its last start (no fatal "
                               "error recorded: killed?); opening it again", name)
            try:
                col = await self._open_folder(p, config, deaths)
            except Exception as e:
                logger.exception("could not open collection %s (folder %s)", name, p)
                self._unavailable(Unserved(name, p, config, UNAVAILABLE, f"it could not be opened: {_why(e)}"))
                continue
            self._collections[name] = col
            logger.info("opened collection %s", name)
            # Give its replayed writes a moment to be indexed before the next collection opens: a native
            # abort there then happens while its marker is the only one, and is pinned on it alone.
            settle = self._catching_up.get(p)
            if settle is not None and settle_left > 0:
                t0 = time.monotonic()
                await asyncio.wait({settle}, timeout=min(SETTLE_S, settle_left))
                settle_left -= time.monotonic() - t0

    async def _open_folder(self, folder: Path, config: CollectionConfig, deaths: int = 0) -> Collection:
        """Open a collection under the marker: it stays on disk until the writes replayed at open are
        indexed (a native abort there kills the process; the next start then finds the marker)."""
        _write_marker(folder, deaths)
        col = self._new(folder, config)
        try:
            await col.open()
        except BaseException:
            await col.close(snapshot=False)
            _clear_marker(folder)  # an exception is not a death: the retry decides what happens next
            raise
        self._catching_up[folder] = asyncio.create_task(self._clear_when_caught_up(col), name=f"catch-up-{config.name}")
        return col

    async def _clear_when_caught_up(self, col: Collection) -> None:
        try:
            if not await col.wait_indexed(CATCH_UP_TIMEOUT_S):
                logger.warning("collection %s: the writes replayed at open are not indexed after %.0f s; "
                               "no longer treating a crash as its open's", col.name, CATCH_UP_TIMEOUT_S)
        except Exception:
            logger.exception("collection %s: waiting for the replayed writes failed", col.name)
        finally:
            self._catching_up.pop(col.folder, None)
        _clear_marker(col.folder)

    def _unavailable(self, u: Unserved) -> None:
        """Hold ``u`` as unavailable and retry opening it in the background, with backoff."""
        self._unserved[u.name] = u
        old = self._retries.pop(u.name, None)
        if old is not None:
            old.cancel()
        if not self._closed:
            self._retries[u.name] = asyncio.create_task(self._retry(u), name=f"reopen-{u.name}")

    async def _retry(self, u: Unserved) -> None:
        first, longest = self.retry_s
        base = u.reason
        try:
            while True:
                u.attempts += 1
                delay = min(longest, first * 2 ** min(u.attempts - 1, 30))
                u.state, u.reason = UNAVAILABLE, f"{base}; opened again by itself, next attempt in {delay:.0f} s"
                await asyncio.sleep(delay)
                async with self._lock:
                    if self._unserved.get(u.name) is not u:
                        return  # dropped or repaired meanwhile
                    u.reason = f"{base}; opened again by itself, an attempt is under way"
                    try:
                        config = u.config or CollectionConfig.from_json(
                            json.loads((u.folder / "collection.json").read_text())).validate()
                        col = await self._open_folder(u.folder, config)
                    except Exception as e:
                        why = _why(e)
                        base = (f"it could not be opened: {why}" if u.config else
                                f"its settings file collection.json cannot be read ({why})")
                        logger.warning("collection %s: still cannot be opened (attempt %d): %s", u.name,
                                       u.attempts, why)
                        continue
                    del self._unserved[u.name]
                    self._collections[config.name] = col
                    logger.info("collection %s: opened after %d attempts; serving again", u.name, u.attempts)
                    return
        finally:
            if self._retries.get(u.name) is asyncio.current_task():
                del self._retries[u.name]

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._retries.values(), *self._catching_up.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cols = list(self._collections.values())
        await asyncio.gather(*(c.close() for c in cols), return_exceptions=True)
        for c in cols:  # a clean stop: nothing died while opening
            _clear_marker(c.folder)
        self._collections.clear()

    def get(self, name: str) -> Collection:
        col = self._collections.get(name)
        if col is None:
            u = self._unserved.get(name)
            if u is not None:
                raise u.error()
            validate_name(name, "collection name")
            raise NotFound(f"collection {name!r} does not exist")
        return col

    def list(self) -> list[Collection]:
        """The collections being served."""
        return [self._collections[n] for n in sorted(self._collections)]

    def unserved(self) -> list[Unserved]:
        """The collections held but not served (quarantined, unavailable, opening)."""
        return [self._unserved[n] for n in sorted(self._unserved)]

    def lookup(self, name: str) -> Collection | Unserved:
        """A collection, served or not (both have ``describe()``); NOT_FOUND for an unknown name."""
        u = self._unserved.get(name)
        return u if u is not None and name not in self._collections else self.get(name)

    def all(self) -> list[Collection | Unserved]:
        """Every collection, served or not, by name."""
        both: dict[str, Collection | Unserved] = {**self._unserved, **self._collections}
        return [both[n] for n in sorted(both)]

    async def repair(self, name: str, index: IndexSpec | None = None) -> Collection:
        """Open a quarantined or unavailable collection again, now. With ``index``, first replace its
        index spec and delete its index snapshots: the index is rebuilt from the point store (the
        system of record), so no point is lost. A served collection is returned as is (with ``index``:
        FAILED_PRECONDITION). If the open kills the server again, the next start quarantines it again."""
        async with self._lock:
            col = self._collections.get(name)
            if col is not None:
                if index is not None:
                    raise FailedPrecondition(f"collection {name!r} is being served; repair replaces the index spec "
                                             "of a quarantined or unavailable collection only")
                return col
            u = self._unserved.get(name)
            if u is None:
                validate_name(name, "collection name")
                raise NotFound(f"collection {name!r} does not exist")
            config = u.config
            if config is None:
                try:
                    config = CollectionConfig.from_json(json.loads((u.folder / "collection.json").read_text())).validate()
                except Exception as e:
                    raise FailedPrecondition(f"collection {name!r}: its settings file collection.json cannot be read "
                                             f"({_why(e)}); drop it") from None
            if index is not None:
                config = dataclasses.replace(config, index=index).validate()
                await registry.avalidate(config.index, config.dimension, config.metric)  # as create does
                await asyncio.get_running_loop().run_in_executor(None, self._respec, u.folder, config)
                u.config = config
            retry = self._retries.pop(name, None)
            if retry is not None:
                retry.cancel()
            logger.info("collection %s: repair: opening it again%s", name,
                        f" with index {registry.spec_to_dict(index)}" if index is not None else "")
            try:
                col = await self._open_folder(u.folder, config)
            except Exception as e:
                why = _why(e)
                u.reason = f"a repair failed to open it: {why}"
                if u.state != QUARANTINED:
                    self._unavailable(u)
                raise FailedPrecondition(f"collection {name!r} could not be opened: {why}") from None
            del self._unserved[name]
            self._collections[name] = col
            logger.info("collection %s: repaired; serving", name)
            return col

    @staticmethod
    def _respec(folder: Path, config: CollectionConfig) -> None:
        """Write ``config`` as the folder's collection.json and delete the shards' index snapshots."""
        atomic.write_json(folder / "collection.json", config.to_json())
        for shard in sorted(folder.glob("shard-*")):
            snaps = shard / "snapshots"
            if snaps.exists():
                aside = shard / f".snapshots-old-{uuid.uuid4().hex}"
                os.rename(snaps, aside)
                atomic.fsync_dir(shard)
                shutil.rmtree(aside, ignore_errors=True)

    async def create(self, config: CollectionConfig) -> Collection:
        config.validate()
        await registry.avalidate(config.index, config.dimension, config.metric)  # a bad spec: refused before disk
        async with self._lock:
            if config.name in self._collections:
                raise AlreadyExists(f"collection {config.name!r} already exists")
            if config.name in self._unserved:
                u = self._unserved[config.name]
                raise AlreadyExists(f"collection {config.name!r} already exists ({u.state}: {u.reason}); "
                                    "drop it first to create a new one")
            final = self.root / config.name
            if final.exists():
                raise FailedPrecondition(f"folder for collection {config.name!r} exists but is not loaded; "
                                         "see the server log")
            tmp = self.root / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir(parents=True)
            atomic.write_json(tmp / "collection.json", config.to_json())
            os.rename(tmp, final)
            atomic.fsync_dir(self.root)
            col = self._new(final, config)
            try:
                await col.open()
            except Exception:
                await col.close(snapshot=False)
                shutil.rmtree(final, ignore_errors=True)
                raise
            self._collections[config.name] = col
            return col

    def _stop_catch_up(self, folder: Path) -> None:
        task = self._catching_up.pop(folder, None)
        if task is not None:
            task.cancel()

    async def _drop_unserved(self, u: Unserved) -> None:
        """Delete an unserved collection's files (nothing of it is opened)."""
        retry = self._retries.pop(u.name, None)
        if retry is not None:
            retry.cancel()
        if self._unserved.get(u.name) is u:
            del self._unserved[u.name]
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(u.folder, trash)
        except FileNotFoundError:  # its folder was removed by hand meanwhile
            pass
        await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, trash, True)
        logger.info("dropped collection %s (%s)", u.name, u.state)

    async def drop(self, name: str) -> None:
        async with self._lock:
            u = self._unserved.get(name) if name not in self._collections else None
            if u is not None:  # quarantined or unavailable
                await self._drop_unserved(u)
                return
            col = self.get(name)
            del self._collections[name]
            self._stop_catch_up(col.folder)
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            await col.close(snapshot=False)
            os.rename(col.folder, trash)
            await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, trash, True)

    def check_import(self, name: str, replace: bool = False) -> None:
        """What :meth:`import_folder` checks of the name before it reads anything."""
        validate_name(name, "collection name")
        if name in self._importing:
            raise FailedPrecondition(f"collection {name!r} is being imported already")
        if (name in self._collections or name in self._unserved) and not replace:
            raise AlreadyExists(f"collection {name!r} already exists; pass replace to replace it")

    async def import_folder(self, source: Path, name: str, replace: bool = False, move: bool = False) -> Collection:
        """Attach the collection folder ``source`` (e.g. written by ``index_builder build``) as ``name``.

        ``source`` is copied (``move``: renamed) into the data folder, validated
        (:func:`retrieval.vectors.importing.validate_folder`: checksums, dimension, layout, no links),
        opened, and checked to serve from its snapshots; only then does it take the name, in one step
        on the event loop. With ``replace`` an existing collection of that name keeps serving until that
        moment, then is closed and deleted (writes it took meanwhile go with it); without, an existing
        name is ALREADY_EXISTS. A failed import changes nothing (a moved ``source`` is moved back).
        """
        self.check_import(name, replace)
        loop = asyncio.get_running_loop()
        source = Path(source)
        self._importing.add(name)
        staging = self.root / f".import-{uuid.uuid4().hex}"
        target: Path | None = None
        try:
            config = await loop.run_in_executor(None, importing.stage, source, staging, name, move)
            expected = await loop.run_in_executor(None, importing.snapshot_seqs, staging)
            target = importing.target_folder(self.root, name)
            os.rename(staging, target)
            atomic.fsync_dir(self.root)
            # under the marker: a native abort loading a foreign snapshot quarantines it at the next start
            col = await self._open_folder(target, config)
            try:
                infos = await asyncio.gather(*(sh.ainfo() for sh in col.shards))
                for i, (info, seq) in enumerate(zip(infos, expected)):
                    if seq and info["snapshot_seq"] != seq:
                        raise InvalidArgument(f"shard {i} of the imported collection did not load its index "
                                              f"snapshot (seq {seq}); see the server log")
            except BaseException:
                self._stop_catch_up(target)
                await col.close(snapshot=False)
                _clear_marker(target)
                raise
            async with self._lock:
                old = self._collections.get(name)
                if old is not None and not replace:
                    self._stop_catch_up(target)
                    await col.close(snapshot=False)
                    _clear_marker(target)
                    raise AlreadyExists(f"collection {name!r} was created while it was being imported")
                stale = self._unserved.get(name)
                if stale is not None:  # replaces a quarantined or unavailable collection
                    await self._drop_unserved(stale)
                self._collections[name] = col
                target = None  # installed: from here on it is the collection
            if old is not None:
                self._stop_catch_up(old.folder)
                await old.close(snapshot=False)
                await loop.run_in_executor(None, importing.trash, old.folder)
            logger.info("imported collection %s from %s (%s)", name, source, "replacing" if old else "new")
            return col
        finally:
            self._importing.discard(name)
            if target is not None and target.exists():  # failed after installing the folder: undo
                if move and not source.exists():
                    os.rename(target, source)
                else:
                    await loop.run_in_executor(None, importing.trash, target)
            elif move and staging.exists() and not source.exists():
                os.rename(staging, source)
            await loop.run_in_executor(None, shutil.rmtree, staging, True)

