"""Payload indexes: the index evaluation against the SQL path and the reference evaluator (in process,
over random payloads and filters, through writes), the planner, and over gRPC: create / list / drop /
describe with bad input, filtered k-NN against brute force at several selectivities, maintenance
under concurrent writers, and recovery after kill -9."""

from __future__ import annotations

import json
import random
import sqlite3
import threading

import grpc
import numpy as np
import pytest

from retrieval.client import Client
from retrieval.errors import RetrievalError
from retrieval.server.process import ServerProcess
from retrieval.vectors import filters as flt
from retrieval.vectors import payload_index as pi
from retrieval.vectors.filters import Condition, Filter, Range
from tests.vectors.helpers import (
    all_points,
    assert_same_neighbours,
    brute_knn,
    recall,
    ref_eval,
    wait_indexed,
)
from tests.vectors.test_filters import rand_filter, rand_payload

# --------------------------------------------------------------------------------------------------
# In process: index vs SQL vs reference
# --------------------------------------------------------------------------------------------------
TYPED = {"kw": "keyword", "i": "integer", "f": "float", "b": "bool", "t.x": "integer", "tags": "keyword"}
KW = ["red", "blue", "green", "", "ü", "5"]


def typed_payload(rng: random.Random, noise: float):
    """Mostly well-typed values (arrays, nulls and missing keys included); with ``noise``, a value of
    another type (the index must then fall back or answer "nothing" exactly)."""
    if rng.random() < 0.05:
        return None
    p: dict = {}

    def val(kind):
        if rng.random() < noise:
            return rng.choice([5, 5.0, 2.5, "5", True, False, {"x": 1}, [1, "red"], 2**70])
        r = rng.random()
        if r < 0.08:
            return None
        one = {"kw": lambda: rng.choice(KW), "i": lambda: rng.randint(-5, 5),
               "f": lambda: rng.choice([rng.randint(-3, 3), round(rng.uniform(-3, 3), 2)]),
               "b": lambda: rng.random() < 0.5}[kind]
        if r < 0.25:
            return [one() for _ in range(rng.randint(0, 3))]
        return one()

    for key, kind in (("kw", "kw"), ("i", "i"), ("f", "f"), ("b", "b"), ("tags", "kw")):
        if rng.random() < 0.85:
            p[key] = val(kind)
    if rng.random() < 0.7:
        p["t"] = {"x": val("i")} if rng.random() < 0.9 else val("i")
    return p


def typed_condition(rng: random.Random) -> Condition:
    key = rng.choice(list(TYPED) + ["zz"] * 0)
    kind = rng.choice(["equals", "any_of", "range", "is_null"])
    values = KW + [0, 1, -2, 3, 2.0, 2.5, 5, True, False, -2**63, 2**62]
    if kind == "equals":
        return Condition(key, equals=rng.choice(values))
    if kind == "any_of":
        return Condition(key, any_of=tuple(rng.sample(values, rng.randint(1, 4))))
    if kind == "range":
        b = {}
        while not b:
            for name in ("gt", "gte", "lt", "lte"):
                if rng.random() < 0.45:
                    b[name] = rng.choice([-3, -1.5, 0, 0.5, 1, 2, 2.5, 3, 1e30])
        return Condition(key, range=Range(**b))
    return Condition(key, is_null=rng.random() < 0.5)


def typed_filter(rng: random.Random, depth: int = 1) -> Filter:
    parts = {}
    for part in ("must", "should", "must_not"):
        items = []
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            items.append(typed_filter(rng, depth + 1) if depth < 3 and rng.random() < 0.25 else typed_condition(rng))
        parts[part] = tuple(items)
    return Filter(**parts)


class Model:
    """The same points in SQLite (the SQL path) and a PayloadIndexSet (the index path)."""

    def __init__(self, specs: dict[str, str]) -> None:
        self.con = sqlite3.connect(":memory:")
        self.con.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, payload TEXT)")
        self.pset = pi.PayloadIndexSet(specs)
        self.payloads: dict[int, object] = {}

    def upsert(self, ids: list[int], pls: list) -> None:
        js = [None if p is None else json.dumps(p) for p in pls]
        self.con.executemany("INSERT OR REPLACE INTO p VALUES (?, ?)", zip(ids, js))
        self.pset.upsert(np.asarray(ids, np.uint64), js)
        self.payloads.update(zip(ids, pls))

    def delete(self, ids: list[int]) -> None:
        self.con.executemany("DELETE FROM p WHERE id = ?", ((i,) for i in ids))
        self.pset.delete(np.asarray(ids, np.uint64))
        for i in ids:
            self.payloads.pop(i, None)

    def check(self, f: Filter, dk=frozenset()) -> bool:
        """Index (when it answers) == SQL (== reference when no datetime keys); True if the index answered."""
        sql, params = flt.to_sql(flt.validate_filter(f), datetime_keys=dk)
        want = {r[0] for r in self.con.execute(f"SELECT id FROM p WHERE {sql}", params)}
        if not dk:
            ref = {i for i, p in self.payloads.items() if ref_eval(f, p)}
            assert want == ref, flt.to_dict(f)
        mask = self.pset.evaluate(f)
        if mask is None:
            return False
        got = set(self.pset.ext_of_slot[np.flatnonzero(mask)].tolist())
        assert got == want, (flt.to_dict(f), sorted(got ^ want)[:5])
        return True


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_index_matches_sql_and_reference_through_writes(noise):
    rng = random.Random(7 if noise else 8)
    m = Model(TYPED)
    answered = total = 0
    for rnd in range(4):
        ids = rng.sample(range(1, 1500), 300)
        m.upsert(ids, [typed_payload(rng, noise) for _ in ids])
        if rnd:
            m.delete(rng.sample(sorted(m.payloads), 60))
        for _ in range(50):
            answered += m.check(typed_filter(rng))
            total += 1
    # the contents equal a rebuild from the stored rows
    rows = list(m.con.execute("SELECT id, payload FROM p"))
    rebuilt = pi.scan_build(TYPED, [(np.asarray([r[0] for r in rows], np.uint64), [r[1] for r in rows])])
    for _ in range(100):
        f = typed_filter(rng)
        a, b = m.pset.evaluate(f), rebuilt.evaluate(f)
        assert (a is None) == (b is None)
        if a is not None:
            assert set(m.pset.ext_of_slot[np.flatnonzero(a)].tolist()) == \
                set(rebuilt.ext_of_slot[np.flatnonzero(b)].tolist())
    if noise == 0:  # with noise most keys hold foreign values: the SQL path answers (checked above)
        assert answered > 0.5 * total, (answered, total)


def test_mixed_random_payloads_never_disagree():
    """The untyped generator of test_filters (every type everywhere): the index answers only where exact."""
    rng = random.Random(99)
    keys = ["a", "b", "tags", "n.x", "n.y", "n", "deep.l1.l2", "missing", "my-key", "_u"]
    for seed in range(3):
        specs = {k: random.Random(seed * 31 + j).choice(pi.TYPES[:4]) for j, k in enumerate(keys)}
        m = Model(specs)
        ids = list(range(1, 301))
        m.upsert(ids, [rand_payload(rng) for _ in ids])
        for _ in range(60):
            m.check(rand_filter(rng))


def test_type_mismatch_equals_string_on_integer_key():
    m = Model({"n": "integer"})
    m.upsert([1, 2, 3], [{"n": 5}, {"n": [1, 5]}, {"n": 7}])
    assert m.check(Filter(must=(Condition("n", equals="5"),)))          # nothing, from the index
    assert m.check(Filter(must=(Condition("n", equals=5.0),)))          # {1, 2}
    assert m.check(Filter(must=(Condition("n", range=Range(gt=4.5, lt=6)),)))
    m.upsert([4], [{"n": "5"}])
    assert not m.check(Filter(must=(Condition("n", equals="5"),)))      # a string is there now: SQL
    m.upsert([5], [{"n": 5.5}])
    assert not m.check(Filter(must=(Condition("n", equals=5),)))        # a real on an integer key: SQL


def test_datetime_index_and_sql_agree():
    m = Model({"ts": "datetime"})
    vals = ["2024-01-01T00:00:00Z", "2024-01-01T12:30:00+02:00", "2024-01-02", "2024-01-01 10:00:00.250",
            "not a date", "15", 1704067200, 1704067200.5, None, ["2023-12-31T23:59:59Z", "2024-03-01T00:00:00Z"]]
    m.upsert(list(range(1, len(vals) + 1)), [{"ts": v} for v in vals])
    dk = frozenset({"ts"})
    t0 = 1704067200.0  # 2024-01-01T00:00:00Z
    for r in (Range(gte=t0), Range(gt=t0), Range(gte=t0, lt=t0 + 86400), Range(lt=t0), Range(gte=t0 + 36000.25)):
        f = Filter(must=(Condition("ts", range=r),))
        assert m.check(f, dk)
    mask = m.pset.evaluate(Filter(must=(Condition("ts", range=Range(gte=t0, lte=t0)),)))
    assert set(m.pset.ext_of_slot[np.flatnonzero(mask)].tolist()) == {1, 7}
    assert pi.datetime_seconds("2024-01-01T12:30:00+02:00") == t0 + 3600 * 10.5
    assert not m.check(Filter(must=(Condition("ts", equals="2024-01-02"),)), dk)  # text equality: SQL


def test_keys_and_types_are_validated():
    with pytest.raises(RetrievalError, match="keyword, integer, float, bool, datetime"):
        pi.validate_type("text")
    for bad in ("", "a..b", "a b", "$.a", "x" * 300):
        with pytest.raises(RetrievalError):
            pi.validate_key(bad)


def test_allowed_set_is_fast():
    """10%-selective filter over 200k points from the index: well under 5 ms."""
    rng = np.random.default_rng(0)
    n = 200_000
    kw = rng.integers(0, 10, n)
    iv = rng.integers(0, 1000, n)
    pls = [f'{{"kw":"v{a}","n":{b}}}' for a, b in zip(kw.tolist(), iv.tolist())]
    pset = pi.scan_build({"kw": "keyword", "n": "integer"}, [(np.arange(n, dtype=np.uint64), pls)])
    f1 = Filter(must=(Condition("kw", equals="v3"),))
    f2 = Filter(must=(Condition("n", range=Range(gte=100, lt=200)),))
    for f, want in ((f1, kw == 3), (f2, (iv >= 100) & (iv < 200))):
        best = min(_timed(pset, f) for _ in range(20))
        assert (pset.evaluate(f)[:n] == want).all()
        assert best < 0.005, best


def _timed(pset, f) -> float:
    import time

    t0 = time.perf_counter()
    np.flatnonzero(pset.evaluate(f))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Planner
# --------------------------------------------------------------------------------------------------
def test_planner_choices():
    P = pi.plan_filtered
    assert P(0, 200_000, 10, 2048).kind == "none"
    assert P(200, 200_000, 10, 2048) == pi.Plan("exact")          # 0.1%
    assert P(2048, 200_000, 10, 2048) == pi.Plan("exact")
    assert P(100_000, 200_000, 10, 2048, exact=True) == pi.Plan("exact")
    assert P(100_000, 200_000, 10, 2048) == pi.Plan("index", 64)   # 50%: default beam
    assert P(20_000, 200_000, 10, 2048) == pi.Plan("index", 64)    # 10%
    p1 = P(2_049, 200_000, 10, 2048)                              # ~1%: wider beam
    assert p1.kind == "index" and 64 < p1.ef <= 2048
    assert P(2_049, 200_000, 10, 2048, ef=500).ef >= 500
    assert P(3000, 3000, 10, 2048) == pi.Plan("index", 64)
    assert P(2_049, 10**9, 10, 2048, ef_cap=1000).ef == 1000


# --------------------------------------------------------------------------------------------------
# Over gRPC
# --------------------------------------------------------------------------------------------------
D = 16


def _code(fn):
    with pytest.raises(RetrievalError) as e:
        fn()
    return e.value.code if hasattr(e.value, "code") else e.value


def test_create_list_drop_describe(client):
    name = "pidx_api"
    client.create_collection(name, dimension=D, metric="l2")
    rng = np.random.default_rng(1)
    client.upsert(name, np.arange(100), rng.standard_normal((100, D)).astype(np.float32),
                  [{"c": ["a", "b"][i % 2], "n": i} for i in range(100)])
    assert client.list_payload_indexes(name) == []
    assert client.create_payload_index(name, "c", "keyword") == {"key": "c", "type": "keyword", "points": 100}
    client.create_payload_index(name, "n", "integer")
    assert [e["key"] for e in client.list_payload_indexes(name)] == ["c", "n"]
    info = client.describe_collection(name)
    assert info["payload_indexes"] == [{"key": "c", "type": "keyword", "points": 100},
                                       {"key": "n", "type": "integer", "points": 100}]
    codes = {
        "type": _code(lambda: client.create_payload_index(name, "x", "text")),
        "dup": _code(lambda: client.create_payload_index(name, "c", "integer")),
        "key": _code(lambda: client.create_payload_index(name, "a..b", "keyword")),
        "missing": _code(lambda: client.drop_payload_index(name, "zz")),
        "collection": _code(lambda: client.create_payload_index("nope", "c", "keyword")),
    }
    assert codes["type"] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["dup"] == grpc.StatusCode.ALREADY_EXISTS
    assert codes["key"] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["missing"] == grpc.StatusCode.NOT_FOUND
    assert codes["collection"] == grpc.StatusCode.NOT_FOUND
    with pytest.raises(RetrievalError, match="keyword, integer, float, bool, datetime"):
        client.create_payload_index(name, "x", "text")
    client.drop_payload_index(name, "c")
    assert [e["key"] for e in client.list_payload_indexes(name)] == ["n"]
    hits = client.search(name, np.zeros(D, np.float32), k=100, filter={"must": [{"key": "n", "range": {"lt": 7}}]})
    assert sorted(hits.ids.tolist()) == list(range(7))
    client.drop_collection(name)


def _payload(i: int, rng) -> dict:
    return {"c": f"v{i % 10}", "c2": f"v{i % 10}", "sel": int(rng.integers(0, 1000)), "sel_u": None}


@pytest.fixture(scope="module")
def filled(client):
    name = "pidx_knn"
    n = 6000
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, D)).astype(np.float32)
    pls = [_payload(i, rng) for i in range(n)]
    for p in pls:
        p["sel_u"] = p["sel"]
    client.create_collection(name, dimension=D, metric="l2", index={"type": "hnsw", "m": 16, "ef_construction": 100})
    for i in range(0, n, 2000):
        client.upsert(name, np.arange(i, i + 2000), x[i : i + 2000], pls[i : i + 2000])
    client.create_payload_index(name, "c", "keyword")
    client.create_payload_index(name, "sel", "integer")
    wait_indexed(client, name)
    return name, x, pls


@pytest.mark.parametrize("sel_hi,kind", [(1, "exact"), (10, "exact"), (100, "exact"), (500, "index")])
def test_filtered_knn_vs_brute_force(client, filled, sel_hi, kind):
    """Selectivity 0.1% / 1% / 10% / 50% by a range on an integer-indexed key, indexed and unindexed."""
    name, x, pls = filled
    rng = np.random.default_rng(sel_hi)
    xq = rng.standard_normal((20, D)).astype(np.float32)
    f_idx = {"must": [{"key": "sel", "range": {"lt": sel_hi}}], "must_not": [{"key": "c", "equals": "v3"}]}
    f_sql = {"must": [{"key": "sel_u", "range": {"lt": sel_hi}}], "must_not": [{"key": "c2", "equals": "v3"}]}
    match = np.array([i for i, p in enumerate(pls) if p["sel"] < sel_hi and p["c"] != "v3"])
    Dt, It = brute_knn(xq, match.astype(np.uint64), x[match], 10, "l2")
    for f in (f_idx, f_sql):
        Ds, Is = [], []
        for q in xq:
            h = client.search(name, q, k=10, filter=f)
            Is.append(np.pad(h.ids, (0, 10 - len(h.ids)), constant_values=-1))
            Ds.append(np.pad(h.distances, (0, 10 - len(h.ids)), constant_values=np.inf))
        Ds, Is = np.array(Ds), np.array(Is)
        if kind == "exact":
            assert_same_neighbours(Ds, Is, Dt, It)
        else:
            assert recall(Is, It) >= 0.95
    if sel_hi == 1:  # fewer matches than k: the whole matching set comes back
        got = client.search(name, xq[0], k=50, filter=f_idx).ids
        assert sorted(got.tolist()) == sorted(match.tolist())


def test_concurrent_writers_keep_indexes_exact(client):
    name = "pidx_conc"
    client.create_collection(name, dimension=D, metric="l2")
    client.create_payload_index(name, "g", "integer")
    client.create_payload_index(name, "t", "keyword")
    errors = []

    def writer(seed: int):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(25):
                ids = rng.choice(1500, 40, replace=False)
                pls = [{"g": int(rng.integers(0, 30)), "t": [f"t{int(j)}" for j in rng.integers(0, 5, 2)]}
                       for _ in ids]
                client.upsert(name, ids, rng.standard_normal((len(ids), D)).astype(np.float32), pls)
                if rng.random() < 0.3:
                    client.delete(name, ids=rng.choice(1500, 10, replace=False))
                if rng.random() < 0.15:
                    client.delete(name, filter={"must": [{"key": "g", "equals": int(rng.integers(0, 30))}]})
        except Exception as e:  # noqa: BLE001 -- surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ids, _, pls = all_points(client, name, with_vectors=False)
    model = dict(zip(ids.tolist(), [None if p is None else p for p in pls]))
    rng = random.Random(3)
    for _ in range(20):
        f = {"must": [{"key": "g", "any_of": rng.sample(range(30), 2)}],
             "should": [{"key": "t", "equals": f"t{rng.randrange(5)}"}, {"key": "g", "range": {"gte": 25}}]}
        want = {i for i, p in model.items() if ref_eval(flt.from_dict(f), p)}
        got = client.search(name, np.zeros(D, np.float32), k=1000, filter=f).ids
        assert set(got.tolist()) == want
    assert sum(e["points"] for e in client.list_payload_indexes(name) if e["key"] == "g") == len(model)
    client.drop_collection(name)


@pytest.mark.slow  # two server starts (~25 s)
def test_indexes_after_kill_equal_a_rebuild(tmp_path):
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    name = "pidx_crash"
    rng = np.random.default_rng(11)
    try:
        with Client(srv.address, timeout=60) as c:
            c.create_collection(name, dimension=D, metric="l2")
            c.upsert(name, np.arange(2000), rng.standard_normal((2000, D)).astype(np.float32),
                     [{"g": int(i % 50), "ts": f"2024-01-{1 + i % 28:02d}T00:00:00Z"} for i in range(2000)])
            c.create_payload_index(name, "g", "integer")
            c.create_payload_index(name, "ts", "datetime")
            c.upsert(name, np.arange(1500, 2500), rng.standard_normal((1000, D)).astype(np.float32),
                     [{"g": int(i % 7), "ts": "2024-02-01T00:00:00Z"} for i in range(1000)])
            c.delete(name, ids=np.arange(0, 300))
            c.delete(name, filter={"must": [{"key": "g", "equals": 3}]})
        srv.kill()
        srv.start()
        with Client(srv.address, timeout=60) as c:
            assert [e["key"] for e in c.list_payload_indexes(name)] == ["g", "ts"]
            ids, _, pls = all_points(c, name, with_vectors=False)
            model = dict(zip(ids.tolist(), pls))
            assert {e["key"]: e["points"] for e in c.list_payload_indexes(name)} == {"g": len(model), "ts": len(model)}
            for g in (0, 3, 5, 49):
                f = {"must": [{"key": "g", "equals": g}]}
                want = {i for i, p in model.items() if p["g"] == g}
                assert set(c.search(name, np.zeros(D, np.float32), k=1000, filter=f).ids.tolist()) == want
                assert c.count(name, filter=f) == len(want)
            f = {"must": [{"key": "ts", "range": {"gte": 1706745600}}]}  # 2024-02-01: the second batch
            want = {i for i, p in model.items() if p["ts"].startswith("2024-02")}
            assert set(c.search(name, np.zeros(D, np.float32), k=1000, filter=f).ids.tolist()) == want
            assert c.count(name, filter=f) == len(want)  # the SQL path reads the timestamps too
    finally:
        srv.stop()


def test_filtered_knn_through_the_graph_vs_brute_force(tmp_path):
    """The planner's third way: with the in-memory exact path turned down, filters matching 10% and 50%
    of the points search the HNSW graph with the allowed mask (and a wider beam at 10%)."""
    srv = ServerProcess(tmp_path / "data", env={"RETRIEVAL_INDEXING__FILTER_EXACT_IN_MEMORY": "0",
                                                "RETRIEVAL_INDEXING__FILTER_EXACT_THRESHOLD": "200"})
    srv.start()
    try:
        rng = np.random.default_rng(8)
        n = 6000
        x = rng.standard_normal((n, D)).astype(np.float32)
        sel = rng.integers(0, 1000, n)
        with Client(srv.address, timeout=60) as c:
            c.create_collection("g", dimension=D, index={"type": "hnsw", "m": 16, "ef_construction": 100})
            c.upsert("g", np.arange(n), x, [{"sel": int(s)} for s in sel])
            c.create_payload_index("g", "sel", "integer")
            wait_indexed(c, "g")
            xq = rng.standard_normal((30, D)).astype(np.float32)
            for hi in (100, 500):
                match = np.flatnonzero(sel < hi)
                _, It = brute_knn(xq, match.astype(np.uint64), x[match], 10, "l2")
                Is = np.array([c.search("g", q, k=10, filter={"must": [{"key": "sel", "range": {"lt": hi}}]}).ids
                               for q in xq])
                assert recall(Is, It) >= 0.95, hi
    finally:
        srv.stop()
