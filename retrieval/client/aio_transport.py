"""The asyncio client's transport: the ``grpc.aio`` channel, the stubs, and the paths every call takes.

:meth:`AsyncTransport._call` makes every unary call (a deadline set, a busy refusal retried after the
server's hint, an error mapped), :meth:`AsyncTransport._stream_call` every client-streaming call (no
busy retries: the requests cannot be replayed) and :meth:`AsyncTransport._server_stream` every
server-streaming call.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.v1 import collections_pb2_grpc, jobs_pb2_grpc, points_pb2_grpc, search_pb2_grpc

if TYPE_CHECKING:
    from retrieval.aio import AsyncClient


def make_aio_channel(address: str, tls: bool | None = None, root_certificates=None, client_cert=None,
                     client_key=None, server_name: str | None = None, options=()) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel with the client's TLS settings (the API key is sent per call)."""
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    creds = cc.tls_credentials(tls, root_certificates, client_cert, client_key)
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


class AsyncTransport:
    """An asyncio connection to one server: the channel, the stubs, deadlines, busy retries, error mapping.

    ``timeout``: seconds per call (default 30); ``max_busy_retries``: retries of a call the saturated
    server refused with a retry-after hint; the API key is sent as per-call metadata."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024, channel: grpc.aio.Channel | None = None, *,
                 api_key: str | None = None, api_key_file: str | os.PathLike | None = None,
                 tls: bool | None = None, root_certificates: bytes | str | os.PathLike | None = None,
                 client_cert: bytes | str | os.PathLike | None = None,
                 client_key: bytes | str | os.PathLike | None = None, server_name: str | None = None,
                 max_busy_retries: int = 5) -> None:
        self.address = address
        self.timeout = timeout
        self.max_busy_retries = max_busy_retries
        key = cc.read_key(api_key, api_key_file)
        self._md = (("authorization", f"Bearer {key}"),) if key else None
        self._channel = channel or make_aio_channel(address, tls, root_certificates, client_cert, client_key,
                                                    server_name, options=cc.channel_options(max_message_bytes))
        self._collections = collections_pb2_grpc.CollectionsStub(self._channel)
        self._points = points_pb2_grpc.PointsStub(self._channel)
        self._search = search_pb2_grpc.SearchStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobsStub(self._channel)
        self._stubs: dict[str, object] = {}
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------------
    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls in flight end with :class:`errors.Cancelled` (after ``grace`` s)."""
        self._closed = True
        await self._channel.close(grace)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server answers (raises Unavailable after ``timeout`` seconds)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise errors.Unavailable(f"no server answered at {self.address} within {timeout} s") from None

    def _stub(self, name: str):
        stub = self._stubs.get(name)
        if stub is None:
            import importlib

            mod = importlib.import_module(f"retrieval.v1.{name.lower()}_pb2_grpc")
            stub = self._stubs[name] = getattr(mod, f"{name}Stub")(self._channel)
        return stub

    def _check_open(self) -> None:
        if self._closed:
            raise cc.closed_error()

    async def _call(self, fn, request, timeout: float | None = None):
        """``await fn(request)`` with the deadline ``timeout`` (default: the client's), retried after
        the server's hint while it refuses because it is busy (``max_busy_retries`` times)."""
        t_end = time.monotonic() + (self.timeout if timeout is None else timeout)
        for attempt in range(self.max_busy_retries + 1):
            self._check_open()
            try:
                return await fn(request, timeout=max(0.001, t_end - time.monotonic()), metadata=self._md)
            except grpc.RpcError as e:
                if self._closed:
                    raise cc.closed_error() from None
                wait = cc.retry_after_s(e)
                if wait is None or attempt == self.max_busy_retries:
                    cc.raise_rpc(e)
                wait *= random.uniform(1.0, 1.5)  # spread the retries of clients refused together
                if time.monotonic() + wait >= t_end:
                    cc.raise_rpc(e)
                await asyncio.sleep(wait)
            except (grpc.aio.UsageError, asyncio.CancelledError, RuntimeError):
                if self._closed:  # the channel was closed before or during the call
                    raise cc.closed_error() from None
                raise
        raise AssertionError("unreachable")

    async def _stream_call(self, fn, requests, timeout: float | None):
        """A client-streaming call (no busy retries: the requests cannot be replayed)."""
        self._check_open()
        try:
            return await fn(requests, timeout=timeout, metadata=self._md)
        except grpc.RpcError as e:
            if self._closed:
                raise cc.closed_error() from None
            cc.raise_rpc(e)
        except (grpc.aio.UsageError, asyncio.CancelledError, RuntimeError):
            if self._closed:
                raise cc.closed_error() from None
            raise

    async def _server_stream(self, fn, request, timeout: float | None) -> AsyncIterator:
        """The messages of a server-streaming call; the call is cancelled when the caller stops early
        (close the iterator: ``contextlib.aclosing``)."""
        self._check_open()
        call = fn(request, timeout=timeout, metadata=self._md)
        try:
            async for msg in call:
                yield msg
        except grpc.RpcError as e:
            if self._closed:
                raise cc.closed_error() from None
            cc.raise_rpc(e)
        finally:
            call.cancel()  # no-op when the stream ended; ends it when the caller stopped early
