"""Serving the HTTP API with uvicorn inside the server's own asyncio loop.

:class:`HttpServer` binds its socket itself (so a port in use is a start-up error, and port 0's
choice is known at once), runs ``uvicorn.Server.serve`` as a task on the running loop, and is stopped
from the server's shutdown path (:func:`retrieval.server.app.serve`). It listens on ``host`` (the gRPC
address), so :func:`retrieval.server.auth.check_startup` has already refused a reachable address without
keys; with ``security.tls_cert_file`` it serves HTTPS with the same certificate, and with
``tls_client_ca_file`` requires client certificates (mutual TLS), like gRPC.

uvicorn's own signal handling is turned off: the server's loop owns SIGTERM / SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from retrieval.errors import FailedPrecondition
from retrieval.http.common import Handle
from retrieval.http.gate import Gate

logger = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    h = host.strip().strip("[]")
    infos = socket.getaddrinfo(h or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, ctx, authenticator, admission, health=None) -> None:
        """``ctx``: the server's :class:`retrieval.server.services.ServerContext` (engines); ``health``:
        ``() -> {service: status}``."""
        from retrieval.server.crossencoder_servicer import CrossEncoderServicer
        from retrieval.server.drafts_servicer import DraftsServicer
        from retrieval.server.graphs_servicer import GraphsServicer
        from retrieval.server.jobs_servicer import JobsServicer
        from retrieval.server.vectors_servicer import CollectionsServicer, PointsServicer, SearchServicer

        s = ctx.settings
        ex = ctx.extras
        self.settings = s
        self.handle = Handle(
            gate=Gate(authenticator, admission),
            collections=CollectionsServicer(ctx.collections, s, ctx.data_dir),
            points=PointsServicer(ctx.collections),
            search=SearchServicer(ctx.collections, s.limits.max_message_bytes),
            jobs=JobsServicer(ctx.jobs),
            graphs=GraphsServicer(ex["graphs"], ctx.jobs, ctx.settings.limits) if ex.get("graphs") is not None else None,
            crossencoder=(CrossEncoderServicer(ex["crossencoder"], ctx.jobs)
                          if ex.get("crossencoder") is not None else None),
            drafts=DraftsServicer(ex["drafts"], ctx.jobs) if ex.get("drafts") is not None else None,
            health=health, settings=s)
        self._server = None
        self._task: asyncio.Task | None = None
        self.url = ""

    async def start(self) -> str:
        """Bind and start serving; returns the base URL (``http://127.0.0.1:8080``)."""
        import uvicorn

        from retrieval.core.net import bind_address
        from retrieval.http.app import build_app

        s = self.settings
        try:
            sock = _bind(s.host, s.http_port)
        except OSError as e:
            raise FailedPrecondition(f"cannot serve HTTP on {bind_address(s.host, s.http_port)}: "
                                     f"{e.strerror or e}") from None
        port = sock.getsockname()[1]
        sec = s.security
        tls = {}
        if sec.tls_cert_file is not None:
            import ssl

            tls = {"ssl_certfile": str(sec.tls_cert_file), "ssl_keyfile": str(sec.tls_key_file)}
            if sec.tls_client_ca_file is not None:
                tls.update(ssl_ca_certs=str(sec.tls_client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        app = build_app(self.handle, s.limits.max_message_bytes, s.access_log)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=max(1, int(s.grace_s)), **tls)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-server")
        while not self._server.started:  # startup: ssl context, listening
            if self._task.done():
                sock.close()
                exc = self._task.exception()
                raise FailedPrecondition(f"the HTTP server did not start: {exc or 'it exited'}")
            await asyncio.sleep(0.01)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://{bind_address(s.host, port)}"
        logger.info("HTTP API and dashboard on %s/", self.url)
        return self.url

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s + 2)
        except TimeoutError:  # connections that stayed open (event streams): close them
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        except Exception:
            logger.exception("the HTTP server failed while stopping")


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the server's loop handles SIGTERM / SIGINT (retrieval.server.app)
            yield

        def install_signal_handlers(self) -> None:  # older uvicorn
            pass

    return Server


def _Server(config):
    return _server_class()(config)
