"""Building a cross-encoder index: the job body that scores the anchor queries against every item.

:func:`build_index` is a job body (``fn(ctx, **params) -> dict``, see :mod:`retrieval.jobs`). Its cost
is ``k_q * N`` cross-encoder calls, done in chunks of ``chunk_size`` items. After each chunk the rows
of ``R`` (a float32 memmap under ``ctx.work_dir``) are flushed and the chunk is recorded in
``state.json``; a restarted job with the same inputs and work folder resumes from its last finished
chunk (and a cancelled one stops between chunks). Inputs that differ from the recorded ones (another
scorer, other items or anchor queries, another chunk size) restart the scoring from scratch.

Then, at no further call: dual-encoder item embeddings (if a dual encoder is given), the anchor items,
the centred and regularised CUR factors, and the index folder (layout in
:mod:`retrieval.crossencoder.index`), whose ``meta.json`` is written last.

Parameters are JSON-serialisable (scorer / dual encoder as ``{"name": backend, **params}`` specs,
items as a list of dicts or a JSONL path) so the same body runs under the server's job manager; in
process, scorer and dual-encoder objects are accepted too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from retrieval.crossencoder.cur import select_anchor_items, solve_cur
from retrieval.crossencoder.dual import DualEncoder, dual_encoder_from_spec
from retrieval.crossencoder.index import (
    FORMAT,
    BuildParams,
    CrossEncoderIndex,
    _save_cur,
)
from retrieval.crossencoder.scorers import CallStats, Scorer, scorer_from_spec, validate_texts
from retrieval.errors import AlreadyExists, InvalidArgument, NotFound
from retrieval.jobs import JobContext, LocalJobContext
from retrieval.storage import atomic

logger = logging.getLogger(__name__)

__all__ = ["build_and_load", "build_index", "load_items", "pick_anchor_queries", "read_items_jsonl"]


def read_items_jsonl(f: IO[bytes], shown: str) -> list[Any]:
    """The records of a JSONL items file open for binary reading (one JSON object per non-blank line,
    UTF-8); ``shown`` names the file in errors (:class:`InvalidArgument` for a line that is not JSON)."""
    recs = []
    for j, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        try:
            recs.append(json.loads(raw))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise InvalidArgument(f"items file {shown!r}, line {j}: not a JSON object ({e})") from None
    return recs


def load_items(items: list[dict[str, Any]] | str | os.PathLike[str]) -> tuple[list[int], list[str], list[Any]]:
    """Items as ``(ids, texts, payloads)`` from a list of ``{"id", "text", "payload"?}`` or a JSONL file.

    Raises :class:`InvalidArgument` for a missing / non-integer / duplicate id or an empty text.
    """
    if isinstance(items, (str, os.PathLike)):
        p = Path(items)
        if not p.is_file():
            raise NotFound(f"items file {str(p)!r} does not exist")
        with open(p, "rb") as f:
            recs = read_items_jsonl(f, str(p))
    else:
        recs = list(items)
    ids, texts, payloads = [], [], []
    seen: set[int] = set()
    for j, r in enumerate(recs):
        if not isinstance(r, dict) or "id" not in r or "text" not in r:
            raise InvalidArgument(f"items[{j}] must be an object with 'id' and 'text', got {str(r)[:80]!r}")
        i = r["id"]
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < 2**63:
            raise InvalidArgument(f"items[{j}].id must be an integer in [0, 2^63), got {i!r}")
        if int(i) in seen:
            raise InvalidArgument(f"items[{j}].id = {i} is a duplicate")
        seen.add(int(i))
        pl = r.get("payload")
        if pl is not None and not isinstance(pl, dict):
            raise InvalidArgument(f"items[{j}].payload must be a JSON object or null, got {type(pl).__name__}")
        ids.append(int(i))
        texts.append(r["text"])
        payloads.append(pl)
    validate_texts(texts, "items[].text")
    if not ids:
        raise InvalidArgument("items is empty; an index needs at least one item")
    return ids, texts, payloads


def pick_anchor_queries(anchor_queries: list[str] | None, query_log: list[str] | None, k_q: int | None,
                        seed: int = 0) -> list[str]:
    """The anchor queries: given as is, or ``k_q`` distinct texts sampled (seeded) from a query log."""
    if anchor_queries is not None:
        qs = validate_texts(anchor_queries, "anchor_queries")
        if not qs:
            raise InvalidArgument("anchor_queries is empty; give at least one anchor query")
        if k_q is not None and k_q != len(qs):
            raise InvalidArgument(f"k_q = {k_q} but {len(qs)} anchor_queries were given; leave k_q out or make them agree")
        if len(set(qs)) != len(qs):
            raise InvalidArgument("anchor_queries contain duplicates; each anchor query must be distinct")
        return qs
    if query_log is None:
        raise InvalidArgument("give anchor_queries, or a query_log and k_q to sample them from")
    log = list(dict.fromkeys(validate_texts(query_log, "query_log")))
    if not isinstance(k_q, int) or k_q < 1:
        raise InvalidArgument(f"k_q must be a positive integer when sampling from a query log, got {k_q!r}")
    if k_q > len(log):
        raise InvalidArgument(f"k_q = {k_q} exceeds the {len(log)} distinct queries in the query log")
    rng = np.random.default_rng(seed)
    return [log[j] for j in np.sort(rng.choice(len(log), k_q, replace=False))]


def _input_key(fp_key: str, queries: list[str], ids: list[int], texts: list[str], chunk: int) -> str:
    h = hashlib.sha256()
    h.update(f"{fp_key}|{chunk}|{len(queries)}|{len(ids)}".encode())
    for q in queries:
        h.update(q.encode("utf-8", "surrogatepass") + b"\0")
    for i, t in zip(ids, texts, strict=True):
        h.update(f"{i}:".encode() + t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _score_anchor_matrix(ctx: JobContext, sc: Scorer, fp_key: str, queries: list[str], ids, texts: list[str], C: int):
    """Score every anchor query against every item into the memory-mapped ``R.f32`` of the job's work
    folder, ``C`` items per chunk, resuming after the chunks a previous run of the same inputs finished.
    Returns ``(RT, r_path, state_p, state, resumed_chunks, calls_of_this_run)``."""
    N, kq = len(ids), len(queries)
    n_chunks = (N + C - 1) // C
    wd = Path(ctx.work_dir)
    wd.mkdir(parents=True, exist_ok=True)
    key = _input_key(fp_key, queries, ids, texts, C)
    state_p = wd / "state.json"
    r_path = wd / "R.f32"
    state = json.loads(state_p.read_text()) if state_p.exists() else None
    if state is None or state.get("key") != key or not r_path.exists():
        if state is not None:
            logger.warning("work folder %s holds a build of other inputs; starting the scoring over", wd)
        state = {"key": key, "n_chunks": n_chunks, "done": [], "truncated_items": 0,
                 "truncated_queries": 0, "calls": 0, "scorer_seconds": 0.0}
        RT = np.memmap(r_path, dtype="<f4", mode="w+", shape=(N, kq))
        del RT
        atomic.write_json(state_p, state)
    RT = np.memmap(r_path, dtype="<f4", mode="r+", shape=(N, kq))
    done = set(state["done"])
    resumed = len(done)
    if resumed:
        logger.info("resuming the scoring at chunk %d of %d (%d chunks done)", min(set(range(n_chunks)) - done, default=n_chunks), n_chunks, resumed)
    run_stats = CallStats()
    ctx.progress(len(done) * C if len(done) < n_chunks else N, N, "scoring anchor queries x items")
    for c in range(n_chunks):
        if c in done:
            continue
        ctx.check_cancelled()
        s, e = c * C, min(N, (c + 1) * C)
        chunk = texts[s:e]
        qs = [q for _ in chunk for q in queries]
        its = [t for t in chunk for _ in queries]
        st = CallStats()
        scores, tq, ti = sc.score_detailed(qs, its, st)
        RT[s:e] = scores.reshape(e - s, kq)
        RT.flush()
        run_stats.add(st)
        done.add(c)
        state["done"] = sorted(done)
        state["calls"] += st.calls
        state["scorer_seconds"] += st.seconds
        state["truncated_items"] += int(ti.reshape(e - s, kq).any(axis=1).sum())
        state["truncated_queries"] = max(state["truncated_queries"], int(tq.reshape(e - s, kq).any(axis=0).sum()))
        atomic.write_json(state_p, state)
        ctx.progress(min(N, len(done) * C), N, "scoring anchor queries x items")
    ctx.check_cancelled()
    return RT, r_path, state_p, state, resumed, run_stats


def _dual_embeddings(ctx: JobContext, de_enc: DualEncoder, texts: list[str]) -> np.ndarray:
    """The dual encoder's item embeddings ``(N, d)`` float32, 1,024 items at a time (cancellable)."""
    N = len(texts)
    ctx.progress(0, N, "dual-encoder item embeddings")
    parts = []
    for s in range(0, N, 1024):
        ctx.check_cancelled()
        parts.append(de_enc.encode(texts[s : s + 1024]))
        ctx.progress(min(N, s + 1024), N, "dual-encoder item embeddings")
    return np.concatenate(parts).astype(np.float32)


def _write_data_files(out_dir: Path, r_path: Path, ids, texts, payloads, de, cur, queries) -> None:
    """The index folder's data files (everything but ``meta.json``, which names them and goes last)."""
    N = len(ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    r_final = out_dir / "R.f32"
    shutil.copyfile(r_path, r_final)
    with open(out_dir / "alive.u8", "wb") as f:
        f.write(np.ones(N, dtype=np.uint8).tobytes())
    with open(out_dir / "items.jsonl", "wb") as f:
        for i, t, pl in zip(ids, texts, payloads, strict=True):
            f.write((json.dumps({"id": i, "text": t, "payload": pl}, ensure_ascii=False) + "\n").encode())
    if de is not None:
        with open(out_dir / "de.f32", "wb") as f:
            f.write(np.ascontiguousarray(de, dtype="<f4").tobytes())
    _save_cur(out_dir, 0, cur)
    (out_dir / "anchor_queries.json").write_text(json.dumps(queries, ensure_ascii=False))


def build_index(ctx: JobContext, *, index_dir: str | os.PathLike[str], items: list[dict[str, Any]] | str,
                scorer: Scorer | dict[str, Any], anchor_queries: list[str] | None = None,
                query_log: list[str] | None = None, k_q: int | None = None,
                dual_encoder: DualEncoder | dict[str, Any] | None = None,
                params: BuildParams | dict[str, Any] | None = None, query_seed: int = 0) -> dict[str, Any]:
    """Job body: score ``k_q`` anchor queries x all items (resumable), factorise, write ``index_dir``.

    ``items``: ``[{"id": int, "text": str, "payload": dict?}, ...]`` or a JSONL path. ``anchor_queries``
    or (``query_log``, ``k_q``, ``query_seed``): see :func:`pick_anchor_queries`. ``params``:
    :class:`BuildParams` (``k_i``, ``anchor_method``, ``solver``, ``ridge``, ``rank``, ``seed``,
    ``chunk_size``). Returns the build statistics (calls, seconds, resumed chunks, truncations).
    Raises :class:`AlreadyExists` if ``index_dir`` already holds an index.
    """
    t0 = time.perf_counter()
    bp = BuildParams.from_any(params)
    out_dir = Path(index_dir)
    if (out_dir / "meta.json").exists():
        raise AlreadyExists(f"an index already exists at {str(out_dir)!r}")
    ids, texts, payloads = load_items(items)
    queries = pick_anchor_queries(anchor_queries, query_log, k_q, query_seed)
    sc = scorer_from_spec(scorer)
    de_enc = dual_encoder_from_spec(dual_encoder)
    if bp.anchor_method == "kmeans-de" and de_enc is None:
        raise InvalidArgument("anchor_method 'kmeans-de' needs a dual_encoder")
    fp = sc.fingerprint()
    N, kq = len(ids), len(queries)
    C = bp.chunk_size
    n_chunks = (N + C - 1) // C

    # --- resumable scoring of R ----------------------------------------------------------------
    RT, r_path, state_p, state, resumed, run_stats = _score_anchor_matrix(ctx, sc, fp.key, queries, ids, texts, C)

    # --- dual encoder, anchors, factors (no calls) --------------------------------------------
    de = _dual_embeddings(ctx, de_enc, texts) if de_enc is not None else None
    ctx.progress(0, 1, "solving CUR factors")
    k_i = min(bp.k_i, N)
    if k_i != bp.k_i:
        logger.warning("k_i = %d exceeds the %d items; using k_i = %d", bp.k_i, N, k_i)
        bp = dataclasses.replace(bp, k_i=k_i)
    anchors = select_anchor_items(bp.anchor_method, k_i, RT, np.arange(N), de, bp.seed)
    cur = solve_cur(RT, anchors, bp.solver, bp.ridge, bp.rank)
    ctx.progress(1, 1, "solving CUR factors")

    # --- write the folder (meta last) ----------------------------------------------------------
    RT.flush()
    del RT
    _write_data_files(out_dir, r_path, ids, texts, payloads, de, cur, queries)
    seconds = time.perf_counter() - t0
    build_stats = {
        "calls": int(state["calls"]),
        "calls_this_run": run_stats.calls,
        "scorer_seconds": float(state["scorer_seconds"]),
        "seconds_this_run": seconds,
        "resumed_chunks": resumed,
        "n_chunks": n_chunks,
        "truncated_items": int(state["truncated_items"]),
        "truncated_anchor_queries": int(state["truncated_queries"]),
    }
    meta = {
        "format": FORMAT,
        "scorer": fp.to_dict(),
        "scorer_backend": getattr(sc, "name", "?"),
        "dual_encoder": de_enc.fingerprint().to_dict() if de_enc is not None else None,
        "de_dim": int(de.shape[1]) if de is not None else 0,
        "k_q": kq,
        "n_rows": N,
        "cur_gen": 0,
        "build": dataclasses.asdict(bp),
        "build_stats": build_stats,
        "sizes": {
            "R": N * kq * 4,
            "alive": N,
            "items": (out_dir / "items.jsonl").stat().st_size,
            "E": int(cur.E.nbytes),
            "de": int(de.nbytes) if de is not None else 0,
        },
        "created_unix": time.time(),
    }
    atomic.fsync_tree(out_dir)  # the data files are durable before the meta that names them
    atomic.write_json(out_dir / "meta.json", meta)
    for f in (r_path, state_p):
        f.unlink(missing_ok=True)
    logger.info("built cross-encoder index %s: %d items, k_q=%d, k_i=%d, %d calls this run (%.1fs)",
                out_dir, N, kq, k_i, run_stats.calls, seconds)
    return {"index_dir": str(out_dir), "n_items": N, "k_q": kq, "k_i": k_i,
            "fingerprint": fp.key, **build_stats}


def build_and_load(index_dir: str | os.PathLike[str], *, scorer: Scorer | dict[str, Any],
                   dual_encoder: DualEncoder | dict[str, Any] | None = None,
                   work_dir: str | os.PathLike[str] | None = None, show_progress: bool = False,
                   **params: Any) -> tuple[CrossEncoderIndex, dict[str, Any]]:
    """Run :func:`build_index` in process (``LocalJobContext``) and open the result.

    ``work_dir`` defaults to ``<index_dir>.work``. Returns ``(index, build statistics)``.
    """
    sc = scorer_from_spec(scorer)
    de = dual_encoder_from_spec(dual_encoder)
    wd = Path(work_dir) if work_dir is not None else Path(str(index_dir) + ".work")
    ctx = LocalJobContext(wd, show_progress=show_progress)
    try:
        stats = build_index(ctx, index_dir=index_dir, scorer=sc, dual_encoder=de, **params)
    finally:
        ctx.close()
    shutil.rmtree(wd, ignore_errors=True)
    return CrossEncoderIndex.load(index_dir, sc, de), stats
