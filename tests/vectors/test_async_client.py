"""AsyncClient against a real loopback server: the same results as Client for the same calls, the
same exception types for the same errors, concurrent calls with asyncio.gather, close() mid-call."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from retrieval import AsyncClient, errors

D = 8
N = 400


@pytest.fixture(scope="module")
def data(client):
    rng = np.random.default_rng(2)
    xb = rng.standard_normal((N, D)).astype(np.float32)
    client.create_collection("as", dimension=D, index={"type": "hnsw", "m": 8})
    client.upsert("as", np.arange(N), xb, [{"i": i, "tag": ["a", "b", "c"][i % 3]} for i in range(N)])
    t_end = time.monotonic() + 60
    while client.describe_collection("as")["pending"]:
        assert time.monotonic() < t_end
        time.sleep(0.05)
    return xb, rng.standard_normal((20, D)).astype(np.float32)


def arun(server, fn):
    """``fn(async_client)`` on a fresh event loop with a fresh AsyncClient."""
    async def main():
        async with AsyncClient(server.address, timeout=60) as ac:
            return await fn(ac)

    return asyncio.run(main())


def same(a, b) -> bool:
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


TAG_B = {"must": [{"key": "tag", "equals": "b"}]}
READS = {
    "search": lambda x, q: (("as", q[0]), {"k": 10, "ef": 32}),
    "search_payloads_vectors": lambda x, q: (("as", q[1]), {"k": 5, "with_payloads": True, "with_vectors": True}),
    "search_filtered": lambda x, q: (("as", q[2]), {"k": 7, "filter": TAG_B, "with_payloads": True}),
    "search_exact": lambda x, q: (("as", q[3]), {"k": 4, "exact": True}),
    "search_batch": lambda x, q: (("as", q), {"k": 6}),
    "search_batch_filtered": lambda x, q: (("as", q[:5]), {"k": 3, "filter": TAG_B}),
    "get": lambda x, q: (("as", [3, 1, 399, 1000]), {}),
    "get_no_vectors": lambda x, q: (("as", np.arange(5, 9)), {"with_vectors": False}),
    "count": lambda x, q: (("as",), {}),
    "count_filtered": lambda x, q: (("as",), {"filter": TAG_B}),
    "scroll": lambda x, q: (("as",), {"start_id": 17, "limit": 9, "with_vectors": True}),
    "scroll_filtered": lambda x, q: (("as",), {"filter": TAG_B, "limit": 5}),
    "describe_collection": lambda x, q: (("as",), {}),
    "list_jobs": lambda x, q: ((), {}),
    "job_kinds": lambda x, q: ((), {}),
    "list_graphs": lambda x, q: ((), {}),
    "list_datastores": lambda x, q: ((), {}),
}


@pytest.mark.parametrize("case", sorted(READS))
def test_reads_match_the_sync_client(server, client, data, case):
    xb, xq = data
    method = case if hasattr(client, case) else case.rsplit("_", 1)[0]
    while not hasattr(client, method):
        method = method.rsplit("_", 1)[0]
    args, kw = READS[case](xb, xq)
    want = getattr(client, method)(*args, **kw)
    got = arun(server, lambda ac: getattr(ac, method)(*args, **kw))
    assert same(want, got), (want, got)


def test_writes_match_the_sync_client(server, client, data):
    xb, _ = data
    spec = {"type": "hnsw", "m": 8}

    def sync(name):
        out = [client.create_collection(name, D, index=spec)]
        out.append(client.upsert(name, np.arange(50), xb[:50], [{"k": i} for i in range(50)]) > 0)
        out.append(client.upsert_stream(name, ((np.arange(s, s + 25), xb[s:s + 25]) for s in range(50, 150, 25))))
        out.append(client.delete(name, ids=[1, 2, 3]))
        out.append(client.delete(name, filter={"must": [{"key": "k", "range": {"gte": 40}}]}))
        out.append(client.get(name, np.arange(160)))
        out.append(client.repair_collection(name))
        out.append([c["name"] for c in client.list_collections() if c["name"].endswith("-w")])
        client.drop_collection(name)
        return out

    async def aio(ac, name):
        out = [await ac.create_collection(name, D, index=spec)]
        out.append(await ac.upsert(name, np.arange(50), xb[:50], [{"k": i} for i in range(50)]) > 0)

        async def batches():
            for s in range(50, 150, 25):
                yield np.arange(s, s + 25), xb[s:s + 25]

        out.append(await ac.upsert_stream(name, batches()))
        out.append(await ac.delete(name, ids=[1, 2, 3]))
        out.append(await ac.delete(name, filter={"must": [{"key": "k", "range": {"gte": 40}}]}))
        out.append(await ac.get(name, np.arange(160)))
        out.append(await ac.repair_collection(name))
        out.append([c["name"] for c in await ac.list_collections() if c["name"].endswith("-w")])
        await ac.drop_collection(name)
        return out

    want = sync("s-w")
    got = arun(server, lambda ac: aio(ac, "a-w"))
    drop = ("name", "created_at", "shard_info", "segments", "last_seq")
    for i in (0, 6):  # descriptions: the same but for the name and clock (records are read-only: copies)
        assert type(want[i]) is type(got[i])  # both clients return the same typed record
        want[i], got[i] = ({k: v for k, v in d.items() if k not in drop} for d in (want[i], got[i]))
    want[7], got[7] = want[7] == ["s-w"], got[7] == ["a-w"]
    assert same(want, got), (want, got)


def test_jobs_match_the_sync_client(server, client):
    kinds = [k["name"] for k in client.job_kinds()]
    assert kinds
    jobs = client.list_jobs()
    if not jobs:
        pytest.skip("no job recorded on this server to compare")
    jid = jobs[0]["id"]
    assert same(client.get_job(jid), arun(server, lambda ac: ac.get_job(jid)))
    assert same(client.wait_job(jid), arun(server, lambda ac: ac.wait_job(jid)))


ERRORS = [
    ("search", ("nope", np.zeros(D)), {}),
    ("describe_collection", ("nope",), {}),
    ("get", ("nope", [1]), {}),
    ("search", ("as", np.zeros(D + 1)), {}),                 # wrong dimension: the server says so
    ("search", ("as", np.zeros(D)), {"k": -1}),              # checked here, before the call
    ("search", ("as", np.zeros(D)), {"ef": -1}),
    ("upsert", ("as", [-1], np.zeros((1, D))), {}),
    ("get", ("as", ["x"]), {}),
    ("create_collection", ("as", D), {}),                    # exists
    ("search", ("as", np.zeros(D)), {"filter": {"must": [{"key": "tag"}]}}),
    ("get_job", ("no-such-job",), {}),
    ("describe_graph", ("nope",), {}),
    ("append_edges", ("nope", [0, 1.5], [1, 2]), {}),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors_map_to_the_same_exceptions(server, client, data, i):
    method, args, kw = ERRORS[i]
    with pytest.raises(errors.RetrievalError) as want:
        getattr(client, method)(*args, **kw)
    with pytest.raises(errors.RetrievalError) as got:
        arun(server, lambda ac: getattr(ac, method)(*args, **kw))
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)


def test_gather_runs_concurrent_calls(server, client, data):
    xb, xq = data
    qs = np.concatenate([xq, xb[:80]])
    want = [client.search("as", q, k=5, with_payloads=True) for q in qs]
    want_get = client.get("as", np.arange(0, N, 7))

    async def go(ac):
        calls = [ac.search("as", q, k=5, with_payloads=True) for q in qs] + [ac.get("as", np.arange(0, N, 7))]
        return await asyncio.gather(*calls)

    got = arun(server, go)
    assert all(same(w, g) for w, g in zip(want, got[:-1])) and same(want_get, got[-1])


def test_close_during_calls(server, data):
    _, xq = data

    async def go():
        ac = AsyncClient(server.address)
        await ac.search("as", xq[0], k=1)

        async def loop():
            while True:
                await ac.search("as", xq[0], k=10)

        tasks = [asyncio.ensure_future(loop()) for _ in range(8)]
        await asyncio.sleep(0.2)
        await asyncio.wait_for(ac.close(), 10)
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        with pytest.raises(errors.Cancelled, match="closed"):
            await ac.count("as")
        return done

    done = asyncio.run(go())
    assert all(isinstance(e, errors.Cancelled) for e in done), done


def test_api_key_is_sent(server):
    """A key is sent as ``authorization: Bearer``; an open loopback server ignores it."""
    async def go():
        async with AsyncClient(server.address, api_key="k-123") as ac:
            assert ac._md == (("authorization", "Bearer k-123"),)
            return await ac.count("as")

    assert asyncio.run(go()) == N


def test_payload_indexes_match_the_sync_client(server, client, data):
    want = [client.create_payload_index("as", "tag", "keyword"), client.list_payload_indexes("as")]
    client.drop_payload_index("as", "tag")

    async def go(ac):
        out = [await ac.create_payload_index("as", "tag", "keyword"), await ac.list_payload_indexes("as")]
        await ac.drop_payload_index("as", "tag")
        return out + [await ac.list_payload_indexes("as")]

    got = arun(server, go)
    assert same(want, got[:2]) and got[2] == []
