"""What a collection checks of a request before anything is written or searched: vector shapes and values,
batch sizes, ids, payloads, k, capacity (:class:`CollectionChecks`, a mixin of
:class:`retrieval.vectors.collection.Collection`). Every check raises InvalidArgument (or
ResourceExhausted for capacity) with the sentence the client shows."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np

from retrieval.errors import InvalidArgument, ResourceExhausted
from retrieval.jsonlimits import check_depth
from retrieval.vectors.delta import NO_ID

_MAX_NORM = float(np.sqrt(np.finfo(np.float32).max / 4.0))


def _overloaded(message: str, retry_after_ms: int) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED that a client may retry after ``retry_after_ms`` (the server's interceptor
    sends the hint as ``retry-after-ms`` trailing metadata)."""
    ms = int(min(max(retry_after_ms, 1), 10_000))
    err = ResourceExhausted(f"{message}; retry after {ms} ms")
    err.retry_after_ms = ms
    return err


def shard_of(ids: np.ndarray, n: int) -> np.ndarray:
    """Shard number of each id: splitmix64(id) mod n."""
    if n == 1:
        return np.zeros(len(ids), np.int64)
    z = np.asarray(ids, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z % np.uint64(n)).astype(np.int64)


async def _each(aws) -> list:
    """``asyncio.gather`` over the shards' coroutines, but one coroutine is awaited in place: no task
    and no extra pass through the event loop, which costs the most when the loop is busiest."""
    aws = list(aws)
    if len(aws) == 1:
        return [await aws[0]]
    return list(await asyncio.gather(*aws))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class CollectionChecks:
    """Methods of :class:`Collection` (see the module docstring); mixed into it, not used alone."""

    # ------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------
    def check_vectors(self, x: np.ndarray, what: str = "vectors") -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.d:
            got = x.shape[1] if x.ndim == 2 else x.shape
            raise InvalidArgument(f"{what} have dimension {got}; collection {self.name!r} has dimension {self.d}")
        # one pass for the common case: the largest |component| is finite (no NaN / inf) and small
        top = float(np.abs(x).max()) if x.size else 0.0
        if not math.isfinite(top):
            bad = int(np.flatnonzero(~np.isfinite(x).all(1))[0])
            raise InvalidArgument(f"{what} row {bad} contains NaN or infinity")
        # Distances are float32: |q - x|^2 <= 2 (|q|^2 + |x|^2) stays finite when every squared length is
        # at most float32 max / 4, i.e. a length of at most ~9.2e18 (3e38 components overflow l2 to inf).
        if top * math.sqrt(x.shape[1]) > _MAX_NORM:
            max_norm = _MAX_NORM
            norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))  # float64: no overflow here
            if (norms > max_norm).any():
                bad = int(np.flatnonzero(norms > max_norm)[0])
                raise InvalidArgument(f"{what} row {bad} has length {norms[bad]:.3g}; the largest allowed is "
                                      f"{max_norm:.3g} (distances between longer vectors overflow float32); "
                                      "scale the vectors down")
        if self.config.metric == "cosine":
            norms = np.linalg.norm(x, axis=1)
            if (norms == 0).any():
                bad = int(np.flatnonzero(norms == 0)[0])
                raise InvalidArgument(f"{what} row {bad} has zero length; cosine distance is undefined for it")
        return x

    def check_batch(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidArgument(f"{what}: the batch is empty")
        if n > self.limits.max_batch:
            raise ResourceExhausted(f"{what}: {n} items in one request; the limit is {self.limits.max_batch}")

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.uint64)
        if (ids == NO_ID).any():
            raise InvalidArgument("id 18446744073709551615 (2^64 - 1) is reserved to mark missing results")
        return ids

    def check_payloads(self, payloads: list[str] | None, ids: np.ndarray) -> list[str | None] | None:
        if not payloads:
            return None
        if len(payloads) != len(ids):
            raise InvalidArgument(f"{len(payloads)} payloads for {len(ids)} points; give one per point or none")
        out: list[str | None] = []
        limit = self.limits.max_payload_bytes
        for i, p in enumerate(payloads):
            if not p:
                out.append(None)
                continue
            if len(p) > limit:
                raise InvalidArgument(f"payload of point {int(ids[i])} is {len(p)} characters; the limit is {limit}")
            check_depth(p, f"payload of point {int(ids[i])}")
            try:
                obj = json.loads(p, parse_constant=_reject_constant)
            except (ValueError, RecursionError) as e:
                raise InvalidArgument(f"payload of point {int(ids[i])} is not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise InvalidArgument(
                    f"payload of point {int(ids[i])} must be a JSON object, got a JSON {type(obj).__name__}")
            out.append(p)
        return out

    def check_k(self, k: int) -> None:
        if k <= 0:
            raise InvalidArgument(f"k must be >= 1, got {k}")
        if k > self.limits.max_k:
            raise ResourceExhausted(f"k = {k} is above the limit of {self.limits.max_k}")

    async def check_capacity(self, ids: np.ndarray) -> int:
        """Limits on writes: ``max_pending_bytes`` (backpressure: RESOURCE_EXHAUSTED with a retry-after
        hint while too many acknowledged vectors wait for the indexer; they are held in memory and
        searched exactly meanwhile) and ``max_points`` (RESOURCE_EXHAUSTED when the upsert would pass it).
        Returns the number of new points to reserve while the upsert commits."""
        lim = self.limits
        if not lim.max_pending_bytes and not lim.max_points:
            return 0
        # in-process shards answer with a plain call: no task, no extra trip through a busy event loop
        infos = ([sh.info() for sh in self.shards] if self._local
                 else await asyncio.gather(*(sh.ainfo() for sh in self.shards)))
        pending = sum(i["pending"] for i in infos)
        if lim.max_pending_bytes and pending * self.d * 4 > lim.max_pending_bytes:
            raise _overloaded(f"collection {self.name!r} has {pending} points waiting for the indexer "
                              f"({pending * self.d * 4} bytes; limits.max_pending_bytes is {lim.max_pending_bytes})",
                              lim.retry_after_ms * 10)
        if not lim.max_points:
            return 0
        now = sum(i["indexed"] for i in infos) + pending + self._reserved
        if now + len(ids) <= lim.max_points:
            return len(ids)
        route = shard_of(ids, len(self.shards))
        found = await _each((sh.read(lambda st, sel=ids[route == s]: len(st.get(sel, False, False)[0]))
                                       for s, sh in enumerate(self.shards) if (route == s).any()))
        new = len(ids) - int(sum(found))
        if now + new > lim.max_points:
            raise ResourceExhausted(f"collection {self.name!r} holds {now} points and this upsert adds {new}; "
                                    f"the limit is {lim.max_points} points per collection "
                                    "(limits.max_points_per_collection)")
        return new
