"""The job manager in-process with a small real job body: progress, watch, cancel, failure, and a
restart that resumes a resumable kind and fails a non-resumable one."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from retrieval.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from retrieval.jobs import JobContext, LocalJobContext
from retrieval.jobs.manager import FINAL, JobKind, JobManager

# Gates let a test hold a body at a given step (params must be JSON, so bodies look gates up by name).
GATES: dict[str, threading.Event] = {}
REACHED: dict[str, threading.Event] = {}
CRASH = threading.Event()


def count_body(ctx: JobContext, n: int, delay: float = 0.0, gate: str = "", pause_at: int = -1,
               fail_at: int = -1, fail_typed: bool = False) -> dict:
    """Sum 0..n-1 one step at a time, keeping the next step in work_dir/state.json (resumable)."""
    state = ctx.work_dir / "state.json"
    start, acc = 0, 0
    if state.exists():
        st = json.loads(state.read_text())
        start, acc = st["i"], st["acc"]
    for i in range(start, n):
        ctx.check_cancelled()
        if i == pause_at and gate:
            REACHED[gate].set()
            while not GATES[gate].wait(0.01):
                if CRASH.is_set():
                    raise SystemExit("simulated crash")  # the body's thread ends; its result is ignored
                ctx.check_cancelled()
        if i == fail_at:
            if fail_typed:
                raise FailedPrecondition(f"step {i} needs a precondition that does not hold")
            raise ZeroDivisionError(f"step {i} divided by zero")
        acc += i
        state.write_text(json.dumps({"i": i + 1, "acc": acc}))
        ctx.progress(i + 1, n, "counting")
        if delay:
            time.sleep(delay)
    return {"sum": acc, "resumed_from": start}


def validate(p: dict) -> dict:
    if not isinstance(p.get("n"), int) or p["n"] < 0:
        raise InvalidArgument(f"param n must be an integer >= 0, got {p.get('n')!r}")
    return p


def register(m: JobManager) -> None:
    m.register(JobKind("count", body=count_body, validate=validate, resumable=True, description="count"))
    m.register(JobKind("count_once", body=count_body, validate=validate, resumable=False))


def run(coro_fn, timeout=60):
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout))


def test_progress_watch_and_result(tmp_path):
    async def main():
        m = JobManager(tmp_path)
        register(m)
        await m.open()
        try:
            rec = await m.start("count", {"n": 20, "delay": 0.02})
            assert rec.state in ("queued", "running") and rec.id
            seen = [r async for r in m.watch(rec.id)]
            final = seen[-1]
            assert final.state == "succeeded" and final.result == {"sum": sum(range(20)), "resumed_from": 0}
            assert final.done == final.total == 20 and final.finished_at >= final.started_at > 0
            dones = [r.done for r in seen]
            assert dones == sorted(dones) and len(seen) >= 3  # intermediate progress was streamed
            assert any(0 < r.done < 20 and r.state == "running" and r.message == "counting" for r in seen)
            assert not (tmp_path / "jobs" / rec.id).exists()  # work folder removed on success
            assert [r.id for r in m.list(kind="count", state="succeeded")] == [rec.id]
            assert m.list(kind="count_once") == []
            # watching a finished job yields its final record once
            assert [r.state async for r in m.watch(rec.id)] == ["succeeded"]
        finally:
            await m.close()

    run(main)


def test_bad_starts(tmp_path):
    async def main():
        m = JobManager(tmp_path)
        register(m)
        await m.open()
        try:
            with pytest.raises(InvalidArgument, match="unknown job kind 'nope'; valid: count, count_once"):
                await m.start("nope", {})
            with pytest.raises(InvalidArgument, match="param n must be an integer >= 0, got -1"):
                await m.start("count", {"n": -1})
            with pytest.raises(InvalidArgument, match="JSON object"):
                await m.start("count", [1])
            with pytest.raises(NotFound, match="job 'missing' does not exist"):
                m.get("missing")
            with pytest.raises(InvalidArgument, match="unknown job state"):
                m.list(state="done")
            assert m.list() == []  # nothing was recorded
            with pytest.raises(ValueError, match="registered twice"):
                register(m)
        finally:
            await m.close()

    run(main)


def test_cancel_running_and_queued(tmp_path):
    GATES["c"], REACHED["c"] = threading.Event(), threading.Event()

    async def main():
        m = JobManager(tmp_path, max_concurrent=1)
        register(m)
        await m.open()
        try:
            a = await m.start("count", {"n": 10, "gate": "c", "pause_at": 4})
            b = await m.start("count", {"n": 10})  # queued behind a
            await asyncio.get_running_loop().run_in_executor(None, REACHED["c"].wait, 10)
            assert m.get(a.id).state == "running" and m.get(b.id).state == "queued"
            rb = await m.cancel(b.id)
            assert rb.state == "cancelled"
            await m.cancel(a.id)
            fa = await m.wait(a.id, timeout=10)
            assert fa.state == "cancelled" and 4 <= fa.done < 10
            fb = await m.wait(b.id, timeout=10)
            assert fb.state == "cancelled" and fb.started_at == 0  # it never ran
            assert (await m.cancel(a.id)).state == "cancelled"  # cancelling again is harmless
        finally:
            await m.close()

    run(main)


@pytest.mark.parametrize("typed", [False, True])
def test_failure_is_recorded(tmp_path, typed):
    async def main():
        m = JobManager(tmp_path)
        register(m)
        await m.open()
        try:
            rec = await m.start("count", {"n": 10, "fail_at": 3, "fail_typed": typed})
            final = await m.wait(rec.id, timeout=20)
            assert final.state == "failed" and final.done == 3
            if typed:
                assert final.error == "step 3 needs a precondition that does not hold"
            else:
                assert final.error == "ZeroDivisionError: step 3 divided by zero"
            # the server keeps serving jobs after a failing body
            ok = await m.wait((await m.start("count", {"n": 3})).id, timeout=20)
            assert ok.state == "succeeded"
        finally:
            await m.close()

    run(main)


def test_restart_resumes_resumable_and_fails_others(tmp_path):
    for g in ("r1", "r2"):
        GATES[g], REACHED[g] = threading.Event(), threading.Event()
    CRASH.clear()
    ids: dict[str, str] = {}

    async def first():
        m = JobManager(tmp_path, max_concurrent=2)
        register(m)
        await m.open()
        ids["resumable"] = (await m.start("count", {"n": 12, "gate": "r1", "pause_at": 5})).id
        ids["once"] = (await m.start("count_once", {"n": 12, "gate": "r2", "pause_at": 5})).id
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, REACHED["r1"].wait, 10)
        await loop.run_in_executor(None, REACHED["r2"].wait, 10)
        await asyncio.sleep(0.3)  # let the progress reach the records
        assert m.get(ids["resumable"]).state == "running"
        # a crash: the loop goes away without close(); the records on disk say "running"
        m._pool.shutdown(wait=False)
        return m

    m1 = asyncio.run(first())
    CRASH.set()
    m1._pool.shutdown(wait=True)
    m1._db.close()
    CRASH.clear()
    GATES["r1"].set()
    GATES["r2"].set()

    async def second():
        m = JobManager(tmp_path, max_concurrent=2)
        register(m)
        await m.open()
        try:
            once = m.get(ids["once"])
            assert once.state == "failed" and once.error == "interrupted by a server restart"
            final = await m.wait(ids["resumable"], timeout=30)
            assert final.state == "succeeded"
            assert final.result == {"sum": sum(range(12)), "resumed_from": 5}  # resumed, not restarted
        finally:
            await m.close()

    run(second)

    async def third():  # the final states are durable
        m = JobManager(tmp_path)
        register(m)
        await m.open()
        try:
            assert m.get(ids["resumable"]).state == "succeeded" and m.get(ids["once"]).state == "failed"
            assert all(r.state in FINAL for r in m.list())
        finally:
            await m.close()

    run(third)


def test_local_context_runs_the_same_body(tmp_path):
    ctx = LocalJobContext(tmp_path / "w", show_progress=False)
    assert count_body(ctx, n=7) == {"sum": 21, "resumed_from": 0}
    assert ctx.done == 7 and ctx.total == 7
    ctx.cancel()
    with pytest.raises(Cancelled, match="was cancelled"):
        count_body(ctx, n=9)


def test_validation_runs_off_the_event_loop(tmp_path):
    """A slow validate (an index spec's trial in a child process, files to open) must not stop the loop:
    here validate waits for an event that only another coroutine on the loop sets. On the loop it would
    wait in vain (and fail); off it, the other coroutine runs and the job is accepted."""
    other_ran = threading.Event()
    in_validate = threading.Event()

    def slow_validate(p: dict) -> dict:
        in_validate.set()
        if not other_ran.wait(10):
            raise InvalidArgument("the event loop was blocked while this job was validated")
        return validate(p)

    async def other_call():
        while not in_validate.is_set():
            await asyncio.sleep(0.001)
        other_ran.set()  # a cheap call served while the validation is still running

    async def main():
        m = JobManager(tmp_path)
        m.register(JobKind("slow", body=count_body, validate=slow_validate))
        await m.open()
        try:
            other = asyncio.ensure_future(other_call())
            rec = await m.start("slow", {"n": 3})
            await other
            final = [r async for r in m.watch(rec.id)][-1]
            assert final.state == "succeeded" and final.result["sum"] == 3
        finally:
            await m.close()

    run(main)


def test_a_start_cancelled_during_validation_still_queues_the_validated_job(tmp_path):
    release, entered = threading.Event(), threading.Event()

    def held_validate(p: dict) -> dict:
        entered.set()
        release.wait(10)
        return validate(p)

    async def main():
        m = JobManager(tmp_path)
        m.register(JobKind("held", body=count_body, validate=held_validate))
        await m.open()
        try:
            call = asyncio.ensure_future(m.start("held", {"n": 2}))
            while not entered.is_set():
                await asyncio.sleep(0.001)
            call.cancel()  # the client went away while its job was being validated
            with pytest.raises(asyncio.CancelledError):
                await call
            release.set()
            for _ in range(1000):
                if m.list(kind="held"):
                    break
                await asyncio.sleep(0.01)
            (rec,) = m.list(kind="held")
            final = [r async for r in m.watch(rec.id)][-1]
            assert final.state == "succeeded"
        finally:
            await m.close()

    run(main)
