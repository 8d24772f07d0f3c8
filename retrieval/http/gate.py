"""What every HTTP API call passes, the counterpart of the gRPC interceptor, built from its parts.

:class:`Gate` runs one servicer method for a route, in the order of
:class:`retrieval.server.interceptors.CallInterceptor`: API key check (:class:`retrieval.server.auth.
Authenticator`, with the gRPC method the route stands for, so read-only keys are refused on the same
writes), admission (:class:`retrieval.server.limits.Admission`, the same counters as gRPC calls),
the call, and per-RPC metrics under the gRPC service / method labels (so ``retrieval status`` and the
dashboard count HTTP calls too). Errors propagate as exceptions; :mod:`retrieval.http.errors` answers them.

:class:`HttpMiddleware` (plain ASGI, so context variables reach the handlers) gives every request a
request id (``X-Request-Id`` in and out, on every log line of the call), refuses bodies past the limit
(413), and records ``retrieval_http_requests_total{route,status}`` and
``retrieval_http_request_duration_seconds{route}``.

Thread-safety: used on the server's event loop only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc

from retrieval.http.errors import BODY_TOO_LARGE, HttpError, error_of
from retrieval.server import metrics
from retrieval.server.auth import Authenticator, is_read_method, register_read_methods, split_method
from retrieval.server.interceptors import REQUEST_ID, RPC_METHOD, SLOW_S, new_request_id
from retrieval.server.limits import Admission

logger = logging.getLogger("retrieval.access")

#: Pseudo-service of the HTTP-only routes that read server state (status, metrics): reads for API keys.
HTTP_SERVICE = "retrieval.v1.Http"
register_read_methods(HTTP_SERVICE, {"Status", "Metrics"})

HTTP_REQUESTS = metrics.counter("retrieval_http_requests_total", "HTTP API requests finished", ("route", "status"))
HTTP_LATENCY = metrics.histogram("retrieval_http_request_duration_seconds", "HTTP API request duration",
                                 ("route",))


def metadata_of(headers) -> list[tuple[str, str]]:
    """The gRPC-style metadata an HTTP request's key headers stand for: ``Authorization: Bearer <key>``,
    ``api-key: <key>`` or ``x-api-key: <key>``."""
    md = []
    if "authorization" in headers:
        md.append(("authorization", headers["authorization"]))
    key = headers.get("api-key") or headers.get("x-api-key")
    if key is not None:
        md.append(("x-api-key", key))
    return md


class Gate:
    def __init__(self, auth: Authenticator, admission: Admission | None) -> None:
        self.auth = auth
        self.admission = admission

    def check(self, headers, method: str) -> None:
        """Raise (UNAUTHENTICATED / PERMISSION_DENIED) unless the request's key may call ``method``."""
        verdict = self.auth.check(method, metadata_of(headers))
        if verdict.code is not None:
            raise HttpError(verdict.code, verdict.message)

    async def call(self, headers, method: str, fn, request):
        """``await fn(request, None)`` (a servicer method) as the gRPC method ``/pkg.Service/Method``."""
        service, name = split_method(method)
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        RPC_METHOD.set(method)
        try:
            self.check(headers, method)
            wb = request.ByteSize() if request is not None and not is_read_method(method) else 0
            if self.admission is not None:
                self.admission.enter_unary(wb)
            try:
                return await fn(request, None)
            finally:
                if self.admission is not None:
                    self.admission.leave_unary(wb)
        except Exception as e:
            code = error_of_code(e)
            raise
        finally:
            observe(service, name, code, time.perf_counter() - t0)

    def stream(self, headers, method: str):
        """Admission of a long-lived response (a server-sent event stream) as the gRPC stream ``method``;
        a context manager."""
        self.check(headers, method)
        return _Stream(self.admission, method)


def error_of_code(e: BaseException) -> grpc.StatusCode:
    from retrieval.server.interceptors import status_of

    return status_of(e)[0]


def observe(service: str, name: str, code: grpc.StatusCode, dt: float) -> None:
    metrics.REQUESTS.labels(service, name, code.name).inc()
    if code != grpc.StatusCode.OK:
        metrics.ERRORS.labels(service, name, code.name).inc()
    metrics.LATENCY.labels(service, name).observe(dt)


class _Stream:
    def __init__(self, admission: Admission | None, method: str) -> None:
        self.admission = admission
        self.service, self.name = split_method(method)
        self.t0 = 0.0

    def __enter__(self):
        if self.admission is not None:
            self.admission.enter_stream(False)
        metrics.OPEN_STREAMS.labels(self.service, self.name).inc()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        metrics.OPEN_STREAMS.labels(self.service, self.name).dec()
        if self.admission is not None:
            self.admission.leave_stream(False)
        if exc[0] is None:
            code = grpc.StatusCode.OK
        elif issubclass(exc[0], (asyncio.CancelledError, GeneratorExit)):  # the client went away
            code = grpc.StatusCode.CANCELLED
        else:
            code = error_of_code(exc[1])
        observe(self.service, self.name, code, time.perf_counter() - self.t0)
        return False


class BodyTooLarge(HttpError):
    def __init__(self, limit: int, size: int | None = None) -> None:
        what = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the request body has {what}, more than the largest message of {limit} bytes "
                         "(limits.max_message_bytes); send fewer points or queries per call", BODY_TOO_LARGE)


class HttpMiddleware:
    """Request ids, the body-size limit, HTTP metrics and the access log (see the module docstring)."""

    def __init__(self, app, max_body_bytes: int, access_log: bool = False) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if scope.get("method") in ("POST", "PUT", "PATCH") and "json" not in headers.get("content-type", ""):
            # the API's bodies are JSON whatever the client declared (curl -d sends a form type)
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        rid = new_request_id(headers.get("x-request-id"))
        tokens = (REQUEST_ID.set(rid), RPC_METHOD.set(""))
        t0 = time.perf_counter()
        status = [500]
        started = [False]
        over = [False]
        limit = self.max_body
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        try:
            if limit and declared > limit:
                await _drain(receive, 0, DRAIN_BYTES)
                await _send_error(send, BodyTooLarge(limit, declared))
                status[0] = BODY_TOO_LARGE
                return
            seen = [0]

            async def counted_receive():
                msg = await receive()
                if msg["type"] == "http.request":
                    seen[0] += len(msg.get("body", b""))
                    if limit and seen[0] > limit:
                        # answered here: the app would turn any error raised while it parses into a 400
                        err = BodyTooLarge(limit)
                        if not started[0]:
                            started[0] = over[0] = True
                            status[0] = BODY_TOO_LARGE
                            if msg.get("more_body", False):
                                await _drain(receive, seen[0], DRAIN_BYTES)
                            await _send_error(send, err)
                        raise err
                return msg

            async def send_with_id(msg):
                if over[0]:  # the 413 went out already
                    return
                if msg["type"] == "http.response.start":
                    status[0] = msg["status"]
                    started[0] = True
                    msg = dict(msg)
                    msg["headers"] = [*msg.get("headers", ()), (b"x-request-id", rid.encode("latin-1"))]
                await send(msg)

            try:
                await self.app(scope, counted_receive, send_with_id)
            except Exception as e:  # noqa: BLE001  (Starlette re-raises what it answered: already logged)
                if not started[0]:
                    await _send_error(send, e)
                    status[0] = error_of(e)[3]
        finally:
            dt = time.perf_counter() - t0
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope.get("path", "").startswith("/static/")
                                                    else "other")
            HTTP_REQUESTS.labels(path, str(status[0])).inc()
            HTTP_LATENCY.labels(path).observe(dt)
            extra = {"rpc": f"HTTP {scope.get('method')} {path}", "code": str(status[0]),
                     "duration_ms": round(dt * 1e3, 3), "request_id": rid}
            if self.access_log or (dt > SLOW_S and not path.endswith("/events")):
                logger.info("%s HTTP %s %s %s %.3f ms", rid, scope.get("method"), scope.get("path"), status[0],
                            dt * 1e3, extra=extra)
            for var, tok in zip((REQUEST_ID, RPC_METHOD), tokens):
                try:
                    var.reset(tok)
                except ValueError:
                    pass


#: a refused body is read (and dropped) up to this many bytes before the 413 goes out: closing a socket
#: with unread data resets the connection, and the client would lose the answer
DRAIN_BYTES = 256 << 20


async def _drain(receive, seen: int, cap: int) -> None:
    while seen <= cap:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


async def _send_error(send, e: BaseException) -> None:
    code, msg, _retry, status = error_of(e)
    body = json.dumps({"error": {"code": code.name, "message": msg, "request_id": REQUEST_ID.get()}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", REQUEST_ID.get().encode("latin-1")), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
