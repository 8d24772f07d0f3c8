"""The job manager: runs job bodies in worker threads, persists their records, streams progress.

A job *kind* is registered once by an engine::

    jobs.register(JobKind("fastrp", body=run_fastrp, validate=check_params, resumable=True))

``body(ctx, **params) -> dict`` runs in a worker thread (see :mod:`retrieval.jobs`); ``validate``
checks and normalises the params before the job is accepted (bad params are an INVALID_ARGUMENT
at start, not a failed job); it runs in a worker thread too (it may open files and try an index spec
in a child process), so the event loop keeps serving other calls meanwhile. Records live in ``<data_dir>/jobs/jobs.sqlite`` and each job has a work
folder ``<data_dir>/jobs/<id>/`` for resumable state.

States: queued -> running -> succeeded | failed | cancelled. On start-up, jobs a previous server left
queued or running are re-queued when their kind is resumable (the body resumes from its work folder)
and marked failed ("interrupted by a server restart") otherwise: never lost silently. A resumed job
cannot make start-up a crash loop: one that was running when the server died of a fatal error in the
job's own thread (a native abort; :mod:`retrieval.crashes`), or that died on two resumes in a row
without making progress, is marked failed with the reason instead of being resumed again.

Thread-safety: the public methods are called from the event-loop thread; bodies report progress from
their worker thread through :class:`ServerJobContext`, which hands updates to the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from retrieval import crashes
from retrieval.core.registry import Registry
from retrieval.errors import Cancelled, InvalidArgument, NotFound, RetrievalError
from retrieval.jobs.context import JobContext

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobKind:
    name: str
    body: Callable[..., dict]
    validate: Callable[[dict], dict] = lambda p: p
    resumable: bool = False
    description: str = ""


@dataclass
class JobRecord:
    id: str
    kind: str
    params: dict
    state: str = "queued"
    done: float = 0.0
    total: float | None = None
    message: str = ""
    error: str = ""
    result: dict = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    resumes: int = 0                      # times resumed after a server restart
    resumed_done: float | None = None     # progress when last resumed
    stalled_resumes: int = 0              # resumes in a row after which the server died before any progress

    def public(self) -> dict:
        """What clients see (the resume bookkeeping stays on the server)."""
        d = asdict(self)
        for key in _BOOKKEEPING:
            del d[key]
        return d

    def stored(self) -> dict:
        return asdict(self)


_BOOKKEEPING = ("resumes", "resumed_done", "stalled_resumes")


class ServerJobContext(JobContext):
    """A job's context inside the server: progress goes to the manager (and its watchers)."""

    def __init__(self, manager: "JobManager", record: JobRecord, work_dir: Path) -> None:
        super().__init__(record.id, work_dir)
        self._manager = manager
        self._record = record
        self._last_push = 0.0

    def _on_progress(self) -> None:
        now = time.monotonic()
        if now - self._last_push < 0.1 and self.total is not None and self.done < self.total:
            return  # at most ten updates a second reach watchers and disk
        self._last_push = now
        done, total, message = self.done, self.total, self.message
        self._manager._loop.call_soon_threadsafe(self._manager._progress, self._record.id, done, total, message)

    def run_coroutine(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's event loop (e.g. writing into a collection) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._manager._loop).result(timeout)


class JobManager:
    def __init__(self, data_dir: Path, max_concurrent: int = 1) -> None:
        self.root = Path(data_dir) / "jobs"
        self.kinds: Registry[JobKind] = Registry("job kind")
        self._jobs: dict[str, JobRecord] = {}
        self._ctx: dict[str, ServerJobContext] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="job")
        self._sem = asyncio.Semaphore(max_concurrent)
        self._db: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------------
    def register(self, kind: JobKind) -> None:
        self.kinds.register(kind.name, kind)

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "jobs.sqlite", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        for (text,) in self._db.execute("SELECT record FROM jobs").fetchall():
            rec = JobRecord(**json.loads(text))
            self._jobs[rec.id] = rec
        crash = crashes.last_crash(self.root.parent)
        for rec in sorted(self._jobs.values(), key=lambda r: r.created_at):
            if rec.state in FINAL:
                continue
            kind = self.kinds.find(rec.kind)
            if kind is not None and kind.resumable:
                if rec.state == "running" and rec.resumed_done is not None:  # died after a resume: progress since?
                    rec.stalled_resumes = rec.stalled_resumes + 1 if rec.done <= rec.resumed_done else 0
                why = ""
                if crash is not None and crash.in_job and rec.state == "running":
                    why = (f"the server died of a fatal error ({crash.error}) in this job's thread (a native "
                           "library abort or crash); it is not resumed again (the stacks are in the server log)")
                elif rec.stalled_resumes >= 2:
                    why = (f"the server stopped on {rec.stalled_resumes} resumes of this job in a row before it made "
                           "any progress; it is not resumed again")
                if why:
                    logger.error("job %s (%s): marked failed: %s", rec.id, rec.kind, why)
                    rec.state, rec.error, rec.finished_at = "failed", why, time.time()
                    self._save(rec)
                    continue
                logger.info("job %s (%s) was %s when the server stopped; resuming", rec.id, rec.kind, rec.state)
                rec.state, rec.message = "queued", "resuming after a server restart"
                rec.resumes, rec.resumed_done = rec.resumes + 1, rec.done
                self._save(rec)
                self._tasks[rec.id] = asyncio.create_task(self._run(rec))
            else:
                rec.state, rec.error, rec.finished_at = "failed", "interrupted by a server restart", time.time()
                self._save(rec)

    async def close(self) -> None:
        for ctx in self._ctx.values():
            ctx.cancel()
        for task in list(self._tasks.values()):
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=10)
            except (asyncio.TimeoutError, Exception):
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._db is not None:
            self._db.close()

    def _save(self, rec: JobRecord) -> None:
        self._db.execute("INSERT OR REPLACE INTO jobs(id, record) VALUES (?, ?)", (rec.id, json.dumps(rec.stored())))

    # ------------------------------------------------------------------------------------------
    async def start(self, kind: str, params: dict) -> JobRecord:
        """Validate and queue a job; returns its record once it is validated.

        ``validate`` runs in a worker thread, not on the event loop: it may open the job's input files
        and run an index spec's trial in a child process (a second or more, once per new faiss spec), and
        every other call keeps being served meanwhile. So a kind's ``validate`` must be safe to call from
        any thread (they read files and engine state under the engines' own locks). A caller cancelled
        while its job is being validated does not undo the start: a job that passed validation (which may
        reserve its output's name) is always queued."""
        k = self.kinds.get(kind)
        if not isinstance(params, dict):
            raise InvalidArgument("job params must be a JSON object")
        return await asyncio.shield(asyncio.ensure_future(self._validate_and_queue(k, dict(params))))

    async def _validate_and_queue(self, k: JobKind, params: dict) -> JobRecord:
        params = await asyncio.to_thread(k.validate, params)
        kind = k.name
        rec = JobRecord(id=f"{int(time.time()):x}{secrets.token_hex(4)}", kind=kind, params=params)
        self._jobs[rec.id] = rec
        self._save(rec)
        self._tasks[rec.id] = asyncio.create_task(self._run(rec))
        return rec

    async def _run(self, rec: JobRecord) -> None:
        kind = self.kinds.get(rec.kind)
        work = self.root / rec.id
        ctx = ServerJobContext(self, rec, work)
        self._ctx[rec.id] = ctx
        try:
            async with self._sem:
                if rec.state == "cancelled":
                    return
                rec.state, rec.started_at = "running", time.time()
                self._publish(rec)
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._pool, lambda: kind.body(ctx, **rec.params))
                rec.result = result if isinstance(result, dict) else {"result": result}
                rec.state = "succeeded"
                if rec.total is not None:
                    rec.done = rec.total
        except Cancelled:
            rec.state = "cancelled"
        except RetrievalError as e:
            rec.state, rec.error = "failed", str(e)
        except Exception as e:  # a bug in a job body must not take the server down
            logger.exception("job %s (%s) failed", rec.id, rec.kind)
            rec.state, rec.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            if rec.state in ("failed", "cancelled") and (ctx.total is not None or ctx.done):
                # the body's last progress report may have been throttled away: record where it stopped
                rec.done, rec.total, rec.message = ctx.done, ctx.total, ctx.message or rec.message
            if rec.state in FINAL:
                rec.finished_at = time.time()
                if rec.state == "succeeded":
                    shutil.rmtree(work, ignore_errors=True)
            self._ctx.pop(rec.id, None)
            self._tasks.pop(rec.id, None)
            self._publish(rec)

    def _progress(self, job_id: str, done: float, total: float | None, message: str) -> None:
        rec = self._jobs.get(job_id)
        if rec is None or rec.state in FINAL:
            return
        rec.done, rec.total, rec.message = done, total, message
        self._publish(rec)

    def _publish(self, rec: JobRecord) -> None:
        self._save(rec)
        for q in self._watchers.get(rec.id, ()):
            q.put_nowait(JobRecord(**rec.public()))

    # ------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        rec = self._jobs.get(job_id)
        if rec is None:
            raise NotFound(f"job {job_id[:64]!r} does not exist")
        return rec

    def list(self, kind: str = "", state: str = "") -> list[JobRecord]:
        if state and state not in STATES:
            raise InvalidArgument(f"unknown job state {state!r}; valid: {', '.join(STATES)}")
        out = [r for r in self._jobs.values() if (not kind or r.kind == kind) and (not state or r.state == state)]
        return sorted(out, key=lambda r: r.created_at)

    async def cancel(self, job_id: str) -> JobRecord:
        rec = self.get(job_id)
        if rec.state in FINAL:
            return rec
        ctx = self._ctx.get(job_id)
        if ctx is not None:
            ctx.cancel()
        if rec.state == "queued":
            rec.state, rec.finished_at = "cancelled", time.time()
            self._publish(rec)
        return rec

    async def watch(self, job_id: str):
        """Yield the job's record now and at every change, until it reaches a final state."""
        rec = self.get(job_id)
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.setdefault(job_id, set()).add(q)
        try:
            first = JobRecord(**rec.public())
            yield first
            if first.state in FINAL:
                return
            while True:
                cur = await q.get()
                yield cur
                if cur.state in FINAL:
                    return
        finally:
            self._watchers[job_id].discard(q)

    async def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        async def _w():
            async for rec in self.watch(job_id):
                if rec.state in FINAL:
                    return rec
            return self.get(job_id)

        return await asyncio.wait_for(_w(), timeout)
