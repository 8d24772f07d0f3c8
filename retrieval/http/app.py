"""The FastAPI application: routes, error handlers, the dashboard's files, health and status.

``build_app(handle, max_body_bytes, access_log)`` makes the ASGI app for one server; the routes call
the gRPC servicers held by ``handle`` (:class:`retrieval.http.common.Handle`). Open without a key:
``/healthz``, the dashboard's page and files (``/``, ``/static/...``) and the API description
(``/openapi.json``, ``/docs``); everything under ``/v1/`` needs a key when the server has keys.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from grpc_health.v1 import health_pb2
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval.errors import RetrievalError
from retrieval.http import engines, jobs, vectors
from retrieval.http.common import Handle, handle
from retrieval.http.errors import HttpError, error_response, validation_message
from retrieval.http.gate import HTTP_SERVICE, HttpMiddleware

STATIC = Path(__file__).resolve().parent / "static"
_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


def _health(h: Handle) -> dict:
    statuses = h.health() if h.health is not None else {"": health_pb2.HealthCheckResponse.SERVING}
    services = {name or "server": _NAMES.get(st, str(st)) for name, st in sorted(statuses.items())}
    return {"status": services.get("server", "UNKNOWN"), "services": services}


def build_app(h: Handle, max_body_bytes: int, access_log: bool = False):
    app = FastAPI(title="retrieval HTTP API",
                  description="The JSON API beside gRPC: the same engines, keys, limits and error sentences "
                              "(docs/http.md). Send the API key as `Authorization: Bearer <key>` or `api-key`.",
                  version="1", docs_url="/docs", redoc_url=None)
    app.state.handle = h

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        from retrieval.errors import InvalidArgument

        return error_response(InvalidArgument(validation_message(list(exc.errors()))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        import grpc

        code = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}.get(
            exc.status_code, grpc.StatusCode.INVALID_ARGUMENT)
        msg = (f"no such route: {request.method} {request.url.path} (the API is under /v1/, described at /docs)"
               if exc.status_code in (404, 405) else str(exc.detail))
        return error_response(HttpError(code, msg, exc.status_code))

    @app.exception_handler(RetrievalError)
    async def _error(request: Request, exc: RetrievalError):
        return error_response(exc)

    # anything else (a full disk, MemoryError, a bug): Starlette answers it from its outermost layer and
    # re-raises it, which HttpMiddleware then swallows (error_response has logged it)
    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception):
        return error_response(exc)

    app.include_router(vectors.router)
    app.include_router(jobs.router)
    app.include_router(engines.router)

    @app.get("/healthz", tags=["status"], summary="Health per service (open, like gRPC health checking)")
    async def healthz(request: Request):
        out = _health(handle(request))
        return JSONResponse(out, status_code=200 if out["status"] == "SERVING" else 503)

    @app.get("/v1/status", tags=["status"], summary="Health per service, admission counters, collections and "
             "jobs by state")
    async def status(request: Request):
        h = handle(request)
        h.gate.check(request.headers, f"/{HTTP_SERVICE}/Status")
        out = _health(h)
        adm = h.gate.admission
        if adm is not None:
            c = adm.now
            out["inflight"] = {"unary": c.unary, "streams": c.streams, "sessions": c.sessions,
                               "write_bytes": c.write_bytes, "rejected": c.rejected}
        return out

    @app.get("/v1/metrics", tags=["status"], summary="The server's Prometheus metrics (text format)",
             response_class=PlainTextResponse)
    async def metrics_text(request: Request):
        from retrieval.server import metrics

        h = handle(request)
        h.gate.check(request.headers, f"/{HTTP_SERVICE}/Metrics")
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return HttpMiddleware(app, max_body_bytes, access_log)
