"""Standard health checking (grpc.health.v1: Check, Watch, List) through the server's interceptor, and
the interceptor serving every kind of handler grpc.aio accepts (issue 11, item 3)."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retrieval.errors import InvalidArgument
from retrieval.server.interceptors import CallInterceptor
from retrieval.server.process import ServerProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


# ------------------------------------------------------------------------------------------------
# The interceptor and the four kinds of handlers, sync and async
# ------------------------------------------------------------------------------------------------
async def _uu_async(req, ctx):
    return b"uu-async:" + req


def _uu_sync(req, ctx):
    return b"uu-sync:" + req


async def _us_asyncgen(req, ctx):
    for i in range(3):
        yield b"%s-%d" % (req, i)


async def _us_writer(req, ctx):  # the reader/writer API, as grpc's health Watch uses
    for i in range(3):
        await ctx.write(b"w%s-%d" % (req, i))


def _us_syncgen(req, ctx):
    for i in range(3):
        yield b"s%s-%d" % (req, i)


async def _su_async(reqs, ctx):
    return b"+".join([r async for r in reqs])


def _su_sync(reqs, ctx):  # a blocking iterator of requests
    return b"*".join(list(reqs))


async def _ss_asyncgen(reqs, ctx):
    async for r in reqs:
        yield r.upper()


async def _ss_writer(reqs, ctx):
    async for r in reqs:
        await ctx.write(b"<" + r + b">")


def _ss_sync(reqs, ctx):
    for r in reqs:
        yield r[::-1]


def _unimplemented(req, ctx):  # what grpc's generated base classes do for a method nobody implemented
    ctx.set_code(grpc.StatusCode.UNIMPLEMENTED)
    ctx.set_details("Method not implemented!")
    raise NotImplementedError("Method not implemented!")


def _sync_invalid(reqs, ctx):
    for r in reqs:
        if r == b"bad":
            raise InvalidArgument("bad message")
        yield r


def _sync_set_code(req, ctx):
    ctx.set_code(grpc.StatusCode.FAILED_PRECONDITION)
    ctx.set_details("not now")
    raise RuntimeError("set a code, then raised")


HANDLERS = {
    "UUAsync": grpc.unary_unary_rpc_method_handler(_uu_async),
    "UUSync": grpc.unary_unary_rpc_method_handler(_uu_sync),
    "USAsyncGen": grpc.unary_stream_rpc_method_handler(_us_asyncgen),
    "USWriter": grpc.unary_stream_rpc_method_handler(_us_writer),
    "USSyncGen": grpc.unary_stream_rpc_method_handler(_us_syncgen),
    "SUAsync": grpc.stream_unary_rpc_method_handler(_su_async),
    "SUSync": grpc.stream_unary_rpc_method_handler(_su_sync),
    "SSAsyncGen": grpc.stream_stream_rpc_method_handler(_ss_asyncgen),
    "SSWriter": grpc.stream_stream_rpc_method_handler(_ss_writer),
    "SSSync": grpc.stream_stream_rpc_method_handler(_ss_sync),
    "Unimplemented": grpc.unary_unary_rpc_method_handler(_unimplemented),
    "SSSyncInvalid": grpc.stream_stream_rpc_method_handler(_sync_invalid),
    "SetCode": grpc.unary_unary_rpc_method_handler(_sync_set_code),
}


async def _every_kind() -> dict:
    server = grpc.aio.server(interceptors=[CallInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out: dict = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            def m(kind, name):
                return getattr(ch, kind)(f"/t.T/{name}")

            async def reqs(*items):
                for x in items:
                    yield x

            out["UUAsync"] = await m("unary_unary", "UUAsync")(b"a", timeout=10)
            out["UUSync"] = await m("unary_unary", "UUSync")(b"b", timeout=10)
            for name in ("USAsyncGen", "USWriter", "USSyncGen"):
                out[name] = [r async for r in m("unary_stream", name)(b"q", timeout=10)]
            out["SUAsync"] = await m("stream_unary", "SUAsync")(reqs(b"x", b"y"), timeout=10)
            out["SUSync"] = await m("stream_unary", "SUSync")(reqs(b"x", b"y", b"z"), timeout=10)
            for name in ("SSAsyncGen", "SSWriter", "SSSync"):
                out[name] = [r async for r in m("stream_stream", name)(reqs(b"ab", b"cd"), timeout=10)]
            for name, kind, arg in (("Unimplemented", "unary_unary", b""), ("SetCode", "unary_unary", b""),
                                    ("SSSyncInvalid", "stream_stream", reqs(b"ok", b"bad", b"never"))):
                call = m(kind, name)(arg, timeout=10)
                got = []
                try:
                    if kind == "stream_stream":
                        async for r in call:
                            got.append(r)
                    else:
                        await call
                    out[name] = ("OK", "", got)
                except grpc.aio.AioRpcError as e:
                    md = dict(e.trailing_metadata() or ())
                    out[name] = (e.code(), e.details(), got, md.get("x-request-id"))
    finally:
        await server.stop(0)
    return out


def test_interceptor_serves_every_kind_of_handler():
    out = asyncio.run(_every_kind())
    assert out["UUAsync"] == b"uu-async:a"
    assert out["UUSync"] == b"uu-sync:b"
    assert out["USAsyncGen"] == [b"q-0", b"q-1", b"q-2"]
    assert out["USWriter"] == [b"wq-0", b"wq-1", b"wq-2"]
    assert out["USSyncGen"] == [b"sq-0", b"sq-1", b"sq-2"]
    assert out["SUAsync"] == b"x+y"
    assert out["SUSync"] == b"x*y*z"
    assert out["SSAsyncGen"] == [b"AB", b"CD"]
    assert out["SSWriter"] == [b"<ab>", b"<cd>"]
    assert out["SSSync"] == [b"ba", b"dc"]
    # a method nobody implemented is UNIMPLEMENTED, not INTERNAL
    assert out["Unimplemented"][0] == grpc.StatusCode.UNIMPLEMENTED, out["Unimplemented"]
    # a code the handler set before raising is kept
    assert out["SetCode"][:2] == (grpc.StatusCode.FAILED_PRECONDITION, "not now"), out["SetCode"]
    # a typed error from a sync stream handler on its worker thread: its status, after what it sent
    code, details, got, rid = out["SSSyncInvalid"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "bad message" and got == [b"ok"] and rid


# ------------------------------------------------------------------------------------------------
# Health over a real server
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def own_server(tmp_path):
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    yield srv
    srv.stop()


def _watch(address: str, service: str, out: queue.Queue, ready: threading.Event, holder: dict) -> None:
    with grpc.insecure_channel(address) as ch:
        call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
        holder["call"] = call
        ready.set()
        try:
            for resp in call:
                out.put(resp.status)
        except grpc.RpcError as e:
            out.put(e.code())


def test_check_watch_and_list(own_server):
    with grpc.insecure_channel(own_server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

        for service, want in (("", SERVING), ("retrieval.v1.Points", SERVING), ("nope", SERVICE_UNKNOWN)):
            call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
            try:
                assert next(call).status == want, service
            finally:
                call.cancel()

        listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
        assert {"", "retrieval.v1.Collections", "retrieval.v1.Points", "retrieval.v1.Search",
                "retrieval.v1.Jobs"} <= set(listed)
        assert all(s.status == SERVING for s in listed.values()), listed


def test_client_side_health_checking_works(own_server):
    """gRPC's client-side health checking (service config healthCheckConfig) watches Health/Watch: with a
    broken Watch the subchannel never becomes ready and every call fails UNAVAILABLE."""
    config = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
    opts = [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(own_server.address, options=opts) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(3):  # a channel that stays usable, call after call
            assert stub.Check(health_pb2.HealthCheckRequest(service="retrieval.v1.Search"), timeout=10).status == SERVING


def test_watch_reports_not_serving_at_graceful_shutdown(own_server):
    out: queue.Queue = queue.Queue()
    ready = threading.Event()
    holder: dict = {}
    t = threading.Thread(target=_watch, args=(own_server.address, "retrieval.v1.Search", out, ready, holder),
                         daemon=True)
    t.start()
    assert ready.wait(10)
    assert out.get(timeout=10) == SERVING
    own_server.proc.send_signal(signal.SIGTERM)  # graceful shutdown: NOT_SERVING, then grace, then stop
    assert out.get(timeout=30) == NOT_SERVING
    holder["call"].cancel()  # the watcher goes away, so the server need not wait its whole grace period
    t.join(10)
    assert own_server.proc.wait(60) == 0
