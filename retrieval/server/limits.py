"""Admission control and backpressure: the server says "not now, retry in N ms" instead of queueing
without bound.

Every RPC passes :class:`Admission` in the interceptor (so services added later are covered):

* unary calls in flight (``limits.max_inflight_requests``);
* streaming calls open (``limits.max_streams``) and, among them, session streams
  (``limits.max_sessions``: methods in :data:`SESSION_METHODS`, e.g. draft sessions);
* bytes of write requests being served (``limits.max_inflight_write_bytes``): a unary write that does
  not fit is refused; a message of a write stream that does not fit waits (HTTP/2 flow control then
  holds the client back) up to :data:`STREAM_WAIT_S` or the call's deadline, then the call is refused.

A refusal is :class:`Overloaded`: ``RESOURCE_EXHAUSTED`` whose message ends with "retry after N ms"
and whose trailing metadata carries ``retry-after-ms: N``. Engines raise it too (e.g. a collection
whose indexer is too far behind). Nothing was done for a refused call, so a client may retry it
as is; the Python client does so for unary calls, honouring the hint.

Limits that are properties of one request (``k``, batch size, message size) are permanent
``RESOURCE_EXHAUSTED`` errors without a hint: retrying cannot help.

Thread-safety: an :class:`Admission` is used from the server's event-loop thread only.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

from retrieval.errors import ResourceExhausted

RETRY_AFTER_KEY = "retry-after-ms"
MAX_RETRY_AFTER_MS = 10_000
STREAM_WAIT_S = 5.0
STREAM_WINDOW = 8  # messages of one write stream counted as in flight (the servicer pipelines up to 4)

#: Full method names of session streams (long-lived, one per user conversation/generation).
SESSION_METHODS: set[str] = {"/retrieval.v1.Drafts/Session"}


def register_session_method(full_method: str) -> None:
    """Count ``/pkg.Service/Method`` against ``limits.max_sessions`` (besides ``max_streams``)."""
    SESSION_METHODS.add(full_method)


class Overloaded(ResourceExhausted):
    """RESOURCE_EXHAUSTED because the server is saturated right now; ``retry_after_ms`` is the hint."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        self.retry_after_ms = int(min(max(retry_after_ms, 1), MAX_RETRY_AFTER_MS))
        super().__init__(f"{message}; retry after {self.retry_after_ms} ms")


def retry_after_of(e: BaseException) -> int | None:
    """The retry-after hint an error carries (any exception with an int ``retry_after_ms``), else None."""
    v = getattr(e, "retry_after_ms", None)
    return int(v) if isinstance(v, (int, float)) and v > 0 else None


@dataclass
class Counts:
    unary: int = 0
    streams: int = 0
    sessions: int = 0
    write_bytes: int = 0
    rejected: int = 0


class Admission:
    """Counters and limits for calls in flight (see the module docstring). 0 disables a limit."""

    def __init__(self, max_inflight_requests: int = 512, max_streams: int = 256, max_sessions: int = 128,
                 max_inflight_write_bytes: int = 256 << 20, retry_after_ms: int = 100,
                 on_reject=None) -> None:
        self.max_unary = max_inflight_requests
        self.max_streams = max_streams
        self.max_sessions = max_sessions
        self.max_write_bytes = max_inflight_write_bytes
        self.base_ms = retry_after_ms
        self.now = Counts()
        self._on_reject = on_reject
        self._freed = asyncio.Event()

    @classmethod
    def from_settings(cls, limits, on_reject=None) -> "Admission":
        return cls(limits.max_inflight_requests, limits.max_streams, limits.max_sessions,
                   limits.max_inflight_write_bytes, limits.retry_after_ms, on_reject)

    def _reject(self, reason: str, message: str, load: float) -> Overloaded:
        self.now.rejected += 1
        if self._on_reject is not None:
            self._on_reject(reason)
        # the further past the limit, the longer the hint (load = demand / limit >= 1)
        return Overloaded(message, int(self.base_ms * min(max(load, 1.0), 20.0)))

    # --- unary calls ------------------------------------------------------------------------------
    def enter_unary(self, write_bytes: int = 0) -> None:
        """Admit a unary call (``write_bytes`` > 0 for writes) or raise :class:`Overloaded`."""
        c = self.now
        if self.max_unary and c.unary >= self.max_unary:
            raise self._reject("inflight_requests", f"the server is serving {c.unary} calls, its limit "
                               f"(limits.max_inflight_requests = {self.max_unary})", (c.unary + 1) / self.max_unary)
        if write_bytes and self.max_write_bytes and c.write_bytes and c.write_bytes + write_bytes > self.max_write_bytes:
            raise self._reject("inflight_write_bytes",
                               f"{c.write_bytes} bytes of writes are in flight and this one has {write_bytes}; "
                               f"the limit is {self.max_write_bytes} (limits.max_inflight_write_bytes)",
                               (c.write_bytes + write_bytes) / self.max_write_bytes)
        c.unary += 1
        c.write_bytes += write_bytes

    def leave_unary(self, write_bytes: int = 0) -> None:
        self.now.unary -= 1
        if write_bytes:
            self.now.write_bytes -= write_bytes
            self._wake()

    # --- streams ----------------------------------------------------------------------------------
    def enter_stream(self, session: bool) -> None:
        c = self.now
        if self.max_streams and c.streams >= self.max_streams:
            raise self._reject("streams", f"{c.streams} streams are open, the limit "
                               f"(limits.max_streams = {self.max_streams})", 5 * (c.streams + 1) / self.max_streams)
        if session and self.max_sessions and c.sessions >= self.max_sessions:
            raise self._reject("sessions", f"{c.sessions} sessions are open, the limit "
                               f"(limits.max_sessions = {self.max_sessions})", 5 * (c.sessions + 1) / self.max_sessions)
        c.streams += 1
        c.sessions += session

    def leave_stream(self, session: bool) -> None:
        self.now.streams -= 1
        self.now.sessions -= session

    # --- write bytes of streams -------------------------------------------------------------------
    def _wake(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    async def acquire_write(self, nbytes: int, timeout: float) -> None:
        """Charge ``nbytes`` of a stream message, waiting up to ``timeout`` s for room."""
        c = self.now
        if not self.max_write_bytes or not c.write_bytes or c.write_bytes + nbytes <= self.max_write_bytes:
            c.write_bytes += nbytes
            return
        t_end = time.monotonic() + timeout
        while c.write_bytes and c.write_bytes + nbytes > self.max_write_bytes:
            left = t_end - time.monotonic()
            if left <= 0:
                raise self._reject("inflight_write_bytes",
                                   f"{c.write_bytes} bytes of writes stayed in flight for {timeout:.1f} s and this "
                                   f"stream message has {nbytes}; the limit is {self.max_write_bytes} "
                                   "(limits.max_inflight_write_bytes)", (c.write_bytes + nbytes) / self.max_write_bytes)
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except asyncio.TimeoutError:
                pass
        c.write_bytes += nbytes

    def release_write(self, nbytes: int) -> None:
        if nbytes:
            self.now.write_bytes -= nbytes
            self._wake()


class StreamCharge:
    """The write bytes one stream holds: its last :data:`STREAM_WINDOW` messages."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.window: collections.deque[int] = collections.deque()

    async def add(self, nbytes: int, timeout: float) -> None:
        while len(self.window) >= STREAM_WINDOW:
            self.admission.release_write(self.window.popleft())
        await self.admission.acquire_write(nbytes, timeout)
        self.window.append(nbytes)

    def close(self) -> None:
        while self.window:
            self.admission.release_write(self.window.popleft())


# --- replies too large to send ----------------------------------------------------------------------
#: bytes each result takes in a SearchResponse at least / at most: an id (a packed varint, 1 to 10
#: bytes) and a distance (a packed float32); payloads add at least a tag and a length
ID_MIN_BYTES, ID_MAX_BYTES = 1, 10
PAYLOAD_MIN_BYTES = 2
REPLY_OVERHEAD = 64  # nq, k, field headers


def search_reply_lower_bound(nq: int, k: int, d: int, with_vectors: bool, with_payloads: bool) -> int:
    """The fewest bytes a SearchResponse of ``nq`` x ``k`` results can take, computable before the search."""
    per_result = ID_MIN_BYTES + 4 + (4 * d if with_vectors else 0) + (PAYLOAD_MIN_BYTES if with_payloads else 0)
    return REPLY_OVERHEAD + nq * k * per_result


def check_search_reply_estimate(max_message_bytes: int, nq: int, k: int, d: int, with_vectors: bool,
                                with_payloads: bool) -> None:
    """Before searching: refuse (:class:`ResourceExhausted`, permanent) a search whose reply cannot fit
    in one message even at its smallest, saying how to split it."""
    nbytes = search_reply_lower_bound(nq, k, d, with_vectors, with_payloads)
    if not max_message_bytes or nbytes <= max_message_bytes:
        return
    # the suggestion assumes the largest ids, so that following it works (payloads aside)
    result_max = ID_MAX_BYTES + 4 + (4 * d if with_vectors else 0) + (PAYLOAD_MIN_BYTES if with_payloads else 0)
    _refuse(nbytes, max_message_bytes, nq, k, with_vectors, with_payloads, k * result_max, result_max, True)


def check_search_reply(max_message_bytes: int, ids, payloads, d: int, with_vectors: bool) -> None:
    """After searching, before building the reply: refuse one that would not fit in one message (ids
    and payload texts are known now), saying how to split it."""
    import numpy as np

    ids = np.asarray(ids, np.uint64)
    if payloads is None and (not max_message_bytes or REPLY_OVERHEAD + ids.size * (
            ID_MAX_BYTES + 4 + (4 * d if with_vectors else 0)) <= max_message_bytes):
        return  # fits even with the longest ids (the common case: no need to count varint bytes)
    nq = ids.shape[0] if ids.ndim == 2 else 1
    ids = ids.reshape(nq, -1)
    k = ids.shape[1]
    # varint length of each id: 1 byte, plus one for each 7 bits past the first 7
    per_result = np.ones(ids.shape, np.int64)
    for i in range(1, 10):
        per_result += ids >= np.uint64(1 << (7 * i))
    per_result += 4 + (4 * d if with_vectors else 0)
    if payloads is not None:
        lens = np.fromiter((len(p.encode("utf-8")) if p else 0 for p in payloads), np.int64, count=len(payloads))
        per_result += lens.reshape(nq, k) + PAYLOAD_MIN_BYTES
    per_query = per_result.sum(axis=1)
    nbytes = REPLY_OVERHEAD + int(per_query.sum())
    if not max_message_bytes or nbytes <= max_message_bytes:
        return
    _refuse(nbytes, max_message_bytes, nq, k, with_vectors, payloads is not None, int(per_query.max()),
            int(per_result.max()), False)


def _refuse(nbytes: int, max_message_bytes: int, nq: int, k: int, with_vectors: bool, with_payloads: bool,
            query_bytes: int, result_bytes: int, before: bool) -> None:
    room = max(1, max_message_bytes - REPLY_OVERHEAD)
    fit = room // max(1, query_bytes)
    extras = [w for w, on in (("vectors", with_vectors), ("payloads", with_payloads)) if on]
    if fit >= 1:
        hint = f"split it into calls of at most {fit} {'query' if fit == 1 else 'queries'} (or lower k)"
    else:
        hint = f"lower k to at most {max(1, room // max(1, result_bytes))} (one query's results do not fit)"
    if extras:
        hint += f", or leave out {' and '.join(extras)}"
    what = f"{nq} queries x k = {k}" + (f", with {' and '.join(extras)}" if extras else "")
    raise ResourceExhausted(
        f"the reply to this search would take {'at least ' if before else ''}{nbytes} bytes ({what}), more "
        f"than the largest message of {max_message_bytes} bytes (limits.max_message_bytes); {hint}"
        + ("; nothing was searched" if before else ""))
