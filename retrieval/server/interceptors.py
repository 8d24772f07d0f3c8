"""Server interceptor: request ids, access log, and the one place domain errors become statuses.

Every RPC gets a request id (the client's ``x-request-id`` metadata, or a new one); it appears in
the log lines of the call and in INTERNAL error messages, so a user can quote it. :class:`retrieval.errors.RetrievalError`
subclasses map to their status code with their message; anything else is logged with its traceback
and answered ``INTERNAL``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

import grpc

from retrieval.errors import RetrievalError

logger = logging.getLogger("retrieval.access")

_ids = itertools.count(1)
_PREFIX = f"{os.getpid():x}"
SLOW_S = 1.0


def _request_id(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)[:64]
    return f"{_PREFIX}-{next(_ids)}"


async def _fail(context, method: str, rid: str, e: BaseException) -> None:
    if isinstance(e, RetrievalError):
        logger.info("%s %s -> %s: %s", rid, method, e.code.name, e)
        await context.abort(e.code, str(e))
    logger.error("%s %s -> INTERNAL", rid, method, exc_info=e)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid}); see the server log")


def _log_done(method: str, rid: str, t0: float, access_log: bool) -> None:
    dt = time.perf_counter() - t0
    if dt > SLOW_S:
        logger.warning("%s %s OK slow %.3f s", rid, method, dt)
    elif access_log:
        logger.info("%s %s OK %.3f ms", rid, method, dt * 1e3)


class ErrorAndLogInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, access_log: bool = False) -> None:
        self.access_log = access_log
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        method = details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        wrapped = self._wrap(method, handler)
        self._cache[method] = wrapped
        return wrapped

    def _wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        access = self.access_log
        if h.unary_unary or h.stream_unary:
            inner = h.unary_unary or h.stream_unary

            async def unary_response(request, context):
                rid = _request_id(context)
                t0 = time.perf_counter()
                try:
                    resp = await inner(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as e:
                    await _fail(context, method, rid, e)
                _log_done(method, rid, t0, access)
                return resp

            make = grpc.unary_unary_rpc_method_handler if h.unary_unary else grpc.stream_unary_rpc_method_handler
            return make(unary_response, request_deserializer=h.request_deserializer,
                        response_serializer=h.response_serializer)

        inner = h.unary_stream or h.stream_stream

        async def stream_response(request, context):
            rid = _request_id(context)
            t0 = time.perf_counter()
            try:
                async for resp in inner(request, context):
                    yield resp
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                await _fail(context, method, rid, e)
            _log_done(method, rid, t0, access)

        make = grpc.unary_stream_rpc_method_handler if h.unary_stream else grpc.stream_stream_rpc_method_handler
        return make(stream_response, request_deserializer=h.request_deserializer,
                    response_serializer=h.response_serializer)
