"""Limits and backpressure: RESOURCE_EXHAUSTED with retry-after hints instead of unbounded queues,
client retries that honour the hint, and deadlines / cancellation that stop the server's work."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import numpy as np
import psutil
import pytest

from retrieval import errors
from retrieval.client import Client
from retrieval.server.limits import Admission, Overloaded, StreamCharge
from retrieval.server.process import ServerProcess
from retrieval.v1 import drafts_pb2, points_pb2, search_pb2
from retrieval.drafting import convert as dconv
from retrieval import convert

LIMITS = {"RETRIEVAL_LIMITS__MAX_STREAMS": "2", "RETRIEVAL_LIMITS__MAX_SESSIONS": "1",
          "RETRIEVAL_LIMITS__MAX_INFLIGHT_WRITE_BYTES": "200000", "RETRIEVAL_LIMITS__MAX_POINTS_PER_COLLECTION": "7000",
          "RETRIEVAL_LIMITS__MAX_PENDING_BYTES": "65536", "RETRIEVAL_LIMITS__MAX_MESSAGE_BYTES": "1048576",
          "RETRIEVAL_LIMITS__RETRY_AFTER_MS": "50", "RETRIEVAL_LIMITS__SEARCH_CHUNK": "32",
          "RETRIEVAL_LIMITS__MAX_EF": "100000"}


# ------------------------------------------------------------------------------------------------
# Admission, in process
# ------------------------------------------------------------------------------------------------
def test_admission_counts_and_refuses_with_a_hint():
    async def main():
        a = Admission(max_inflight_requests=2, max_streams=2, max_sessions=1, max_inflight_write_bytes=100,
                      retry_after_ms=40)
        a.enter_unary(60)
        with pytest.raises(Overloaded, match=r"write.*limit is 100.*retry after \d+ ms") as e:
            a.enter_unary(50)
        assert e.value.retry_after_ms >= 40 and e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        a.enter_unary(0)  # reads are not charged
        with pytest.raises(Overloaded, match="max_inflight_requests"):
            a.enter_unary(0)
        a.leave_unary(60)
        a.leave_unary(0)
        a.enter_unary(500)  # alone, a request larger than the budget is admitted (else it never could be)
        a.leave_unary(500)
        assert (a.now.unary, a.now.write_bytes) == (0, 0)
        a.enter_stream(session=True)
        with pytest.raises(Overloaded, match="max_sessions"):
            a.enter_stream(session=True)
        a.enter_stream(session=False)
        with pytest.raises(Overloaded, match="max_streams"):
            a.enter_stream(session=False)
        a.leave_stream(True)
        a.leave_stream(False)
        assert a.now.rejected == 4

        # write bytes of streams wait for room (backpressure), then give up with a hint
        charge = StreamCharge(a)
        await charge.add(80, timeout=1)
        t0 = time.monotonic()
        with pytest.raises(Overloaded):
            await charge.add(80, timeout=0.2)
        assert time.monotonic() - t0 >= 0.19
        other = StreamCharge(a)
        waiter = asyncio.create_task(other.add(80, timeout=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        charge.close()  # frees room: the waiting message goes on
        await asyncio.wait_for(waiter, 1)
        other.close()
        assert a.now.write_bytes == 0

    asyncio.run(main())


def test_a_cancelled_read_interrupts_its_sqlite_query(tmp_path):
    """A call cancelled while its (slow) read runs frees the shard's reader thread at once."""
    from retrieval.indexes.base import HnswSpec
    from retrieval.vectors.shard import Shard, ShardSettings

    slow_sql = ("(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 400000000) "
                "SELECT count(*) FROM c) > 0")

    async def main():
        sh = Shard(tmp_path / "s", 4, "l2", HnswSpec(), ShardSettings())
        await sh.open()
        await sh.upsert(np.arange(3, dtype=np.uint64), np.ones((3, 4), np.float32), None)
        slow = asyncio.create_task(sh.read(lambda st: st.count((slow_sql, []))))
        await asyncio.sleep(0.3)
        slow.cancel()
        t0 = time.monotonic()
        assert await sh.read(lambda st: st.count()) == 3
        waited = time.monotonic() - t0
        await sh.close()
        return waited

    assert asyncio.run(main()) < 2.0  # the uninterrupted query takes minutes


# ------------------------------------------------------------------------------------------------
# Against a server with tight limits
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("limits") / "data", env=LIMITS)
    s.start()
    yield s
    s.stop()


def _trailing(e: grpc.RpcError) -> dict:
    return dict(e.trailing_metadata() or ())


class _Held:
    """A request stream that sends ``first`` messages, then blocks until released."""

    def __init__(self, first) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        for m in first:
            self.q.put(m)

    def __iter__(self):
        return iter(self.q.get, None)

    def release(self) -> None:
        self.q.put(None)


def test_streams_and_sessions_are_limited(srv):
    ch = grpc.insecure_channel(srv.address)
    session = ch.stream_stream("/retrieval.v1.Drafts/Session", request_serializer=drafts_pb2.SessionRequest.SerializeToString,
                               response_deserializer=drafts_pb2.SessionReply.FromString)
    held = _Held([dconv.open_to_proto([1, 2, 3, 1, 2], vocab_size=10)])
    first = session(iter(held), timeout=60)
    assert next(first).session_id  # admitted and answered: one session open
    second = session(iter([dconv.open_to_proto([1, 2], vocab_size=10)]), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        list(second)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions" in e.value.details()
    assert int(_trailing(e.value)["retry-after-ms"]) >= 50 and "retry after" in e.value.details()

    with Client(srv.address, max_busy_retries=0) as c:  # the search stream is the second stream
        c.create_collection("s", 2)
        c.upsert("s", [1], np.ones((1, 2), np.float32))
        assert c.search("s", np.ones(2, np.float32), k=1).ids.tolist() == [1]
        with Client(srv.address, timeout=5) as c2:  # a third stream: refused (after one retry on its hint)
            with pytest.raises(errors.ResourceExhausted, match="max_streams"):
                c2.search("s", np.ones(2, np.float32), k=1)
            assert c2.search_batch("s", np.ones((1, 2), np.float32), k=1)[1].tolist() == [[1]]  # unary calls go on
            held.release()
            list(first)
            assert c2.search("s", np.ones(2, np.float32), k=1).ids.tolist() == [1]  # room again
    ch.close()


def test_write_bytes_in_flight_are_bounded_and_the_client_retries(srv):
    rng = np.random.default_rng(1)
    with Client(srv.address, max_busy_retries=0) as c:
        c.create_collection("w", 256, index="exact")
        big = rng.random((150, 256), dtype=np.float32)  # ~154 kB per message
        stream_req = Client._upsert_request("w", np.arange(150), big, None)
        held = _Held([stream_req])
        fut = c._points.UpsertStream.future(iter(held), timeout=60)
        t_end = time.monotonic() + 30
        while c.count("w") < 150:  # the first message is committed, and still counted in flight
            assert time.monotonic() < t_end
            time.sleep(0.02)
        req = Client._upsert_request("w", np.arange(1000, 1100), rng.random((100, 256), dtype=np.float32), None)
        with pytest.raises(grpc.RpcError) as e:
            c._points.Upsert(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_write_bytes" in e.value.details() and "retry-after-ms" in _trailing(e.value)
        with pytest.raises(errors.ResourceExhausted, match="retry after"):
            c.upsert("w", np.arange(1000, 1100), rng.random((100, 256), dtype=np.float32))
        assert c.count("w") == 150  # refused writes wrote nothing

        # a patient client succeeds once the stream ends: it retries after the hints
        threading.Timer(0.4, held.release).start()
        with Client(srv.address, max_busy_retries=50) as patient:
            t0 = time.monotonic()
            patient.upsert("w", np.arange(1000, 1100), rng.random((100, 256), dtype=np.float32))
            assert time.monotonic() - t0 >= 0.3
        assert fut.result().count == 150
        assert c.count("w") == 250


def test_points_per_collection(srv):
    x = np.random.default_rng(2).random((7001, 2), dtype=np.float32)
    with Client(srv.address) as c:
        c.create_collection("cap", 2)
        c.upsert("cap", np.arange(7000), x[:7000])
        with pytest.raises(errors.ResourceExhausted, match="limit is 7000 points") as e:
            c.upsert("cap", [9000], x[7000:])
        assert "retry after" not in str(e.value)  # permanent: no hint, no retry
        c.upsert("cap", np.arange(10), x[:10] + 1)  # replacing at the limit is fine
        c.delete("cap", ids=np.arange(5))
        c.upsert("cap", np.arange(9000, 9005), x[:5])
        with pytest.raises(errors.ResourceExhausted):
            c.upsert("cap", [9005], x[:1])
        assert c.count("cap") == 7000


def test_writes_wait_for_a_lagging_indexer(srv):
    """An index that cannot absorb writes (an IVF index waiting for training data) holds them in its
    pending buffer; past limits.max_pending_bytes writes are refused with a hint instead."""
    x = np.random.default_rng(3).random((1000, 24), dtype=np.float32)
    with Client(srv.address, max_busy_retries=2) as c:
        c.create_collection("lag", 24, index={"type": "faiss", "factory": "IVF64,Flat"})
        c.upsert("lag", np.arange(900), x[:900])  # 86 kB pending > 64 kB
        t0 = time.monotonic()
        with pytest.raises(errors.ResourceExhausted, match="waiting for the indexer.*retry after"):
            c.upsert("lag", np.arange(900, 950), x[900:950])
        assert time.monotonic() - t0 >= 2 * 0.5  # two retries after hints of >= 500 ms
        assert c.count("lag") == 900
        assert c.search("lag", x[7], k=1).ids.tolist() == [7]  # reads go on


def test_message_size_limit(srv):
    with Client(srv.address, max_busy_retries=0) as c:
        c.create_collection("m", 512)
        with pytest.raises(errors.ResourceExhausted):
            c.upsert("m", np.arange(600), np.zeros((600, 512), np.float32) + 1)  # 1.2 MB > 1 MiB


@pytest.mark.parametrize("filtered", [False, True])
def test_an_expired_deadline_stops_the_work(srv, filtered):
    rng = np.random.default_rng(4)
    name = f"slow{int(filtered)}"
    xb = rng.random((6000, 32), dtype=np.float32)
    with Client(srv.address) as c:
        c.create_collection(name, 32, index={"type": "hnsw", "m": 32, "ef_construction": 100})
        c.upsert(name, np.arange(6000), xb, [{"g": i % 2} for i in range(6000)])
        assert c.describe_collection(name)["pending"] >= 0
        t_end = time.monotonic() + 120
        while c.describe_collection(name)["pending"]:
            assert time.monotonic() < t_end
            time.sleep(0.1)
        req = Client._search_request(name, rng.random((2000, 32), dtype=np.float32), 10, 6000, 0, False,
                                     {"must": [{"key": "g", "equals": 0}]} if filtered else None, False, False)
        proc = psutil.Process(srv.proc.pid)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            c._search.SearchBatch(req, timeout=0.5)  # ~2000 beam searches over 6000 points: many seconds
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)
        cpu0 = sum(proc.cpu_times()[:2])
        time.sleep(1.5)
        busy = sum(proc.cpu_times()[:2]) - cpu0
        assert busy < 0.5, f"the server kept working {busy:.2f} CPU-s after the deadline"
        t1 = time.monotonic()
        assert c.search(name, xb[3], k=1).ids.tolist() == [3]
        assert time.monotonic() - t1 < 1.0
        # the same search without a deadline does run for a while (so the check above means something)
        cpu0 = sum(proc.cpu_times()[:2])
        try:
            c._search.SearchBatch(req, timeout=2.5)
        except grpc.RpcError:
            pass
        assert sum(proc.cpu_times()[:2]) - cpu0 > 1.0
        assert time.monotonic() - t0 > 0
