"""gRPC status codes -> HTTP status codes, in one table, and the JSON error body.

Errors reach HTTP clients with the sentence gRPC clients get (:func:`retrieval.server.interceptors.status_of`
turns exceptions into ``(code, message, retry-after hint)`` for both), as::

    {"error": {"code": "INVALID_ARGUMENT", "message": "queries row 0 contains NaN or infinity",
               "request_id": "1f3a-17"}}

with the HTTP status from :data:`HTTP_STATUS` (the mapping of grpc-gateway and Google's API design
guide), ``X-Request-Id`` on every response and, when the server is saturated (``RESOURCE_EXHAUSTED``
with a retry-after hint), ``429`` with ``Retry-After`` (whole seconds, rounded up) and
``Retry-After-Ms``. A ``RESOURCE_EXHAUSTED`` without a hint (``k`` past ``limits.max_k``, a full disk)
is 429 without ``Retry-After``: retrying the same request cannot help. A request body larger than
``limits.max_message_bytes`` is ``413``.
"""

from __future__ import annotations

import logging
import math

import grpc
from fastapi.responses import JSONResponse

from retrieval.errors import RetrievalError
from retrieval.server.interceptors import MAX_DETAILS, REQUEST_ID, status_of

logger = logging.getLogger("retrieval.access")

S = grpc.StatusCode
#: The one place gRPC codes become HTTP codes.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    S.OK: 200,
    S.CANCELLED: 499,
    S.UNKNOWN: 500,
    S.INVALID_ARGUMENT: 400,
    S.DEADLINE_EXCEEDED: 504,
    S.NOT_FOUND: 404,
    S.ALREADY_EXISTS: 409,
    S.PERMISSION_DENIED: 403,
    S.UNAUTHENTICATED: 401,
    S.RESOURCE_EXHAUSTED: 429,
    S.FAILED_PRECONDITION: 400,
    S.ABORTED: 409,
    S.OUT_OF_RANGE: 400,
    S.UNIMPLEMENTED: 501,
    S.INTERNAL: 500,
    S.UNAVAILABLE: 503,
    S.DATA_LOSS: 500,
}

BODY_TOO_LARGE = 413


class HttpError(RetrievalError):
    """An error raised by the HTTP layer itself, with its gRPC code (and HTTP status when it has its own)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


def error_of(e: BaseException) -> tuple[grpc.StatusCode, str, int | None, int]:
    """``(gRPC code, message, retry-after ms, HTTP status)`` for an exception; INTERNAL errors are logged
    with their traceback and answered with a sentence quoting the request id."""
    code, msg, retry = status_of(e)
    if code == S.INTERNAL and not isinstance(e, RetrievalError):
        rid = REQUEST_ID.get()
        logger.error("%s HTTP -> INTERNAL", rid, exc_info=e)
        msg = f"internal error (request id {rid}); see the server log"
    elif code in (S.UNAUTHENTICATED, S.PERMISSION_DENIED):
        logger.warning("%s HTTP %s: %s", REQUEST_ID.get(), code.name, msg)
    if len(msg) > MAX_DETAILS:
        msg = msg[: MAX_DETAILS - 30] + f"... ({len(msg)} characters)"
    status = getattr(e, "http_status", None) or HTTP_STATUS.get(code, 500)
    return code, msg, retry, status


def error_response(e: BaseException) -> JSONResponse:
    code, msg, retry, status = error_of(e)
    rid = REQUEST_ID.get()
    headers = {}  # X-Request-Id: added to every response by retrieval.http.gate.HttpMiddleware
    if retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry / 1000)))
        headers["Retry-After-Ms"] = str(retry)
    return JSONResponse({"error": {"code": code.name, "message": msg, "request_id": rid}}, status_code=status,
                        headers=headers)


def validation_message(errors: list[dict]) -> str:
    """A sentence for FastAPI / pydantic validation errors: where, what was expected, what came."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        kind = err.get("type", "")
        if kind == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg', ''))})")
            continue
        if kind == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
            continue
        if kind == "missing":
            parts.append(f"{loc} is required")
            continue
        got = err.get("input")
        shown = repr(got)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        parts.append(f"{loc}: {err.get('msg', 'invalid')} (got {shown})")
    more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more
