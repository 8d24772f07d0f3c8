"""The sync client's transport: the channel, the stubs, and the one path every call takes.

:meth:`Transport._call` is the only place a call is made, a deadline set, a busy refusal retried and
an error mapped: unary calls, long calls (``floor``: a longer default deadline) and client-streaming
calls (``retry=False``: a request iterator cannot be replayed) go through it, and server-streaming
calls through :meth:`Transport._server_stream`, which shares its error mapping (:meth:`_error`).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import grpc

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.v1 import (
    collections_pb2_grpc,
    crossencoder_pb2_grpc,
    drafts_pb2_grpc,
    graphs_pb2_grpc,
    jobs_pb2_grpc,
    points_pb2_grpc,
    search_pb2_grpc,
)

LONG_CALL_S = 600.0  # the default deadline of calls that do heavy work on the server (builds, imports)
NO_DEADLINE = float("inf")  # ``floor`` of a call without a deadline unless the caller gives one


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata) -> None:
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
        self.metadata = metadata


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call."""

    def __init__(self, key: str) -> None:
        self._md = ("authorization", f"Bearer {key}")

    def _details(self, d):
        return _Details(d, [*(d.metadata or ()), self._md])

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)

    def intercept_stream_stream(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)


def make_channel(address: str, api_key: str | None = None, tls: bool | None = None, root_certificates=None,
                 client_cert=None, client_key=None, server_name: str | None = None, options=()) -> grpc.Channel:
    """A channel with the client's security settings (see :class:`Client`); usable for any stub."""
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    creds = cc.tls_credentials(tls, root_certificates, client_cert, client_key)
    if creds is not None:
        channel = grpc.secure_channel(address, creds, options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    if api_key:
        channel = grpc.intercept_channel(channel, _KeyInterceptor(api_key))
    return channel


class EngineView:
    """``client.vectors``, ``client.jobs``, ...: the methods of one engine of a client, under their flat
    names (``client.vectors.search`` is ``client.search``). Works for Client and AsyncClient alike."""

    __slots__ = ("_client", "_names", "_engine")

    def __init__(self, client, engine: str, names: frozenset[str]) -> None:
        self._client, self._engine, self._names = client, engine, names

    def __getattr__(self, name: str):
        if name in self._names:
            return getattr(self._client, name)
        raise AttributeError(f"the {self._engine} engine has no method {name!r}; it has: {', '.join(sorted(self._names))}")

    def __dir__(self):
        return sorted(self._names)

    def __repr__(self) -> str:
        return f"<{self._engine} methods of {self._client!r}>"


class engine:
    """Class attribute: ``vectors = engine(VectorsMixin)`` gives ``client.vectors``, an :class:`EngineView`
    of the mixin's public methods."""

    def __init__(self, *mixins: type) -> None:
        self._names = frozenset(n for m in mixins for n, v in vars(m).items()
                                if not n.startswith("_") and callable(v))
        self._engine = ""

    def __set_name__(self, owner, name: str) -> None:
        self._engine = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return EngineView(obj, self._engine, self._names)


class Transport:
    """A connection to one server: the channel, the stubs, deadlines, busy retries, error mapping.

    ``timeout``: seconds per call (default 30); ``max_busy_retries``: retries of a call the saturated
    server refused with a retry-after hint (nothing was done: the retry is safe)."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024, channel: grpc.Channel | None = None, *,
                 api_key: str | None = None, api_key_file: str | os.PathLike | None = None,
                 tls: bool | None = None, root_certificates: bytes | str | os.PathLike | None = None,
                 client_cert: bytes | str | os.PathLike | None = None,
                 client_key: bytes | str | os.PathLike | None = None, server_name: str | None = None,
                 max_busy_retries: int = 5) -> None:
        self.address = address
        self.timeout = timeout
        self.max_busy_retries = max_busy_retries
        self._channel = channel or make_channel(
            address, cc.read_key(api_key, api_key_file), tls, root_certificates, client_cert, client_key,
            server_name, options=cc.channel_options(max_message_bytes))
        self._collections = collections_pb2_grpc.CollectionsStub(self._channel)
        self._points = points_pb2_grpc.PointsStub(self._channel)
        self._search = search_pb2_grpc.SearchStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobsStub(self._channel)
        self._drafts = drafts_pb2_grpc.DraftsStub(self._channel)
        self._ce = crossencoder_pb2_grpc.CrossEncoderStub(self._channel)
        self._graphs = graphs_pb2_grpc.GraphsStub(self._channel)
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel. Idempotent; calls in flight in other threads end with
        :class:`errors.Cancelled`, later calls raise it at once."""
        self._closed = True
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server answers (raises Unavailable after ``timeout`` seconds)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(f"no server answered at {self.address} within {timeout} s") from None

    # --- the one call path -------------------------------------------------------------------------
    def _deadline(self, timeout: float | None, floor: float = 0.0) -> float | None:
        """Seconds for a call: ``timeout`` when given, else the client's, at least ``floor``
        (:data:`NO_DEADLINE`: none)."""
        if timeout is not None:
            return timeout
        return None if floor == NO_DEADLINE else max(self.timeout, floor)

    def _error(self, e: grpc.RpcError) -> errors.RetrievalError:
        """The package's exception for a failed call (``Cancelled`` once this client is closed)."""
        return cc.closed_error() if self._closed else cc.error_from_rpc(e)

    def _call(self, fn, request, timeout: float | None = None, *, floor: float = 0.0, retry: bool = True):
        """``fn(request)`` with the deadline :meth:`_deadline` ``(timeout, floor)``, retried after the
        server's hint while it refuses because it is busy (``max_busy_retries`` times, within the
        deadline; not with ``retry=False``: a request iterator cannot be replayed)."""
        budget = self._deadline(timeout, floor)
        t_end = None if budget is None else time.monotonic() + budget
        for attempt in range(self.max_busy_retries + 1):
            if self._closed:
                raise cc.closed_error()
            try:
                return fn(request, timeout=None if t_end is None else max(0.001, t_end - time.monotonic()))
            except grpc.RpcError as e:
                wait = cc.retry_after_s(e) if retry and not self._closed else None
                if wait is None or attempt == self.max_busy_retries:
                    raise self._error(e) from None
                wait *= random.uniform(1.0, 1.5)  # spread the retries of clients refused together
                if t_end is not None and time.monotonic() + wait >= t_end:
                    raise self._error(e) from None
                time.sleep(wait)
            except ValueError:
                if self._closed:  # "Cannot invoke RPC on closed channel!"
                    raise cc.closed_error() from None
                raise
        raise AssertionError("unreachable")

    def _stream_call(self, fn, request_iterator, timeout: float | None):
        """A client-streaming call: :meth:`_call` without busy retries, no deadline unless ``timeout``."""
        return self._call(fn, request_iterator, timeout, floor=NO_DEADLINE, retry=False)

    def _server_stream(self, fn, request, timeout: float | None = None, *, floor: float = NO_DEADLINE) -> Iterator:
        """The messages of a server-streaming call; the call is cancelled when the caller stops early."""
        if self._closed:
            raise cc.closed_error()
        try:
            call = fn(request, timeout=self._deadline(timeout, floor))
        except ValueError:  # "Cannot invoke RPC on closed channel!"
            raise cc.closed_error() from None
        try:
            yield from call
        except grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()  # no-op when the stream ended; ends it when the caller stopped early
