"""One Client shared by many threads, over a real loopback server: concurrent searches (pooled
streams and the unary fallback), filtered searches, gets and upserts give the one-at-a-time results;
close() during calls ends them with Cancelled, never a hang; a server restart breaks the pooled
streams and the next searches recover on fresh ones. Bad input raises InvalidArgument client-side."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from retrieval import errors
from retrieval.client import Client
from retrieval.server.process import ServerProcess

D = 16
N = 1500
THREADS = 16


@pytest.fixture(scope="module")
def data(client):
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((N, D)).astype(np.float32)
    client.create_collection("th", dimension=D, index={"type": "hnsw", "m": 16})
    client.upsert("th", np.arange(N), xb, [{"i": i, "even": i % 2 == 0} for i in range(N)])
    t_end = time.monotonic() + 60
    while client.describe_collection("th")["pending"]:  # a fixed index: searches are deterministic
        assert time.monotonic() < t_end
        time.sleep(0.05)
    client.create_collection("th-w", dimension=D, index="exact")
    return xb, rng.standard_normal((64, D)).astype(np.float32)


EVEN = {"must": [{"key": "even", "equals": True}]}


def _ops(c: Client, xb, xq, t: int):
    """Thread ``t``'s calls; returns their results (the upserts write ids of its own range)."""
    out = []
    for j in range(6):
        q = xq[(t * 6 + j) % len(xq)]
        h = c.search("th", q, k=10, ef=64)
        out.append(("search", h.ids.tolist(), h.distances.tolist()))
        h = c.search("th", q, k=5, filter=EVEN, with_payloads=True)
        out.append(("filtered", h.ids.tolist(), h.payloads))
        ids = [(t * 37 + j * 11) % N, (t * 53 + j) % N]
        p = c.get("th", ids)
        out.append(("get", p.ids.tolist(), p.vectors.tobytes(), p.payloads))
        own = np.arange(10_000 * (t + 1) + 10 * j, 10_000 * (t + 1) + 10 * j + 10)
        c.upsert("th-w", own, xb[own % N], [{"t": t}] * len(own))
        back = c.get("th-w", own, with_payloads=True)
        out.append(("upsert", back.ids.tolist(), back.vectors.tobytes(), back.payloads))
        D_, I_ = c.search_batch("th", xq[j:j + 3], k=4)
        out.append(("batch", I_.tolist(), D_.tolist()))
    return out


def test_threads_sharing_a_client_get_the_one_at_a_time_results(server, client, data):
    xb, xq = data
    expected = [_ops(client, xb, xq, t) for t in range(THREADS)]  # one at a time
    with Client(server.address, timeout=60, search_streams=4) as shared:  # 16 threads > 4 streams: unary fallback too
        got: list = [None] * THREADS
        failures: list = []
        barrier = threading.Barrier(THREADS)

        def run(t: int) -> None:
            try:
                barrier.wait()
                got[t] = _ops(shared, xb, xq, t)
            except BaseException as e:  # noqa: BLE001  (reported below)
                failures.append(e)

        ts = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
        for th in ts:
            th.start()
        for th in ts:
            th.join(60)
        assert not failures, failures
        assert got == expected
        assert len(shared._pool._open) <= 4 and shared._pool._idle  # bounded, returned after use


def test_streams_run_concurrently(server, data):
    """Two threads each hold a stream of their own at the same time (no client-wide lock)."""
    _, xq = data
    with Client(server.address, timeout=60) as c:
        s1, s2 = c._pool.take(), c._pool.take()
        assert s1 is not s2 and s1 is not None and s2 is not None
        c._pool.give_back(s1)
        c._pool.give_back(s2)
        h = c.search("th", xq[0], k=3)
        assert len(h.ids) == 3 and len(c._pool._open) == 2


def test_close_during_calls_ends_them(server, data):
    _, xq = data
    c = Client(server.address, timeout=30)
    results: dict = {"ok": 0, "cancelled": 0, "other": []}
    lock = threading.Lock()
    started = threading.Event()

    def run(t: int) -> None:
        for j in range(10_000):
            try:
                if j % 3 == 2:
                    c.get("th", [j % N])
                else:
                    c.search("th", xq[(t + j) % len(xq)], k=10, filter=EVEN if j % 3 == 1 else None)
                started.set()
                with lock:
                    results["ok"] += 1
            except errors.Cancelled:
                with lock:
                    results["cancelled"] += 1
                return
            except BaseException as e:  # noqa: BLE001
                with lock:
                    results["other"].append(repr(e))
                return

    ts = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in ts:
        th.start()
    assert started.wait(30)
    time.sleep(0.2)
    t0 = time.monotonic()
    c.close()
    for th in ts:
        th.join(15)
    assert not any(th.is_alive() for th in ts), "a thread hung after close()"
    assert time.monotonic() - t0 < 15
    assert results["other"] == [] and results["cancelled"] == 8 and results["ok"] > 0
    with pytest.raises(errors.Cancelled, match="closed"):
        c.search("th", xq[0], k=1)
    with pytest.raises(errors.Cancelled, match="closed"):
        c.count("th")
    c.close()  # idempotent


def test_pooled_streams_recover_after_a_server_restart(tmp_path):
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    try:
        x = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
        with Client(srv.address, timeout=30) as c:
            c.create_collection("r", 8, index="exact")
            c.upsert("r", np.arange(200), x)
            want = [c.search("r", x[i], k=3).ids.tolist() for i in range(8)]
            streams = [c._pool.take() for _ in range(4)]  # four open, idle streams
            for s in streams:
                c._pool.give_back(s)
            srv.kill()  # the connection drops under the open streams
            srv.start()
            c.wait_ready(30)
            got: list = [None] * 8
            fails: list = []

            def run(i: int) -> None:
                try:
                    got[i] = c.search("r", x[i], k=3).ids.tolist()
                except BaseException as e:  # noqa: BLE001
                    fails.append(e)

            ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
            for th in ts:
                th.start()
            for th in ts:
                th.join(30)
            assert not fails, fails
            assert got == want
            assert not set(streams) & c._pool._open  # the broken streams were dropped
    finally:
        srv.stop()


@pytest.mark.parametrize("call, words", [
    (lambda c: c.upsert("th-w", [-1], np.ones((1, D), np.float32)), "ids must be >= 0, got -1"),
    (lambda c: c.get("th", ["a"]), "ids must be integers"),
    (lambda c: c.get("th", [1.5]), "ids must be integers, got 1.5"),
    (lambda c: c.delete("th-w", ids=np.array([-3])), "ids must be >= 0, got -3"),
    (lambda c: c.search("th", np.zeros(D), k=10, ef=-1), "ef must be an integer in [0, 4294967295], got -1"),
    (lambda c: c.search("th", np.zeros(D), k=-2), "k must be an integer"),
    (lambda c: c.search_batch("th", np.zeros((2, D)), k="3"), "k must be an integer"),
    (lambda c: c.scroll("th", limit=-1), "limit must be an integer"),
    (lambda c: c.scroll("th", start_id=-5), "start_id must be >= 0"),
    (lambda c: c.append_edges("g", [0, 1.5], [1, 2]), "src must be integers, got 1.5"),
    (lambda c: c.append_edges("g", [-1], [1]), "src must be >= 0"),
    (lambda c: c.append_edges("g", ["a"], [1]), "src must be integers"),
    (lambda c: c.neighbors("g", [-1]), "nodes must be >= 0"),
    (lambda c: c.upsert_stream("th-w", iter([([1], np.ones((1, D))), ([-1], np.ones((1, D)))])),
     "ids must be >= 0"),
])
def test_bad_input_raises_invalid_argument(client, data, call, words):
    with pytest.raises(errors.InvalidArgument) as e:
        call(client)
    assert words in str(e.value)
