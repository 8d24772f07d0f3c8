"""What the LangChain and LlamaIndex vector stores share: string ids -> point ids, the collection
one store writes to (created on the first write), collision-checked upserts, and score conventions.

String ids. Frameworks name documents and nodes by strings; points are named by uint64. A string
``s`` maps to the point id ``blake2b(utf8(s), digest_size=8)`` read big-endian with the top bit
cleared (63 bits: the id then reads back the same in the int64 view the client returns), and ``s``
itself is kept in the point's payload under the store's id key. Every write first reads the points
it is about to replace and raises :class:`IdCollision` when one holds another string (two strings of
one batch that hash alike are refused the same way), so a collision can never overwrite a document;
deletes go by the stored strings (a filter on the id key), never by the hash, so they are exact too.
Two distinct strings collide with probability 2**-63 per pair (about 5e-8 among a million
documents). Not covered: two clients writing colliding strings at the same instant (the check and
the upsert are two calls).

Thread-safety: a :class:`StoreCollection` may be shared by threads (the sync
:class:`retrieval.Client` is thread-safe; the cached dimension is written once, idempotently). Its
async methods use one :class:`retrieval.AsyncClient` per event loop (a ``grpc.aio`` channel belongs to
the loop it was made in), made on first use in that loop unless one was given.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval import errors

log = logging.getLogger(__name__)

#: the most points one upsert / get / delete call carries from the stores
BATCH = 512
#: the most values of one ``any_of`` condition (the server's limit on a filter)
MAX_VALUES = 1024
_KEY_PART = re.compile(r"[A-Za-z0-9_\-]+")


class IdCollision(errors.InvalidArgument):
    """Two different string ids map to the same 63-bit point id (see the module docstring)."""


class UnsupportedFilter(errors.InvalidArgument):
    """A metadata filter (operator, value type or key) that the service's filter form cannot express."""


def point_id(s: str) -> int:
    """The point id of string id ``s``: 63 bits of blake2b (deterministic across processes)."""
    if not isinstance(s, str):
        raise errors.InvalidArgument(f"ids must be strings, got {type(s).__name__} {s!r}")
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") >> 1


def new_id() -> str:
    return str(uuid.uuid4())


def check_key(key: Any, what: str = "metadata filter key") -> str:
    """``key`` if it is a valid dotted payload path (parts of letters, digits, ``_`` and ``-``)."""
    if not isinstance(key, str) or not key or not all(_KEY_PART.fullmatch(p) for p in key.split(".")):
        raise UnsupportedFilter(f"{what} {str(key)[:80]!r} cannot be filtered on: keys must be dotted parts of "
                                "letters, digits, '_' and '-'")
    return key


def scalar(value: Any, key: str, op: str) -> str | int | float | bool:
    """``value`` if it can be compared for equality by the server (string, int, finite float, bool)."""
    if isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise UnsupportedFilter(f"{op} on {key!r} needs a string, number or bool, got {type(value).__name__} {value!r}")


def number(value: Any, key: str, op: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UnsupportedFilter(f"{op} on {key!r} needs a finite number (ranges compare numbers only), got "
                                f"{type(value).__name__} {value!r}")
    return value


def values(value: Any, key: str, op: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise UnsupportedFilter(f"{op} on {key!r} needs a list of values, got {type(value).__name__} {value!r}")
    return [scalar(v, key, op) for v in value]


def any_of(key: str, vals: Sequence) -> dict:
    """The filter clause "``key`` is one of ``vals``" (split into ORed conditions past the server's
    1,024 values per condition; an empty list matches nothing)."""
    vals = list(dict.fromkeys(vals))
    if not vals:
        return NOTHING_ON(key)
    if len(vals) <= MAX_VALUES:
        return {"key": key, "any_of": vals}
    return {"should": [{"key": key, "any_of": vals[i:i + MAX_VALUES]} for i in range(0, len(vals), MAX_VALUES)]}


def NOTHING_ON(key: str) -> dict:
    """A clause no point satisfies (``key`` null and not null)."""
    return {"must": [{"key": key, "is_null": True}, {"key": key, "is_null": False}]}


def relevance(metric: str, d: float) -> float:
    """A similarity from the server's distance (smaller is nearer), higher is nearer:
    cosine ``1 - d`` = cos(q, x); ip ``1 - d`` = <q, x>; l2 (squared) ``1 - sqrt(d) / sqrt(2)``, which
    is LangChain's euclidean relevance and maps unit vectors to [0, 1]."""
    if metric in ("cosine", "ip"):
        return 1.0 - float(d)
    return 1.0 - math.sqrt(max(float(d), 0.0)) / math.sqrt(2.0)


class StoreCollection:
    """One collection as a store sees it: created on the first write with the dimension of the first
    vectors (``metric``, ``index``), payloads keyed by string ids under ``id_key``.

    ``client`` / ``async_client``: clients to use (not closed by :meth:`close`); otherwise they are
    made from ``address`` and ``client_options`` (the keyword arguments of :class:`retrieval.Client`,
    e.g. ``api_key``, ``tls``, ``timeout``). ``keyword_keys``: payload keys given a keyword payload
    index when the collection is created (the id key always is). ``ef`` / ``exact``: query settings of
    every search.
    """

    def __init__(self, name: str, address: str | None = None, *, client=None, async_client=None,
                 client_options: dict | None = None, metric: str = "cosine", index=None, id_key: str = "id",
                 keyword_keys: Sequence[str] = (), ef: int = 0, exact: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise errors.InvalidArgument(f"collection_name must be a non-empty string, got {name!r}")
        if metric not in ("cosine", "ip", "l2"):
            raise errors.InvalidArgument(f"metric must be 'cosine', 'ip' or 'l2', got {metric!r}")
        self.name = name
        self.metric = metric
        self.index = index
        self.id_key = check_key(id_key, "id_key")
        self.keyword_keys = tuple(dict.fromkeys((self.id_key, *keyword_keys)))
        self.ef = int(ef)
        self.exact = bool(exact)
        self._opts = dict(client_options or {})
        if address is None:
            address = getattr(client, "address", None) or getattr(async_client, "address", None) or "127.0.0.1:50051"
        self.address = address
        self._client = client
        self._own_client = client is None
        self._given_async = async_client
        self._async: dict[int, Any] = {}  # id(loop) -> (loop, AsyncClient)
        self.dimension: int | None = None

    # --- clients -----------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from retrieval.client import Client

            self._client = Client(self.address, **self._opts)
        return self._client

    def aclient(self):
        """The AsyncClient for the running event loop."""
        if self._given_async is not None:
            return self._given_async
        loop = asyncio.get_running_loop()
        entry = self._async.get(id(loop))
        if entry is None or entry[0] is not loop:
            from retrieval.aio import AsyncClient

            for key, (old, _) in list(self._async.items()):  # clients of loops that are gone
                if old.is_closed():
                    del self._async[key]
            entry = self._async[id(loop)] = (loop, AsyncClient(self.address, **self._opts))
        return entry[1]

    def close(self) -> None:
        """Close the sync client if this object made it (async ones: :meth:`aclose`)."""
        if self._own_client and self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        """Close the AsyncClient this object made for the running loop."""
        entry = self._async.pop(id(asyncio.get_running_loop()), None)
        if entry is not None:
            await entry[1].close()

    # --- the collection ----------------------------------------------------------------------------
    def _adopt(self, info: dict) -> None:
        if info["metric"] != self.metric:
            log.info("collection %r has metric %r (not %r): scores follow the collection", self.name,
                     info["metric"], self.metric)
            self.metric = info["metric"]
        self.dimension = int(info["dimension"])

    def _check_dim(self, d: int) -> None:
        if self.dimension != d:
            raise errors.InvalidArgument(f"collection {self.name!r} holds vectors of dimension {self.dimension}; "
                                         f"the embeddings have dimension {d}")

    def ensure(self, d: int) -> None:
        """Make sure the collection exists (create it with dimension ``d``) and has dimension ``d``."""
        if self.dimension is None:
            c = self.client
            try:
                info = c.describe_collection(self.name)
            except errors.NotFound:
                try:
                    info = c.create_collection(self.name, d, self.metric, self.index)
                    for key in self.keyword_keys:
                        try:
                            c.create_payload_index(self.name, key, "keyword")
                        except errors.RetrievalError as e:  # e.g. Ray shards: filters then take the SQL path
                            log.warning("no payload index on %r of %r: %s", key, self.name, e)
                except errors.AlreadyExists:  # made meanwhile by another writer
                    info = c.describe_collection(self.name)
            self._adopt(info)
        self._check_dim(d)

    async def aensure(self, d: int) -> None:
        if self.dimension is None:
            c = self.aclient()
            try:
                info = await c.describe_collection(self.name)
            except errors.NotFound:
                try:
                    info = await c.create_collection(self.name, d, self.metric, self.index)
                    for key in self.keyword_keys:
                        try:
                            await c.create_payload_index(self.name, key, "keyword")
                        except errors.RetrievalError as e:
                            log.warning("no payload index on %r of %r: %s", key, self.name, e)
                except errors.AlreadyExists:
                    info = await c.describe_collection(self.name)
            self._adopt(info)
        self._check_dim(d)

    # --- writes ------------------------------------------------------------------------------------
    def _prepare(self, sids: Sequence[str], vectors, payloads: Sequence[dict]):
        """Batches ``[(point ids uint64, string ids, vectors, payloads)]``; a string given twice is
        written once (its last occurrence); two strings with one point id raise IdCollision."""
        xb = np.asarray(vectors, np.float32)
        if xb.ndim != 2 or len(xb) != len(sids) or len(payloads) != len(sids):
            raise errors.InvalidArgument(f"{len(sids)} ids need {len(sids)} vectors and payloads, got vectors of "
                                         f"shape {xb.shape} and {len(payloads)} payloads")
        last = {s: i for i, s in enumerate(sids)}
        owner: dict[int, str] = {}
        for s in last:
            pid = point_id(s)
            if owner.setdefault(pid, s) != s:
                raise IdCollision(f"ids {owner[pid]!r} and {s!r} map to the same point id {pid}; rename one")
        keep = list(last.values())
        out = []
        for b in range(0, len(keep), BATCH):
            rows = keep[b:b + BATCH]
            out.append((np.array([point_id(sids[i]) for i in rows], np.uint64), [sids[i] for i in rows],
                        xb[rows], [payloads[i] for i in rows]))
        return out

    def _check_stored(self, ids: np.ndarray, sids: list[str], stored) -> None:
        want = dict(zip(ids.tolist(), sids))
        for pid, pl in zip(stored.ids.tolist(), stored.payloads or []):
            have = (pl or {}).get(self.id_key)
            if have != want[pid]:
                raise IdCollision(f"id {want[pid]!r} maps to point id {pid}, which holds {have!r} in collection "
                                  f"{self.name!r}; rename it (nothing of this batch was written)")

    def upsert(self, sids: Sequence[str], vectors, payloads: Sequence[dict]) -> None:
        """Write the points (collision-checked, see the module docstring); a collection dropped since
        this object last saw it is created again (once)."""
        batches = self._prepare(sids, vectors, payloads)
        if not batches:
            return
        for attempt in (0, 1):
            self.ensure(batches[0][2].shape[1])
            c = self.client
            try:
                for ids, s, _, _ in batches:  # check everything before writing anything
                    self._check_stored(ids, s, c.get(self.name, ids, with_vectors=False))
                for ids, _, xb, pls in batches:
                    c.upsert(self.name, ids, xb, pls)
                return
            except errors.NotFound:
                if attempt:
                    raise
                self.dimension = None

    async def aupsert(self, sids: Sequence[str], vectors, payloads: Sequence[dict]) -> None:
        batches = self._prepare(sids, vectors, payloads)
        if not batches:
            return
        for attempt in (0, 1):
            await self.aensure(batches[0][2].shape[1])
            c = self.aclient()
            try:
                for ids, s, _, _ in batches:
                    self._check_stored(ids, s, await c.get(self.name, ids, with_vectors=False))
                for ids, _, xb, pls in batches:
                    await c.upsert(self.name, ids, xb, pls)
                return
            except errors.NotFound:
                if attempt:
                    raise
                self.dimension = None

    def delete(self, flt: dict) -> int:
        """Delete the points matching the filter (dict form); 0 when the collection does not exist."""
        try:
            return self.client.delete(self.name, filter=flt)
        except errors.NotFound:
            return 0

    async def adelete(self, flt: dict) -> int:
        try:
            return await self.aclient().delete(self.name, filter=flt)
        except errors.NotFound:
            return 0

    def id_filter(self, sids: Sequence[str]) -> dict:
        return {"must": [any_of(self.id_key, [str(s) for s in sids])]}

    # --- reads -------------------------------------------------------------------------------------
    def _by_ids(self, sids: Sequence[str], stored_pages) -> list[dict]:
        out = []
        wanted = set(sids)
        for points in stored_pages:
            for pl in points.payloads or []:
                if pl is not None and pl.get(self.id_key) in wanted:
                    out.append(pl)
        return out

    def get(self, sids: Sequence[str]) -> list[dict]:
        """Payloads of the points stored under these string ids (missing ones left out), in no set order."""
        sids = list(dict.fromkeys(sids))
        try:
            pages = [self.client.get(self.name, [point_id(s) for s in sids[i:i + BATCH]], with_vectors=False)
                     for i in range(0, len(sids), BATCH)]
        except errors.NotFound:
            return []
        return self._by_ids(sids, pages)

    async def aget(self, sids: Sequence[str]) -> list[dict]:
        sids = list(dict.fromkeys(sids))
        c = self.aclient()
        try:
            pages = [await c.get(self.name, [point_id(s) for s in sids[i:i + BATCH]], with_vectors=False)
                     for i in range(0, len(sids), BATCH)]
        except errors.NotFound:
            return []
        return self._by_ids(sids, pages)

    def scroll(self, flt: dict | None) -> list[dict]:
        """Payloads of every point matching ``flt`` (all pages)."""
        out: list[dict] = []
        start = None
        try:
            while True:
                page = self.client.scroll(self.name, filter=flt, start_id=start, limit=1000)
                out.extend(p for p in page.payloads if p is not None)
                if page.next_id is None:
                    return out
                start = page.next_id
        except errors.NotFound:
            return []

    async def ascroll(self, flt: dict | None) -> list[dict]:
        out: list[dict] = []
        start = None
        c = self.aclient()
        try:
            while True:
                page = await c.scroll(self.name, filter=flt, start_id=start, limit=1000)
                out.extend(p for p in page.payloads if p is not None)
                if page.next_id is None:
                    return out
                start = page.next_id
        except errors.NotFound:
            return []

    def search(self, q, k: int, flt: dict | None = None, with_vectors: bool = False):
        """``[(payload, distance, vector or None)]`` of the ``k`` nearest points, nearest first; ``[]``
        when the collection does not exist yet."""
        if k <= 0:
            return []
        try:
            hits = self.client.search(self.name, np.asarray(q, np.float32), k=k, ef=self.ef, exact=self.exact,
                                      filter=flt, with_payloads=True, with_vectors=with_vectors)
        except errors.NotFound:
            return []
        return _rows(hits, with_vectors)

    async def asearch(self, q, k: int, flt: dict | None = None, with_vectors: bool = False):
        if k <= 0:
            return []
        try:
            hits = await self.aclient().search(self.name, np.asarray(q, np.float32), k=k, ef=self.ef,
                                               exact=self.exact, filter=flt, with_payloads=True,
                                               with_vectors=with_vectors)
        except errors.NotFound:
            return []
        return _rows(hits, with_vectors)


def _rows(hits, with_vectors: bool):
    vecs = hits.vectors if with_vectors else None
    return [(pl or {}, float(d), None if vecs is None else vecs[i])
            for i, (pl, d) in enumerate(zip(hits.payloads, hits.distances.tolist()))]


def and_filters(*clauses: dict | None) -> dict | None:
    """The filter (dict form) requiring every given clause; None when none is given."""
    parts = [c for c in clauses if c]
    if not parts:
        return None
    if len(parts) == 1 and set(parts[0]) <= {"must", "should", "must_not"}:
        return parts[0]
    return {"must": parts}
