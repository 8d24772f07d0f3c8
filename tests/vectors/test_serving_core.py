"""The serving core: searches on the search pool, concurrent small queries coalesced into one native
call, and the shard lock that keeps them consistent with writes and the indexer.

* :class:`Coalescer` on its own: every caller gets exactly the rows of its own queries (checked
  against one call per query), queries with different ``k`` or parameters are never mixed, a
  cancelled caller leaves the others' results alone, an error reaches every caller of its batch,
  and concurrent callers are answered by fewer native calls than queries.
* Through a real server: many client threads search while another upserts, replaces and deletes
  points and the indexer moves them into the index; a search that starts after a write was
  acknowledged sees it (the new point found at distance 0, a deleted one never returned), and every
  result equals the exact answer over the final state once the writes stop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from retrieval.client import Client
from retrieval.indexes.base import QueryParams
from retrieval.indexes.exact import knn
from retrieval.vectors.coalesce import Coalescer

D = 16


def _exact_run(xb: np.ndarray, calls: list[int]):
    def run(xq, k, params):
        calls.append(len(xq))
        time.sleep(0.002)  # a native call takes a while: callers arriving meanwhile queue up
        Dm, I = knn(xq, xb, k, "l2")
        return Dm + params.ef, I  # ef shifts distances, so a batch mixing parameters would show
    return run


def test_coalescer_answers_each_caller_with_its_own_rows():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((500, D)).astype(np.float32)
    xq = rng.standard_normal((64, D)).astype(np.float32)
    calls: list[int] = []
    pool = ThreadPoolExecutor(2)
    co = Coalescer(_exact_run(xb, calls), pool, max_batch=16)

    async def main():
        # 64 callers at once, with two values of k and of ef, some asking for two queries
        jobs = []
        for i in range(len(xq)):
            k = 5 if i % 3 else 7
            ef = 0 if i % 2 else 10
            q = xq[i : i + 2] if i % 5 == 0 else xq[i : i + 1]
            jobs.append((q, k, ef, co.search(q, k, QueryParams(ef=ef))))
        got = await asyncio.gather(*(j[3] for j in jobs))
        return [(q, k, ef, r) for (q, k, ef, _), r in zip(jobs, got)]

    for q, k, ef, (Dg, Ig) in asyncio.run(main()):
        De, Ie = knn(q, xb, k, "l2")
        assert Dg.shape == (len(q), k)
        np.testing.assert_array_equal(Ig, Ie)
        np.testing.assert_allclose(Dg, De + ef, rtol=1e-5, atol=1e-5)
    assert sum(calls) == 64 + len(range(0, 64, 5))
    assert len(calls) < 64, calls      # coalesced: fewer native calls than callers
    assert max(calls) <= 16            # and never more than max_batch queries in one call
    assert co.queries == sum(calls) and co.calls == len(calls)
    pool.shutdown()


def test_coalescer_cancelled_caller_and_errors():
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((100, D)).astype(np.float32)
    pool = ThreadPoolExecutor(1)
    calls: list[int] = []
    co = Coalescer(_exact_run(xb, calls), pool, max_batch=64)

    async def cancelled():
        q = rng.standard_normal((10, 1, D)).astype(np.float32)
        tasks = [asyncio.ensure_future(co.search(q[i], 3, QueryParams())) for i in range(10)]
        await asyncio.sleep(0)
        tasks[4].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[4], asyncio.CancelledError)
        for i in (0, 1, 2, 3, 5, 6, 7, 8, 9):
            np.testing.assert_array_equal(done[i][1], knn(q[i], xb, 3, "l2")[1])

    asyncio.run(cancelled())

    def failing(xq, k, params):
        time.sleep(0.001)
        raise RuntimeError("native search failed")

    bad = Coalescer(failing, pool, max_batch=64)

    async def errors():
        q = np.zeros((1, D), np.float32)
        res = await asyncio.gather(*(bad.search(q, 1, QueryParams()) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "native search failed" in str(r) for r in res), res
        # the coalescer is still usable after a failed batch
        ok = Coalescer(_exact_run(xb, calls), pool)
        _, I = await ok.search(q, 2, QueryParams())
        np.testing.assert_array_equal(I, knn(q, xb, 2, "l2")[1])

    asyncio.run(errors())
    pool.shutdown()


@pytest.mark.parametrize("index", [{"type": "hnsw", "m": 8, "ef_construction": 64}, {"type": "faiss", "factory": "Flat"}])
def test_concurrent_searches_see_every_acknowledged_write(server, index):
    """Reader threads search while a writer upserts new points (each with a vector nobody else has),
    replaces and deletes old ones; the indexer moves points from the delta into the index meanwhile."""
    name = f"sc-{index['type']}"
    rng = np.random.default_rng(2)
    n0 = 3000
    xb = (rng.standard_normal((n0, D)) * 10).astype(np.float32)
    with Client(server.address, timeout=60) as c:
        c.create_collection(name, D, index=index)
        c.upsert(name, np.arange(n0), xb)
    acked_new: list[tuple[int, np.ndarray]] = []   # (id, vector) upserted and acknowledged
    acked_del: list[tuple[int, np.ndarray]] = []   # (id, old vector) deleted and acknowledged
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[str] = []

    def writer():
        wr = np.random.default_rng(3)
        with Client(server.address, timeout=60) as w:
            nxt = 1_000_000
            for step in range(60):
                ids = np.arange(nxt, nxt + 20)
                x = (wr.standard_normal((20, D)) * 10 + 100 + 3 * step).astype(np.float32)  # far from everything
                w.upsert(name, ids, x)
                with lock:
                    acked_new.extend(zip(ids.tolist(), x))
                nxt += 20
                victims = wr.choice(n0, 5, replace=False)  # old points, deleted for good
                victims = victims[[v not in {d for d, _ in acked_del} for v in victims.tolist()]]
                if len(victims):
                    w.delete(name, ids=victims)
                    with lock:
                        acked_del.extend(zip(victims.tolist(), xb[victims]))
        stop.set()

    def reader(seed):
        rr = np.random.default_rng(seed)
        with Client(server.address, timeout=60) as r:
            while not stop.is_set():
                with lock:
                    new = list(acked_new[-40:])
                    dead = list(acked_del[-20:])
                if new:
                    i, v = new[rr.integers(len(new))]
                    h = r.search(name, v, k=1, ef=64)
                    if h.ids.tolist() != [i] or h.distances[0] > 0.5:  # float32 rounding at norms ~1e5
                        failures.append(f"acknowledged point {i} not found first: {h.ids.tolist()} {h.distances.tolist()}")
                if dead:
                    i, v = dead[rr.integers(len(dead))]
                    h = r.search(name, v, k=5, ef=64)
                    if i in h.ids.tolist():
                        failures.append(f"deleted point {i} returned: {h.ids.tolist()}")

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not failures, failures[:5]
    # once quiet, every answer is the exact one over the final state
    with Client(server.address, timeout=60) as c:
        dead = {i for i, _ in acked_del}
        live_ids = np.array([i for i in range(n0) if i not in dead] + [i for i, _ in acked_new], np.int64)
        live_x = np.vstack([xb[[i for i in range(n0) if i not in dead]], np.stack([v for _, v in acked_new])])
        assert c.count(name) == len(live_ids)
        xq = live_x[rng.choice(len(live_x), 50, replace=False)] + 0.01
        _, R = knn(xq, live_x, 1, "l2")
        hits = [c.search(name, q, k=1, exact=True).ids[0] for q in xq]
        np.testing.assert_array_equal(np.array(hits), live_ids[R[:, 0]])
        c.drop_collection(name)
