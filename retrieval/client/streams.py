"""The search streams of a sync client (:class:`_StreamPool`) and the request iterator of its
client-streaming calls (:class:`_Requests`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.v1 import search_pb2, search_pb2_grpc


class _Stream:
    """A long-lived SearchStream: one request in, one response out, in order. Used by one thread at a
    time (the pool hands it out)."""

    def __init__(self, stub: search_pb2_grpc.SearchStub) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = stub.SearchStream(iter(self._q.get, None), timeout=None)

    def call(self, request: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
        self._q.put(request)
        return next(self._responses)

    def close(self) -> None:
        self._q.put(None)
        try:
            self._responses.cancel()
        except Exception:
            pass


class _StreamPool:
    """The search streams of one Client, at most ``size`` open. :meth:`take` hands a thread an idle
    stream (or opens one) for one request / response, :meth:`give_back` returns it; when all ``size``
    are busy :meth:`take` returns None (the caller makes a unary call instead). Thread-safe: the lock
    is held only to move streams between the idle list and the callers, never across a call."""

    def __init__(self, stub: search_pb2_grpc.SearchStub, size: int) -> None:
        self._stub, self.size = stub, size
        self._lock = threading.Lock()
        self._idle: list[_Stream] = []
        self._open: set[_Stream] = set()
        self._opening = 0
        self.closed = False

    def take(self, fresh: bool = False) -> _Stream | None:
        """An idle stream, or (``fresh``, or none idle) a new one while fewer than ``size`` are open."""
        with self._lock:
            if self.closed:
                raise cc.closed_error()
            if self._idle and not fresh:
                return self._idle.pop()
            if len(self._open) + self._opening >= self.size:
                return None
            self._opening += 1
        try:
            s = _Stream(self._stub)  # starts the call; does not wait for the server
        except ValueError:  # "Cannot invoke RPC on closed channel!"
            with self._lock:
                self._opening -= 1
            raise cc.closed_error() from None
        with self._lock:
            self._opening -= 1
            if not self.closed:
                self._open.add(s)
                return s
        s.close()
        raise cc.closed_error()

    def give_back(self, s: _Stream) -> None:
        with self._lock:
            if not self.closed and s in self._open:
                self._idle.append(s)
                return
        s.close()

    def drop(self, s: _Stream, idle_too: bool = False) -> None:
        """Close a broken stream; ``idle_too``: and the idle ones (the connection broke: they are dead too)."""
        with self._lock:
            self._open.discard(s)
            dead = [s]
            if idle_too:
                dead += self._idle
                self._open.difference_update(self._idle)
                self._idle = []
        for d in dead:
            d.close()

    def close(self) -> None:
        """Close every stream, the busy ones too: their callers get Cancelled."""
        with self._lock:
            self.closed = True
            dead, self._open, self._idle = list(self._open), set(), []
        for d in dead:
            d.close()


class _Requests:
    """A request iterator for a client-streaming call that remembers an exception raised while
    building requests (gRPC only logs "Exception iterating requests!" and cancels the call), so the
    caller gets that exception instead of a bare CANCELLED."""

    def __init__(self, it: Iterable) -> None:
        self._it = it
        self.error: BaseException | None = None

    def __iter__(self):
        try:
            yield from self._it
        except Exception as e:
            self.error = e
            raise

    def call(self, client, fn, timeout: float | None):
        try:
            return client._stream_call(fn, iter(self), timeout)
        except errors.RetrievalError:
            if self.error is not None:
                raise self.error from None
            raise
