"""Concurrent search against our server and PostgreSQL + pgvector, same data, same settings, same run.

    python -m bench.concurrency --pg-dsn postgresql://postgres@127.0.0.1:54330/postgres
    python -m bench.concurrency --quick                  # seconds; no peer without --pg-dsn

Load comes from separate processes (``multiprocessing`` with spawn): a pool of worker processes, each
with its own :class:`retrieval.client.Client` (its own channel and search stream) and its own psycopg
connection, started once and reused by every run. Per run, each taking part runs single-query k=10
searches back to back for ``--duration`` seconds, after a few untimed warm-up queries; a query counts
when it completes inside the window. Reported per run: QPS, p50 / p95 / p99 latency, errors, and the
server's CPU in cores (psutil ``cpu_times`` user + system, delta over the window / wall; for PostgreSQL
summed over the postmaster and all its children).

Our server is started here (``ServerProcess``, loopback, a fresh data folder); PostgreSQL is the one at
``--pg-dsn`` (``bash /work/shared/peers/pgvector/setup.sh start`` prints it). Without ``--pg-dsn`` the peer
is skipped. Runs:

* **search**: 1 / 8 / 32 clients (``--clients``), BIGANN-10k (the shipped 10k x 128, its 100 queries)
  and ``gmm-200k-128`` (``bench.ann.datasets.gaussian_mixture``, seed 0, 1,000 queries); HNSW M=16,
  ef_construction=200 on both sides; ef = the smallest of ``EF_GRID`` whose recall@10 on the first 200
  queries is >= 0.95, chosen for each system separately;
* **threads**: one process, 8 threads sharing one Client, vs 1 thread (BIGANN-10k);
* **filtered**: one client, on gmm-200k, a keyword field (``tag = v``) and an integer range field
  (``num < c``) at 50% / 10% / 1% / 0.1% selectivity, with payload indexes on both when the client has
  ``create_payload_index`` (else unindexed, and the output says so); pgvector gets b-tree indexes and
  ``hnsw.iterative_scan = relaxed_order``. Recall@10 against exact search over the matching points;
* **mixed**: 8 readers on a copy of BIGANN-10k, without and then with 2 writer processes upserting
  batches of 50 points (new ids, then updates of their own, as ``bench.load`` does).

The load generator shares the machine with the servers: on 2 cores, 32 client processes take CPU the
servers would otherwise get, on both sides alike. Writes ``concurrency.json`` / ``.md`` / ``.png`` under
``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
BIGANN = ROOT / "bench" / "datasets" / "vectors" / "bigann-128-euclidean-10k"
D = 128
K = 10
M, EF_CONSTRUCTION = 16, 200
EF_GRID = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
RECALL_TARGET = 0.95
RECALL_QUERIES = 200
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)
THREADS = 8
WRITERS = 2
WRITE_BATCH = 50
OWN_CAP = 1000  # live points per writer at most (then only updates), as bench.load
WARMUP = 3      # untimed queries per client before the window


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """``xb`` (n, d) float32 with ids 0..n-1, ``xq`` (nq, d) the queries the clients cycle through,
    ``gt`` (nr, k) exact top-k ids of ``xq[:nr]``; ``tag`` / ``num`` the payload fields (None: none)."""

    name: str
    xb: np.ndarray
    xq: np.ndarray
    gt: np.ndarray
    tag: np.ndarray | None = None
    num: np.ndarray | None = None
    fingerprint: str = ""

    def __post_init__(self) -> None:
        h = hashlib.sha1(f"{self.name}-m{M}-efc{EF_CONSTRUCTION}-v1".encode())
        h.update(np.ascontiguousarray(self.xb).tobytes())
        if self.tag is not None:
            h.update("\n".join(self.tag.tolist()).encode())
            h.update(self.num.astype(np.int64).tobytes())
        self.fingerprint = h.hexdigest()


def exact_topk(xb: np.ndarray, xq: np.ndarray, k: int, subset: np.ndarray | None = None) -> np.ndarray:
    """Exact L2 top-``k`` ids (nq, min(k, m)) of ``xq`` among ``xb`` (or the rows ``subset`` of it)."""
    rows = np.arange(len(xb)) if subset is None else np.asarray(subset)
    x = xb[rows].astype(np.float64)
    out = []
    for a in range(0, len(xq), 64):
        q = xq[a:a + 64].astype(np.float64)
        d2 = (x * x).sum(1)[None, :] - 2 * q @ x.T
        kk = min(k, len(rows))
        part = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
        order = np.take_along_axis(d2, part, 1).argsort(1, kind="stable")
        out.append(rows[np.take_along_axis(part, order, 1)])
    return np.concatenate(out)


def recall(I, truth) -> float:
    """Mean over queries of |returned ∩ truth| / |truth| (truth may be shorter than k: few matches)."""
    return float(np.mean([len(set(np.asarray(a).tolist()) & set(t.tolist())) / max(1, len(t))
                          for a, t in zip(I, truth)]))


def load_bigann(n: int | None) -> Dataset:
    xb = np.load(BIGANN / "base.u8.npy").astype(np.float32)
    xq = np.load(BIGANN / "queries.u8.npy").astype(np.float32)
    if n is not None and n < len(xb):
        xb = xb[:n]
        gt = exact_topk(xb, xq[:RECALL_QUERIES], K)
    else:
        gt = np.load(BIGANN / "groundtruth.i64.npy")[:RECALL_QUERIES, :K]
    return Dataset(f"bigann-{len(xb) // 1000}k", xb, xq, gt)


def fields(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``tag``: ``sel{s}`` on exactly round(s * n) random points for each selectivity s, ``other`` on the
    rest; ``num``: a random permutation of 0..n-1, so ``num < round(s * n)`` matches exactly that many."""
    perm = np.random.default_rng(seed + 1).permutation(n)
    tag = np.full(n, "other", dtype=object)
    a = 0
    for s in SELECTIVITIES:
        c = max(1, round(s * n))
        tag[perm[a:a + c]] = tag_value(s)
        a += c
    num = np.random.default_rng(seed + 2).permutation(n).astype(np.int64)
    return tag.astype(str), num


def tag_value(s: float) -> str:
    return f"sel{s:g}"


def load_gmm(n: int, nq: int, seed: int = 0) -> Dataset:
    from bench.ann.datasets import gaussian_mixture

    xb, xq = gaussian_mixture(n, D, nq, seed=seed)
    tag, num = fields(n, seed)
    return Dataset(f"gmm-{n // 1000}k-{D}", xb, xq, exact_topk(xb, xq[:RECALL_QUERIES], K), tag, num)


def filter_cases(ds: Dataset) -> list[dict]:
    """Each filter with the matching rows and the exact top-k among them (for recall)."""
    n = len(ds.xb)
    out = []
    for key in ("tag", "num"):
        for s in SELECTIVITIES:
            if key == "tag":
                v = tag_value(s)
                rows = np.flatnonzero(ds.tag == v)
                ours = {"must": [{"key": "tag", "equals": v}]}
                where = f"WHERE tag = '{v}'"
            else:
                c = max(1, round(s * n))
                rows = np.flatnonzero(ds.num < c)
                ours = {"must": [{"key": "num", "range": {"lt": c}}]}
                where = f"WHERE num < {c}"
            out.append({"field": key, "selectivity": s, "matching": len(rows), "ours": ours, "where": where,
                        "truth": exact_topk(ds.xb, ds.xq[:RECALL_QUERIES], K, rows)})
    return out


# --------------------------------------------------------------------------------------------------
# load-generating worker processes
# --------------------------------------------------------------------------------------------------
def _worker(wid: int, conn) -> None:
    """One load-generating process: its own Client and psycopg connection, commands over ``conn``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    state: dict = {"data": {}, "ours": None, "pg": None}
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "stop":
                break
            if msg[0] == "data":
                state["data"].update(msg[1])
                reply = None
            elif msg[0] == "ours":
                from retrieval.client import Client

                if state["ours"] is not None:
                    state["ours"].close()
                state["ours"] = Client(msg[1], timeout=120, max_busy_retries=8)
                state["ours"].wait_ready(60)
                reply = None
            elif msg[0] == "pg":
                import psycopg
                from pgvector.psycopg import register_vector

                state["pg"] = psycopg.connect(msg[1], autocommit=True)
                register_vector(state["pg"])
                reply = None
            else:
                reply = _run(wid, msg[1], state)
            conn.send(("ok", reply))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", f"worker {wid}: {type(e).__name__}: {e}"))
    for key in ("ours", "pg"):
        if state[key] is not None:
            state[key].close()


def _ops(wid: int, spec: dict, state: dict):
    """The timed operation for this spec: a function of a query vector (read) or of a counter (write)."""
    xq = state["data"][spec["data"]]
    target, ef = spec["target"], spec.get("ef", 0)
    if spec["system"] == "ours":
        c = state["ours"]
        if spec["role"] == "read":
            flt = spec.get("filter")
            return lambda i: c.search(target, xq[i % len(xq)], k=K, ef=ef, filter=flt)
    else:
        pg = state["pg"]
        cur = pg.cursor()
        cur.execute(f"SET hnsw.ef_search = {int(ef)}")
        cur.execute("SET hnsw.iterative_scan = " + ("relaxed_order" if spec.get("where") else "off"))
        if spec["role"] == "read":
            # the filter constant is inlined so that the planner sees its selectivity (a prepared generic
            # plan would not); the vector is a parameter, prepared by psycopg after a few executions
            sql = f"SELECT id FROM {target}.items {spec.get('where') or ''} ORDER BY embedding <-> %s LIMIT {K}"

            def read(i):
                cur.execute(sql, (xq[i % len(xq)],))
                return cur.fetchall()
            return read
    # writers: batches of WRITE_BATCH points, new ids until OWN_CAP are live, then updates of their own
    rng = np.random.default_rng(1000 + wid)
    own: list[int] = []
    nxt = [(wid + 1) * 10**9]

    def write(_i):
        n_upd = WRITE_BATCH if len(own) >= OWN_CAP else 0
        ids = (rng.choice(own, n_upd, replace=False).tolist() if n_upd else []) + \
            list(range(nxt[0], nxt[0] + WRITE_BATCH - n_upd))
        x = xq[rng.integers(0, len(xq), len(ids))] + rng.normal(0, 2, (len(ids), D)).astype(np.float32)
        if spec["system"] == "ours":
            c.upsert(target, ids, x)
        else:
            with pg.transaction():
                cur.executemany(f"INSERT INTO {target}.items (id, embedding) VALUES (%s, %s) "
                                "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding",
                                list(zip(ids, x)))
        own.extend(ids[n_upd:])
        nxt[0] += WRITE_BATCH - n_upd
    return write


def _run(wid: int, spec: dict, state: dict) -> dict:
    op = _ops(wid, spec, state)
    t_start, t_end = spec["t_start"], spec["t_start"] + spec["duration"]
    lats: list[list[float]] = []
    errs: dict[str, int] = {}
    lock = threading.Lock()

    def loop(tid: int) -> None:
        i = spec.get("offset", 0) + tid * 7919
        mine: list[float] = []
        for _ in range(WARMUP if spec["role"] == "read" else 0):
            try:
                op(i)
            except Exception:  # noqa: BLE001, S110 - warm-up; errors are counted in the window
                pass
            i += 1
        while time.time() < t_start:
            time.sleep(0.0005)
        while time.time() < t_end:
            t0 = time.perf_counter()
            try:
                op(i)
                err = None
            except Exception as e:  # noqa: BLE001 - counted by type
                err = type(e).__name__
            ms = (time.perf_counter() - t0) * 1e3
            if time.time() <= t_end:
                if err is None:
                    mine.append(ms)
                else:
                    with lock:
                        errs[err] = errs.get(err, 0) + 1
            i += 1
        with lock:
            lats.append(mine)

    n_threads = spec.get("threads", 1)
    if n_threads == 1:
        loop(0)
    else:
        ts = [threading.Thread(target=loop, args=(t,)) for t in range(n_threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return {"lat_ms": np.concatenate([np.asarray(x, np.float32) for x in lats]), "errors": errs}


class Pool:
    """``n`` spawned worker processes, kept for the whole benchmark."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for w in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(w, b), daemon=True)
            p.start()
            self.conns.append(a)
            self.procs.append(p)

    def call(self, msgs: dict[int, tuple]) -> dict[int, object]:
        for w, m in msgs.items():
            self.conns[w].send(m)
        out, bad = {}, []
        for w in msgs:
            st, v = self.conns[w].recv()
            if st == "error":
                bad.append(v)
            out[w] = v
        if bad:
            raise RuntimeError("; ".join(bad))
        return out

    def all(self, msg: tuple) -> None:
        self.call({w: msg for w in range(len(self.conns))})

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()


# --------------------------------------------------------------------------------------------------
# the two systems
# --------------------------------------------------------------------------------------------------
def cpu_snapshot(pid: int) -> dict[int, float]:
    """user + system CPU seconds of ``pid`` and all its descendants, by pid."""
    import psutil

    p = psutil.Process(pid)
    out = {}
    for q in [p, *p.children(recursive=True)]:
        try:
            t = q.cpu_times()
            out[q.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


class Ours:
    name = "ours"

    def __init__(self) -> None:
        from retrieval.client import Client
        from retrieval.server.process import ServerProcess

        self.folder = Path(tempfile.mkdtemp(prefix="retrieval-concurrency-"))
        self.srv = ServerProcess(self.folder / "data", env={"RETRIEVAL_LOG_LEVEL": "WARNING"},
                                 log_path=self.folder / "server.log")
        self.address = self.srv.start()
        self.client = Client(self.address, timeout=1800)
        self.pid = self.srv.proc.pid
        self.payload_index = hasattr(Client, "create_payload_index")

    def load(self, target: str, ds: Dataset, with_fields: bool) -> dict:
        c = self.client
        c.create_collection(target, D, "l2", {"type": "hnsw", "m": M, "ef_construction": EF_CONSTRUCTION})
        info: dict = {}
        if with_fields:
            if self.payload_index:
                try:
                    c.create_payload_index(target, "tag", "keyword")
                    c.create_payload_index(target, "num", "integer")
                    info["payload_index"] = "keyword on tag, integer on num"
                except Exception as e:  # noqa: BLE001 - report and run unindexed
                    info["payload_index"] = f"failed ({type(e).__name__}: {e}); unindexed"
            else:
                info["payload_index"] = "none: Client has no create_payload_index; filters run unindexed"
        t0 = time.perf_counter()
        step = 2000

        def batches():
            for a in range(0, len(ds.xb), step):
                ids = np.arange(a, min(a + step, len(ds.xb)))
                if with_fields:
                    yield ids, ds.xb[ids], [{"tag": t, "num": int(v)} for t, v in zip(ds.tag[ids], ds.num[ids])]
                else:
                    yield ids, ds.xb[ids]
        c.upsert_stream(target, batches())
        info["upsert_s"] = time.perf_counter() - t0
        while c.describe_collection(target)["pending"]:
            time.sleep(0.2)
        info["load_and_index_s"] = time.perf_counter() - t0
        return info

    def search_ids(self, target: str, xq: np.ndarray, ef: int, flt=None) -> np.ndarray:
        _, I = self.client.search_batch(target, xq, k=K, ef=ef, filter=flt)
        return [row[row >= 0] for row in I]

    def read_spec(self, target, ef, case=None) -> dict:
        return {"system": "ours", "target": target, "ef": ef, "filter": case["ours"] if case else None}

    def plan(self, target, ef, case) -> str | None:
        return None

    def close(self) -> None:
        self.client.close()
        self.srv.stop()


class Pg:
    name = "pgvector"

    def __init__(self, dsn: str) -> None:
        import psycopg
        from pgvector.psycopg import register_vector

        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True)
        register_vector(self.conn)
        cur = self.conn.cursor()
        cur.execute("SELECT pg_backend_pid(), version(), "
                    "(SELECT extversion FROM pg_extension WHERE extname = 'vector')")
        backend, self.version, self.extversion = cur.fetchone()
        import psutil

        self.pid = psutil.Process(backend).parent().pid  # the postmaster (loopback: same machine)
        self.payload_index = True

    def load(self, schema: str, ds: Dataset, with_fields: bool, reuse: bool = True) -> dict:
        cur = self.conn.cursor()
        cur.execute("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s", (schema,))
        row = cur.fetchone()
        if reuse and row and row[0] == ds.fingerprint:
            return {"reused": True, "payload_index": "b-tree on tag and num" if with_fields else None}
        cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        cur.execute(f"CREATE SCHEMA {schema}")
        cur.execute(f"CREATE TABLE {schema}.items (id bigint PRIMARY KEY, embedding vector({D}), tag text, num int)")
        t0 = time.perf_counter()
        with cur.copy(f"COPY {schema}.items (id, embedding, tag, num) FROM STDIN WITH (FORMAT BINARY)") as cp:
            cp.set_types(["int8", "vector", "text", "int4"])
            for i in range(len(ds.xb)):
                cp.write_row((i, ds.xb[i], None if ds.tag is None else str(ds.tag[i]),
                              None if ds.num is None else int(ds.num[i])))
        info: dict = {"copy_s": time.perf_counter() - t0}
        t1 = time.perf_counter()
        cur.execute(f"CREATE INDEX ON {schema}.items USING hnsw (embedding vector_l2_ops) "
                    f"WITH (m = {M}, ef_construction = {EF_CONSTRUCTION})")
        info["hnsw_build_s"] = time.perf_counter() - t1
        if with_fields:
            cur.execute(f"CREATE INDEX ON {schema}.items (tag)")
            cur.execute(f"CREATE INDEX ON {schema}.items (num)")
            info["payload_index"] = "b-tree on tag and num"
        cur.execute(f"ANALYZE {schema}.items")
        cur.execute(f"COMMENT ON SCHEMA {schema} IS '{ds.fingerprint}'")
        info["load_and_index_s"] = time.perf_counter() - t0
        return info

    def _set(self, cur, ef: int, filtered: bool) -> None:
        cur.execute(f"SET hnsw.ef_search = {int(ef)}")
        cur.execute("SET hnsw.iterative_scan = " + ("relaxed_order" if filtered else "off"))

    def search_ids(self, schema: str, xq: np.ndarray, ef: int, where: str | None = None) -> list:
        cur = self.conn.cursor()
        self._set(cur, ef, bool(where))
        sql = f"SELECT id FROM {schema}.items {where or ''} ORDER BY embedding <-> %s LIMIT {K}"
        out = []
        for q in xq:
            cur.execute(sql, (q,))
            out.append(np.array([r[0] for r in cur.fetchall()], np.int64))
        return out

    def read_spec(self, schema, ef, case=None) -> dict:
        return {"system": "pg", "target": schema, "ef": ef, "where": case["where"] if case else None}

    def plan(self, schema, ef, case) -> str:
        cur = self.conn.cursor()
        self._set(cur, ef, True)
        cur.execute(f"EXPLAIN (COSTS OFF) SELECT id FROM {schema}.items {case['where']} "
                    f"ORDER BY embedding <-> %s LIMIT {K}", (np.zeros(D, np.float32),))
        text = " / ".join(r[0].strip() for r in cur.fetchall())
        return re.sub(r"'\[[^\]]*\]'::vector", "$q", text)

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------
def pick_ef(sys_, target: str, ds: Dataset, grid=EF_GRID) -> dict:
    """Smallest ef of ``grid`` with recall@10 >= RECALL_TARGET on ``ds.xq[:RECALL_QUERIES]``."""
    curve = []
    for ef in grid:
        r = recall(sys_.search_ids(target, ds.xq[:len(ds.gt)], ef), ds.gt)
        curve.append({"ef": ef, "recall": r})
        if r >= RECALL_TARGET:
            return {"ef": ef, "recall": r, "reached": True, "curve": curve}
    return {"ef": grid[-1], "recall": curve[-1]["recall"], "reached": False, "curve": curve}


def measure(pool: Pool, sys_, specs: dict[int, dict], duration: float, lead: float) -> dict:
    """Run ``specs`` (worker -> spec) for ``duration`` s from a common start; summarize reads and writes."""
    t_start = time.time() + lead
    for s in specs.values():
        s["t_start"], s["duration"] = t_start, duration
    for w, s in specs.items():
        pool.conns[w].send(("run", s))
    import psutil

    time.sleep(max(0.0, t_start - time.time()))
    c0, m0 = cpu_snapshot(sys_.pid), psutil.cpu_times()
    w0 = {w: cpu_snapshot(pool.procs[w].pid) for w in specs}
    time.sleep(max(0.0, t_start + duration - time.time()))
    c1, m1 = cpu_snapshot(sys_.pid), psutil.cpu_times()
    w1 = {w: cpu_snapshot(pool.procs[w].pid) for w in specs}
    out, bad = {}, []
    for w in specs:
        st, v = pool.conns[w].recv()
        if st == "error":
            bad.append(v)
        out[w] = v
    if bad:
        raise RuntimeError("; ".join(bad))
    busy = lambda t: sum(t) - t.idle - getattr(t, "iowait", 0.0)
    res = {"server_cpu_cores": sum(v - c0.get(p, 0.0) for p, v in c1.items()) / duration,
           "clients_cpu_cores": sum(v - w0[w].get(p, 0.0) for w in specs for p, v in w1[w].items()) / duration,
           "machine_busy_cores": (busy(m1) - busy(m0)) / duration}
    # CPU taken by everything else on the machine during the window (other users' jobs): read with care
    res["other_cpu_cores"] = max(0.0, res["machine_busy_cores"] - res["server_cpu_cores"] - res["clients_cpu_cores"])
    for role in ("read", "write"):
        ws = [w for w, s in specs.items() if s["role"] == role]
        if not ws:
            continue
        lat = np.concatenate([out[w]["lat_ms"] for w in ws])
        errs: dict = {}
        for w in ws:
            for k, v in out[w]["errors"].items():
                errs[k] = errs.get(k, 0) + v
        pre = "" if role == "read" else "write_"
        res[pre + "ops"] = len(lat)
        res[pre + "qps" if role == "read" else "write_ops_per_s"] = len(lat) / duration
        for q in (50, 95, 99):
            res[f"{pre}p{q}_ms"] = float(np.percentile(lat, q)) if len(lat) else None
        res[pre + "errors"] = errs
    return res


def reads(sys_, target: str, ef: int, data: str, workers, threads: int = 1, case=None) -> dict[int, dict]:
    return {w: {**sys_.read_spec(target, ef, case), "role": "read", "data": data, "threads": threads,
                "offset": 101 * w} for w in workers}


def _warm_imports() -> None:
    import importlib

    for mod in ("torch", "matplotlib.pyplot"):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001, S110 - only a warm-up; the report imports them again
            pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg-dsn", default=None, help="PostgreSQL + pgvector to compare with (skipped when absent)")
    ap.add_argument("--quick", action="store_true", help="small sets, short runs (the smoke test)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per run (default 10, --quick 0.2)")
    ap.add_argument("--clients", default=None, help="client processes per search run (default 1,8,32; --quick 1,2)")
    ap.add_argument("--n", type=int, default=None, help="points of the synthetic set (default 200000)")
    ap.add_argument("--pg-reload", action="store_true", help="rebuild the PostgreSQL tables even if they match")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "concurrency")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    duration = args.duration or (0.2 if args.quick else 10.0)
    clients = [int(c) for c in (args.clients or ("1,2" if args.quick else "1,8,32")).split(",")]
    n = args.n or (5000 if args.quick else 200_000)
    lead = 0.15 if args.quick else 1.5
    readers = min(8, max(clients))
    writers = 1 if args.quick else WRITERS
    command = "python -m bench.concurrency " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    from tqdm import tqdm

    from bench.ann.machine import machine_info, versions

    pool = Pool(max(max(clients), readers + writers))  # workers import while the data is made
    # the report's imports (torch for machine_info, matplotlib) load while this waits for the servers
    warm = threading.Thread(target=_warm_imports, daemon=True)
    warm.start()
    t_all = time.perf_counter()
    log.info("datasets")
    sets = [load_bigann(2000 if args.quick else None), load_gmm(n, 200 if args.quick else 1000)]
    big, gmm = sets
    cases = filter_cases(gmm)
    pool.all(("data", {ds.name: ds.xq for ds in sets}))

    systems: list = []
    res: dict = {"command": command, "settings": {
        "k": K, "M": M, "ef_construction": EF_CONSTRUCTION, "ef_grid": list(EF_GRID), "recall_target": RECALL_TARGET,
        "duration_s": duration, "clients": clients, "threads": THREADS, "mixed_readers": readers,
        "mixed_writers": writers, "write_batch": WRITE_BATCH, "warmup_queries": WARMUP,
        "datasets": {ds.name: {"n": len(ds.xb), "queries": len(ds.xq), "recall_queries": len(ds.gt)} for ds in sets}},
        "pgvector": None, "loads": {}, "ef": {}, "runs": []}
    try:
        log.info("starting our server and loading")
        ours = Ours()
        systems.append(ours)
        pool.all(("ours", ours.address))
        tgt = {"ours": {big.name: "bigann", gmm.name: "gmm", "mixed": "mixed"},
               "pgvector": {big.name: "bench_bigann", gmm.name: "bench_gmm", "mixed": "bench_mixed"}}
        res["loads"]["ours"] = {big.name: ours.load("bigann", big, False), gmm.name: ours.load("gmm", gmm, True),
                                "mixed": ours.load("mixed", big, False)}
        if args.pg_dsn:
            log.info("loading PostgreSQL")
            pg = Pg(args.pg_dsn)
            systems.append(pg)
            pool.all(("pg", args.pg_dsn))
            res["pgvector"] = {"dsn": args.pg_dsn, "server": pg.version, "extension": pg.extversion}
            res["loads"]["pgvector"] = {big.name: pg.load("bench_bigann", big, False, not args.pg_reload),
                                        gmm.name: pg.load("bench_gmm", gmm, True, not args.pg_reload),
                                        "mixed": pg.load("bench_mixed", big, False, reuse=False)}
        else:
            msg = ("pgvector peer skipped: no --pg-dsn given (start one with "
                   "`bash /work/shared/peers/pgvector/setup.sh start`, which prints the DSN)")
            print(msg, flush=True)
            res["pgvector"] = {"skipped": msg}
        for s in systems:
            res["ef"][s.name] = {ds.name: pick_ef(s, tgt[s.name][ds.name], ds) for ds in sets}
            log.info("%s ef: %s", s.name, {k: (v["ef"], round(v["recall"], 3)) for k, v in res["ef"][s.name].items()})

        log.info("runs")
        n_runs = len(systems) * (2 * len(clients) + len(cases) + 2) + 2
        bar = tqdm(total=n_runs, disable=args.no_progress, desc="runs", file=sys.stderr)

        def run(kind: str, sys_, specs, **extra) -> dict:
            r = {"kind": kind, "system": sys_.name, **extra, **measure(pool, sys_, specs, duration, lead)}
            res["runs"].append(r)
            bar.update(1)
            return r

        for ds in sets:
            for c in clients:
                for s in systems:
                    ef = res["ef"][s.name][ds.name]
                    run("search", s, reads(s, tgt[s.name][ds.name], ef["ef"], ds.name, range(c)), dataset=ds.name,
                        clients=c, threads=1, ef=ef["ef"], recall=ef["recall"])
        ef = res["ef"]["ours"][big.name]
        for t in (1, THREADS):
            run("threads", ours, reads(ours, "bigann", ef["ef"], big.name, [0], threads=t), dataset=big.name,
                clients=1, threads=t, ef=ef["ef"], recall=ef["recall"])
        for case in cases:
            for s in systems:
                ef = res["ef"][s.name][gmm.name]["ef"]
                target = tgt[s.name][gmm.name]
                got = s.search_ids(target, gmm.xq[:len(case["truth"])], ef, case["ours"] if s is ours else case["where"])
                run("filtered", s, reads(s, target, ef, gmm.name, [0], case=case), dataset=gmm.name, clients=1,
                    threads=1, ef=ef, field=case["field"], selectivity=case["selectivity"],
                    matching=case["matching"], recall=recall(got, case["truth"]),
                    payload_index=res["loads"][s.name][gmm.name].get("payload_index"),
                    plan=s.plan(target, ef, case))
        for s in systems:
            ef = res["ef"][s.name][big.name]["ef"]
            target = tgt[s.name]["mixed"]
            for w in (0, writers):
                specs = reads(s, target, ef, big.name, range(readers))
                specs.update({readers + j: {"system": "ours" if s is ours else "pg", "target": target, "ef": ef,
                                            "role": "write", "data": big.name} for j in range(w)})
                run("mixed", s, specs, dataset=big.name, clients=readers, writers=w, ef=ef)
        bar.close()
    finally:
        pool.close()
        for s in systems:
            s.close()
    res["total_s"] = time.perf_counter() - t_all
    log.info("report")
    warm.join()
    res["machine"] = machine_info()
    res["versions"] = versions()
    res["targets"] = targets(res, big.name, gmm.name)
    report(res, args.out)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def _find(res, **kw) -> dict | None:
    for r in res["runs"]:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(res: dict, big: str, gmm: str) -> list[dict]:
    """The issue's targets, each with the measured value and reached True / False (None: not measured)."""
    out = []
    has_pg = "skipped" not in (res["pgvector"] or {"skipped": 1})
    for ds in (big, gmm):
        for c in (8, 32):
            a, b = _find(res, kind="search", system="ours", dataset=ds, clients=c), \
                _find(res, kind="search", system="pgvector", dataset=ds, clients=c)
            v = a["qps"] / b["qps"] if a and b and b["qps"] else None
            out.append({"target": f"search QPS ours / pgvector >= 1.5 at {c} clients ({ds})", "value": v,
                        "reached": None if v is None else v >= 1.5,
                        "note": None if a and (b or has_pg) else "not measured"})
    for ds in (big, gmm):
        a = _find(res, kind="search", system="ours", dataset=ds, clients=8)
        v = a["server_cpu_cores"] if a else None
        out.append({"target": f"our server CPU > 1.5 cores at 8 clients ({ds})", "value": v,
                    "reached": None if v is None else v > 1.5})
    a, b = _find(res, kind="threads", threads=1), _find(res, kind="threads", threads=THREADS)
    v = b["qps"] / a["qps"] if a and b and a["qps"] else None
    out.append({"target": f"{THREADS} threads sharing one Client >= 1.5x one thread", "value": v,
                "reached": None if v is None else v >= 1.5})
    base = _find(res, kind="search", system="ours", dataset=gmm, clients=1)
    for r in res["runs"]:
        if r["kind"] == "filtered" and r["system"] == "ours":
            v = r["p50_ms"] / base["p50_ms"] if base and r["p50_ms"] else None
            out.append({"target": f"filtered p50 <= 2x unfiltered and recall@10 >= 0.95 ({r['field']}, "
                                  f"{r['selectivity']:.1%})", "value": v, "recall": r["recall"],
                        "reached": None if v is None else (v <= 2.0 and r["recall"] >= 0.95)})
    a = _find(res, kind="search", system="ours", dataset=big, clients=1)
    b = _find(res, kind="search", system="pgvector", dataset=big, clients=1)
    out.append({"target": f"single-client p50 ({big}): reported, ours vs pgvector", "value": a["p50_ms"] if a else None,
                "peer": b["p50_ms"] if b else None, "reached": None, "note": "no threshold set; reported"})
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def tables(res: dict) -> str:
    L = []
    systems = ["ours"] + (["pgvector"] if "pgvector" in res["ef"] else [])
    L += [("## ef per system (smallest of the grid with recall@10 >= 0.95 on the first "
          f"{RECALL_QUERIES} queries, or all there are)"), "", "| system | " + " | ".join(res["ef"]["ours"]) + " |",
          "|---|" + "---:|" * len(res["ef"]["ours"])]
    for s in systems:
        L.append(f"| {s} | " + " | ".join(f"ef={v['ef']} (recall {v['recall']:.3f}{'' if v['reached'] else ', NOT reached'})"
                                       for v in res["ef"][s].values()) + " |")
    L += ["", "## Search, single query k=10, N client processes", "",
          ("| dataset | clients | ours QPS | pgvector QPS | ratio | ours p50 / p95 / p99 ms | pgvector p50 / p95 / p99 ms "
          "| ours CPU cores | pgvector CPU cores | client CPU cores ours / pg run | other load ours / pg run "
          "| errors ours / pgvector |"),
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["runs"]:
        if r["kind"] != "search" or r["system"] != "ours":
            continue
        p = _find(res, kind="search", system="pgvector", dataset=r["dataset"], clients=r["clients"])
        lat = lambda x: f"{x['p50_ms']:.2f} / {x['p95_ms']:.2f} / {x['p99_ms']:.2f}" if x and x["p50_ms"] else "-"
        L.append(f"| {r['dataset']} | {r['clients']} | {r['qps']:,.0f} | {_f(p and p['qps'], '{:,.0f}')} | "
                 f"{_f(p and r['qps'] / p['qps'])} | {lat(r)} | {lat(p)} | {r['server_cpu_cores']:.2f} | "
                 f"{_f(p and p['server_cpu_cores'])} | {_f(r.get('clients_cpu_cores'))} / "
                 f"{_f(p and p.get('clients_cpu_cores'))} | {_f(r.get('other_cpu_cores'))} / "
                 f"{_f(p and p.get('other_cpu_cores'))} | {r['errors'] or 0} / {(p['errors'] or 0) if p else '-'} |")
    a, b = _find(res, kind="threads", threads=1), _find(res, kind="threads", threads=THREADS)
    L += ["", f"## One process: {THREADS} threads sharing one Client vs 1 thread ({a['dataset']}, ef={a['ef']})", "",
          "| threads | QPS | p50 ms | p99 ms | server CPU cores | errors |", "|---:|---:|---:|---:|---:|---|"]
    for r in (a, b):
        L.append(f"| {r['threads']} | {r['qps']:,.0f} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | "
                 f"{r['server_cpu_cores']:.2f} | {r['errors'] or 0} |")
    L.append(f"\nratio {THREADS} threads / 1 thread: {b['qps'] / a['qps']:.2f}")
    fl = [r for r in res["runs"] if r["kind"] == "filtered"]
    if fl:
        gmm = fl[0]["dataset"]
        L += ["", f"## Filtered search, 1 client, {gmm}", ""]
        for s in systems:
            r0 = next(r for r in fl if r["system"] == s)
            L.append(f"- {s}: indexes: {r0['payload_index']}")
        L += ["", ("| field | selectivity | matching | ours p50 ms | ours / unfiltered p50 | ours recall@10 | "
              "pgvector p50 ms | pgvector / unfiltered p50 | pgvector recall@10 | errors ours / pgvector |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        base = {s: _find(res, kind="search", system=s, dataset=gmm, clients=1) for s in systems}
        for r in fl:
            if r["system"] != "ours":
                continue
            p = _find(res, kind="filtered", system="pgvector", field=r["field"], selectivity=r["selectivity"])
            ratio = lambda x, s: x["p50_ms"] / base[s]["p50_ms"] if x and x["p50_ms"] and base.get(s) else None
            L.append(f"| {r['field']} | {r['selectivity']:.1%} | {r['matching']:,} | {_f(r['p50_ms'])} | "
                     f"{_f(ratio(r, 'ours'))} | {r['recall']:.3f} | {_f(p and p['p50_ms'])} | "
                     f"{_f(ratio(p, 'pgvector'))} | {_f(p and p['recall'], '{:.3f}')} | "
                     f"{r['errors'] or 0} / {(p['errors'] or 0) if p else '-'} |")
        for r in fl:
            if r.get("plan"):
                L.append(f"\npgvector plan, {r['field']} {r['selectivity']:.1%}: `{r['plan']}`")
    mx = [r for r in res["runs"] if r["kind"] == "mixed"]
    L += ["", (f"## Mixed: {res['settings']['mixed_readers']} readers, without and with writers "
          f"(batches of {WRITE_BATCH} points), {mx[0]['dataset']} copy"), "",
          ("| system | writers | search QPS | search p50 ms | search p99 ms | p99 with / without writers | "
          "write batches/s | write p99 ms | server CPU cores | errors |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in mx:
        base = _find(res, kind="mixed", system=r["system"], writers=0)
        errs = {**(r.get("errors") or {}), **{"write " + k: v for k, v in (r.get("write_errors") or {}).items()}}
        L.append(f"| {r['system']} | {r['writers']} | {r['qps']:,.0f} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | "
                 f"{_f(r['p99_ms'] / base['p99_ms'] if r['writers'] and base['p99_ms'] else None)} | "
                 f"{_f(r.get('write_ops_per_s'), '{:.1f}')} | {_f(r.get('write_p99_ms'))} | "
                 f"{r['server_cpu_cores']:.2f} | {errs or 0} |")
    L += ["", "## Targets", "", "| target | measured | reached |", "|---|---:|---|"]
    for t in res["targets"]:
        val = _f(t["value"])
        if "recall" in t:
            val += f" (recall {t['recall']:.3f})"
        if t.get("peer") is not None:
            val += f" ms (pgvector {t['peer']:.2f} ms)"
        reached = {True: "reached", False: "**not reached**", None: t.get("note") or "not measured"}[t["reached"]]
        L.append(f"| {t['target']} | {val} | {reached} |")
    return "\n".join(L)


def report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    body = tables(res)
    print(body, flush=True)
    (out / "concurrency.json").write_text(json.dumps(res, indent=1, default=str))
    m = res["machine"]
    pg = res["pgvector"] or {}
    head = ["# Concurrent search: our server vs PostgreSQL + pgvector (same run)", "",
            f"Command: `{res['command']}`", "",
            (f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, {m['platform']}; "
            f"load average (1 min) at the end {m['load_average_1m']}. Server, PostgreSQL and all client processes "
            f"share these CPUs."), "",
            "Peer: " + (f"{pg['server'].split(',')[0]}, pgvector {pg['extension']}" if "server" in pg
                        else pg.get("skipped", "none")), "",
            (f"Settings: HNSW M={M}, ef_construction={EF_CONSTRUCTION}, k={K}; {res['settings']['duration_s']:g} s per "
            f"run after {WARMUP} warm-up queries per client; every client is its own process (spawn) with its own "
            "connection; server CPU = user + system CPU-seconds of the server process tree over the window / wall "
            "seconds; client CPU the same over the client processes; other load = machine busy cores minus both "
            "(other jobs on the machine during the window, which make that run's numbers lower). "
            f"Total time {res['total_s']:.0f} s."), ""]
    (out / "concurrency.md").write_text("\n".join(head) + "\n" + body + "\n")
    plot(res, out / "concurrency.png")
    print(f"wrote {out / 'concurrency.json'}, concurrency.md, concurrency.png")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for (s, ds), style in zip([(s, ds) for ds in res["settings"]["datasets"] for s in ("ours", "pgvector")],
                              ("-o", "--o", "-s", "--s")):
        rs = [r for r in res["runs"] if r["kind"] == "search" and r["system"] == s and r["dataset"] == ds]
        if rs:
            ax.plot([r["clients"] for r in rs], [r["qps"] for r in rs], style, label=f"{s}, {ds}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(res["settings"]["clients"], [str(c) for c in res["settings"]["clients"]])
    ax.set_xlabel("client processes")
    ax.set_ylabel("queries / s")
    ax.set_title("single-query search, k=10, recall@10 >= 0.95")
    ax.legend(fontsize=8)
    ax = axes[1]
    for s, style in (("ours", "-"), ("pgvector", "--")):
        for fld, mk in (("tag", "o"), ("num", "s")):
            rs = [r for r in res["runs"] if r["kind"] == "filtered" and r["system"] == s and r["field"] == fld]
            if rs:
                ax.plot([r["selectivity"] * 100 for r in rs], [r["p50_ms"] or np.nan for r in rs], style + mk,
                        label=f"{s}, {fld}")
        gmm = list(res["settings"]["datasets"])[-1]
        b = _find(res, kind="search", system=s, dataset=gmm, clients=1)
        if b:
            ax.axhline(b["p50_ms"], ls=style, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("selectivity (% of points matching)")
    ax.set_ylabel("p50 ms (1 client); grey: unfiltered")
    ax.set_title("filtered search p50")
    ax.legend(fontsize=8)
    ax = axes[2]
    mx = [r for r in res["runs"] if r["kind"] == "mixed"]
    ax.bar(range(len(mx)), [r["p99_ms"] or 0 for r in mx], color=["#4c72b0" if r["system"] == "ours" else "#dd8452"
                                                                   for r in mx])
    ax.set_xticks(range(len(mx)), [f"{r['system']}\n{r['writers']} writers" for r in mx])
    ax.set_ylabel("search p99 ms")
    ax.set_title(f"mixed: {res['settings']['mixed_readers']} readers, with and without writers")
    fig.suptitle(f"concurrency, {res['machine']['logical_cpus']} CPUs shared by servers and clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
