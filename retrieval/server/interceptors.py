"""The server interceptor: one wrapper around every RPC of every service.

For each call, in order:

1. **Request id**: the client's ``x-request-id`` metadata (first 64 characters) or a new one. It is
   set in a context variable, so every log line of the call carries it (:class:`RequestContextFilter`),
   and it is returned in the trailing metadata of failed calls and quoted in INTERNAL messages.
2. **Authentication** (:mod:`retrieval.server.auth`): missing / wrong API key -> ``UNAUTHENTICATED``,
   read-only key on a write -> ``PERMISSION_DENIED``; health checks are open.
3. **Malformed requests**: bytes that are not a valid message of the method's request type ->
   ``INVALID_ARGUMENT`` (gRPC alone would answer INTERNAL).
4. **Admission** (:mod:`retrieval.server.limits`): calls, streams, sessions and write bytes in flight;
   saturated -> ``RESOURCE_EXHAUSTED`` with trailing metadata ``retry-after-ms``.
5. **Errors -> statuses**, the one place: :class:`retrieval.errors.RetrievalError` subclasses map to
   their code with their message (plus ``retry-after-ms`` when they carry ``retry_after_ms``); a full
   disk (``ENOSPC`` / ``EDQUOT``, SQLite's "database or disk is full") and ``MemoryError`` (e.g. past
   ``limits.max_memory_bytes``) -> ``RESOURCE_EXHAUSTED``; anything else is logged with its traceback
   and answered ``INTERNAL``.
6. **Metrics and access log** (:mod:`retrieval.server.metrics`): requests, errors, latency per RPC,
   per-message latency on bidirectional streams; slow calls (> ``SLOW_S``) are always logged.

Every kind of handler grpc.aio accepts is served: unary-unary, unary-stream, stream-unary and
stream-stream, each as a coroutine, an async generator, a coroutine writing through ``context.write``
(grpc's health ``Watch``), a plain function or a sync generator (sync handlers reading a request stream
run on a worker thread). A handler that set a status with ``context.set_code`` and then raised keeps
that status (grpc's generated base classes answer UNIMPLEMENTED this way).

Cancelled calls and calls past their deadline: grpc.aio cancels the handler's task, so the work stops
at its next ``await`` (engines yield between chunks of long work, see ``limits.search_chunk``).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import json
import logging
import os
import time

import grpc

from retrieval.core.faults import is_disk_full
from retrieval.errors import InvalidArgument, RetrievalError
from retrieval.server import metrics
from retrieval.server.auth import Authenticator, KeyStore, is_read_method, split_method
from retrieval.server.limits import RETRY_AFTER_KEY, SESSION_METHODS, STREAM_WAIT_S, Admission, StreamCharge, retry_after_of

logger = logging.getLogger("retrieval.access")

_ids = itertools.count(1)
_PREFIX = f"{os.getpid():x}"
SLOW_S = 1.0
MAX_DETAILS = 1024  # longest status message sent (longer ones are cut)

#: The request id and method of the call the current task serves ("" outside calls).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
RPC_METHOD: contextvars.ContextVar[str] = contextvars.ContextVar("rpc_method", default="")


def _request_id(metadata) -> str:
    for key, value in metadata or ():
        if key == "x-request-id":
            return str(value)[:64]
    return f"{_PREFIX}-{next(_ids)}"


def new_request_id(given: str | None = None) -> str:
    """The request id of a call: ``given`` (a client's ``x-request-id``, first 64 characters) or a new
    one; shared by gRPC and the HTTP API (:mod:`retrieval.http`)."""
    return _request_id([("x-request-id", given)] if given else ())


# ------------------------------------------------------------------------------------------------
# Logging: request ids on every record, optional JSON lines
# ------------------------------------------------------------------------------------------------
class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``rpc`` (the call being served, or "") to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        if not hasattr(record, "rpc"):
            record.rpc = RPC_METHOD.get()
        return True


_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, rpc, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_") and value not in ("", None):
                out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(rid)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "")
        record.rid = f"[{rid}] " if rid and record.name != "retrieval.access" else ""
        return super().format(record)


# ------------------------------------------------------------------------------------------------
# Errors -> statuses
# ------------------------------------------------------------------------------------------------
DISK_FULL = "the disk holding the data folder is full; the write was not stored (free space and retry)"
OUT_OF_MEMORY = ("the server does not have the memory this request needs (see limits.max_memory_bytes); "
                 "make it smaller")


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str, int | None]:
    """(code, message, retry-after hint) for an exception raised by a servicer."""
    if isinstance(e, RetrievalError):
        return e.code, str(e), retry_after_of(e)
    if is_disk_full(e):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, DISK_FULL, None
    if isinstance(e, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, OUT_OF_MEMORY, None
    return grpc.StatusCode.INTERNAL, "", None


class _Malformed:
    """What the deserializer returns for bytes that are not a valid request message."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _safe_deserializer(deserialize):
    if deserialize is None:
        return None

    def des(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, RecursionError, ...
            return _Malformed(e)

    return des


class _Deny(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms


def _malformed(method: str) -> InvalidArgument:
    return InvalidArgument(f"the request is not a valid message for {method} (malformed protobuf)")


class _Call:
    """Book-keeping of one call: id, timing, final code; metrics and access log at the end."""

    __slots__ = ("method", "service", "name", "rid", "t0", "code", "tokens", "context", "stream")

    def __init__(self, method: str, service: str, name: str, context, stream: bool = False) -> None:
        self.method, self.service, self.name, self.context, self.stream = method, service, name, context, stream
        self.rid = _request_id(context.invocation_metadata())
        self.t0 = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.tokens = (REQUEST_ID.set(self.rid), RPC_METHOD.set(method))

    def cancelled(self) -> None:
        left = None
        try:
            left = self.context.time_remaining()
        except Exception:
            pass
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED

    async def fail(self, e: BaseException) -> None:
        """Abort the call with the status of ``e`` (raises grpc's AbortError)."""
        if isinstance(e, _Deny):
            code, msg, retry = e.code, e.message, e.retry_after_ms
        else:
            code, msg, retry = status_of(e)
            if code == grpc.StatusCode.INTERNAL and not isinstance(e, RetrievalError):
                # a handler that set its status and then raised (grpc's generated base classes do so for
                # methods a servicer does not implement: UNIMPLEMENTED, then NotImplementedError)
                set_code = self._servicer_code()
                if set_code is not None:
                    code, msg = set_code, self._servicer_details() or str(e)
                elif isinstance(e, NotImplementedError):
                    code, msg = grpc.StatusCode.UNIMPLEMENTED, f"{self.method} is not implemented by this server"
        md = [("x-request-id", self.rid)]
        if retry is not None:
            md.append((RETRY_AFTER_KEY, str(retry)))
        if code == grpc.StatusCode.INTERNAL:
            logger.error("%s %s -> INTERNAL", self.rid, self.method, exc_info=e)
            msg = f"internal error (request id {self.rid}); see the server log"
        elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            logger.warning("%s %s -> %s (peer %s): %s", self.rid, self.method, code.name, self.context.peer(), msg)
        else:
            logger.info("%s %s -> %s: %s", self.rid, self.method, code.name, msg)
        self.code = code
        if len(msg) > MAX_DETAILS:  # messages may quote client input; gRPC caps metadata at 8 KiB
            msg = msg[: MAX_DETAILS - 30] + f"... ({len(msg)} characters)"
        await self.context.abort(code, msg, trailing_metadata=tuple(md))

    def _servicer_code(self) -> grpc.StatusCode | None:
        """The non-OK code the handler set with ``context.set_code``, else None."""
        try:
            c = self.context.code()
        except Exception:
            return None
        if isinstance(c, int) and not isinstance(c, grpc.StatusCode):
            c = next((s for s in grpc.StatusCode if s.value[0] == c), None)
        return c if isinstance(c, grpc.StatusCode) and c != grpc.StatusCode.OK else None

    def _servicer_details(self) -> str:
        try:
            d = self.context.details()
        except Exception:
            return ""
        return d.decode(errors="replace") if isinstance(d, bytes) else str(d or "")

    def aborted_by_servicer(self) -> None:
        try:
            c = self.context.code()
            if isinstance(c, grpc.StatusCode):
                self.code = c
            elif isinstance(c, int):
                self.code = next((s for s in grpc.StatusCode if s.value[0] == c), grpc.StatusCode.UNKNOWN)
            else:
                self.code = grpc.StatusCode.UNKNOWN
        except Exception:
            self.code = grpc.StatusCode.UNKNOWN

    def finish(self, access_log: bool) -> None:
        dt = time.perf_counter() - self.t0
        code = self.code.name
        metrics.REQUESTS.labels(self.service, self.name, code).inc()
        if self.code != grpc.StatusCode.OK:
            metrics.ERRORS.labels(self.service, self.name, code).inc()
        metrics.LATENCY.labels(self.service, self.name).observe(dt)
        extra = {"rpc": self.method, "code": code, "duration_ms": round(dt * 1e3, 3), "request_id": self.rid}
        if dt > SLOW_S and self.code == grpc.StatusCode.OK and not self.stream:  # streams may live long
            logger.warning("%s %s OK slow %.3f s", self.rid, self.method, dt, extra=extra)
        elif access_log:
            logger.info("%s %s %s %.3f ms", self.rid, self.method, code, dt * 1e3, extra=extra)
        for var, tok in zip((REQUEST_ID, RPC_METHOD), self.tokens):
            try:
                var.reset(tok)
            except ValueError:  # reset from another context (a generator closed elsewhere)
                pass


class CallInterceptor(grpc.aio.ServerInterceptor):
    """See the module docstring. ``auth`` None: no keys; ``admission`` None: no limits."""

    def __init__(self, access_log: bool = False, auth: Authenticator | None = None,
                 admission: Admission | None = None) -> None:
        self.access_log = access_log
        self.auth = auth or Authenticator(KeyStore())
        self.admission = admission
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        method = details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return None
        wrapped = self._wrap(method, handler)
        self._cache[method] = wrapped
        return wrapped

    def _wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``h`` inside the call's bookkeeping (auth, admission, metrics, access log, error mapping)."""
        m = _Method(method, h, self)
        if h.unary_unary or h.stream_unary:
            return _wrap_unary(m, h)
        return _wrap_stream(m, h)


class _Method:
    """What the wrapper of one method needs, worked out once per method (not per call)."""

    def __init__(self, method: str, h: grpc.RpcMethodHandler, owner: CallInterceptor) -> None:
        self.method = method
        self.service, self.name = split_method(method)
        self.access = owner.access_log
        self.auth = owner.auth
        # health checks skip admission so probes answer even when the server is saturated
        self.admission = None if method.startswith("/grpc.health.") else owner.admission
        self.write = not is_read_method(method)
        self.session = method in SESSION_METHODS
        self.deser = _safe_deserializer(h.request_deserializer)

    def admit(self, call: _Call) -> None:
        verdict = self.auth.check(self.method, call.context.invocation_metadata())
        if verdict.code is not None:
            raise _Deny(verdict.code, verdict.message)


def _wrap_unary(m: _Method, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A unary-response handler (unary or client-streaming requests) in the call's bookkeeping."""
    inner = h.unary_unary or h.stream_unary
    streaming_in = h.stream_unary is not None
    open_gauge = metrics.OPEN_STREAMS.labels(m.service, m.name) if streaming_in else None
    admission, write, session, method = m.admission, m.write, m.session, m.method

    async def unary_response(request, context):
        call = _Call(method, m.service, m.name, context, streaming_in)
        if open_gauge is not None:
            open_gauge.inc()
        wb = 0
        admitted = False
        charge = None
        try:
            m.admit(call)
            if streaming_in:
                if admission is not None:
                    admission.enter_stream(session)
                    admitted = True
                    if write:
                        charge = StreamCharge(admission)
                request = _requests(request, method, charge, context)
            else:
                if isinstance(request, _Malformed):
                    raise _malformed(method)
                if admission is not None:
                    wb = request.ByteSize() if write else 0
                    admission.enter_unary(wb)
                    admitted = True
            return await _unary_result(inner, request, context, streaming_in)
        except asyncio.CancelledError:
            call.cancelled()
            raise
        except grpc.aio.AbortError:
            if call.code == grpc.StatusCode.OK:
                call.aborted_by_servicer()
            raise
        except Exception as e:
            await call.fail(e)
        finally:
            if open_gauge is not None:
                open_gauge.dec()
            if charge is not None:
                charge.close()
            if admitted:
                if streaming_in:
                    admission.leave_stream(session)
                else:
                    admission.leave_unary(wb)
            call.finish(m.access)

    make = grpc.stream_unary_rpc_method_handler if streaming_in else grpc.unary_unary_rpc_method_handler
    return make(unary_response, request_deserializer=m.deser, response_serializer=h.response_serializer)


def _wrap_stream(m: _Method, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A streaming-response handler (unary or streaming requests) in the call's bookkeeping.

    The wrapper is a coroutine writing through ``context.write``: it serves every kind of streaming
    handler (async generators, coroutines that write themselves such as grpc's health Watch, sync
    generators)."""
    inner = h.unary_stream or h.stream_stream
    streaming_in = h.stream_stream is not None
    hist = metrics.STREAM_MESSAGE_LATENCY.labels(m.service, m.name) if streaming_in else None
    open_gauge = metrics.OPEN_STREAMS.labels(m.service, m.name)
    admission, write, session, method = m.admission, m.write, m.session, m.method

    async def stream_response(request, context) -> None:
        call = _Call(method, m.service, m.name, context, True)
        admitted = False
        charge = None
        open_gauge.inc()
        try:
            m.admit(call)
            if admission is not None:
                admission.enter_stream(session)
                admitted = True
            arrivals: list[float] | None = None
            if streaming_in:
                if write and admission is not None:
                    charge = StreamCharge(admission)
                arrivals = []
                request = _requests(request, method, charge, context, arrivals)
            elif isinstance(request, _Malformed):
                raise _malformed(method)
            async for resp in _responses(inner, request, context, streaming_in):
                if arrivals:
                    hist.observe(time.perf_counter() - arrivals.pop(0))
                await context.write(resp)
        except asyncio.CancelledError:
            call.cancelled()
            raise
        except grpc.aio.AbortError:
            if call.code == grpc.StatusCode.OK:
                call.aborted_by_servicer()
            raise
        except Exception as e:
            await call.fail(e)
        finally:
            open_gauge.dec()
            if charge is not None:
                charge.close()
            if admitted:
                admission.leave_stream(session)
            call.finish(m.access)

    make = grpc.stream_stream_rpc_method_handler if streaming_in else grpc.unary_stream_rpc_method_handler
    return make(stream_response, request_deserializer=m.deser, response_serializer=h.response_serializer)


# ------------------------------------------------------------------------------------------------
# Calling the wrapped handler, whatever its kind
# ------------------------------------------------------------------------------------------------
# grpc.aio accepts, for each of the four kinds, a coroutine function / async generator function or a
# plain function / generator; the wrappers above are always async, so they call the handler the way
# grpc.aio would have: async handlers on the event loop, sync unary-request handlers on the event loop
# too (grpc.aio's default without a thread pool), sync stream-request handlers on a worker thread (they
# read the requests with a blocking iterator, which the event loop feeds).
_END = object()


def _is_async(fn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


async def _anext(it):
    return await it.__anext__()


def _blocking_requests(requests, loop: asyncio.AbstractEventLoop):
    """The async request stream as a blocking iterator, for a sync handler on a worker thread."""
    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(_anext(requests), loop).result()
        except StopAsyncIteration:
            return


async def _in_thread(fn, *args):
    ctx = contextvars.copy_context()  # the request id follows the call onto the thread
    return await asyncio.get_running_loop().run_in_executor(None, ctx.run, fn, *args)


async def _unary_result(inner, request, context, streaming_in: bool):
    if streaming_in and not _is_async(inner):
        return await _in_thread(inner, _blocking_requests(request, asyncio.get_running_loop()), context)
    result = inner(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _responses(inner, request, context, streaming_in: bool):
    """The handler's responses as an async iterator (nothing for a handler that writes them itself)."""
    if streaming_in and not _is_async(inner):
        blocking = _blocking_requests(request, asyncio.get_running_loop())
        it = await _in_thread(lambda: iter(inner(blocking, context) or ()))
        while (resp := await _in_thread(next, it, _END)) is not _END:
            yield resp
        return
    result = inner(request, context)
    if inspect.isawaitable(result):  # reader/writer API: the handler wrote its responses itself
        await result
        return
    if hasattr(result, "__aiter__"):
        async for resp in result:
            yield resp
    elif result is not None:  # a sync generator or any iterable, iterated on the event loop like grpc.aio
        for resp in result:
            yield resp


async def _requests(it, method: str, charge: StreamCharge | None, context, arrivals: list | None = None):
    """The request stream, checked message by message (malformed -> INVALID_ARGUMENT), with write
    bytes charged (waiting for room: backpressure) and arrival times noted for latency metrics."""
    async for m in it:
        if isinstance(m, _Malformed):
            raise _malformed(method)
        if charge is not None:
            left = context.time_remaining()
            await charge.add(m.ByteSize(), STREAM_WAIT_S if left is None else max(0.0, min(STREAM_WAIT_S, left)))
        if arrivals is not None:
            if len(arrivals) >= 64:  # a stream answering fewer messages than it receives
                del arrivals[0]
            arrivals.append(time.perf_counter())
        yield m
