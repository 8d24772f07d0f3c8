"""The jobs engine of :class:`retrieval.AsyncClient`, and :meth:`AsyncJobsMixin._run_job`, the wait that every
job-starting method of the other async engines shares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.client import types
from retrieval.client_convert import JobTimeout

log = logging.getLogger("retrieval.aio")  # the logger's name from before the split


class AsyncJobsMixin:
    """Start, follow, watch and cancel server jobs: the async twins of :class:`retrieval.client.jobs.JobsMixin`
    (over :class:`~retrieval.client.aio_transport.AsyncTransport`)."""

    # --- jobs --------------------------------------------------------------------------------------
    async def start_job(self, kind: str, **params) -> dict:
        return types.job(await self._call(self._jobs.Start, cc.start_job_request(kind, params)))

    async def get_job(self, job_id: str) -> dict:
        return types.job(await self._call(self._jobs.Get, cc.job_ref(job_id)))

    async def list_jobs(self, kind: str = "", state: str = "") -> list[dict]:
        return types.job_list(await self._call(self._jobs.List, cc.list_jobs_request(kind, state)))

    async def cancel_job(self, job_id: str) -> dict:
        return types.job(await self._call(self._jobs.Cancel, cc.job_ref(job_id)))

    async def watch_job(self, job_id: str, timeout: float | None = None) -> AsyncIterator[dict]:
        """The job's record now and at every change, until it ends: ``async for rec in c.watch_job(id)``."""
        async with contextlib.aclosing(self._server_stream(self._jobs.Watch, cc.job_ref(job_id), timeout)) as msgs:
            async for msg in msgs:
                yield types.job(msg)

    async def wait_job(self, job_id: str, timeout: float | None = None, progress: bool | None = False) -> dict:
        """As :meth:`retrieval.Client.wait_job` (the job is left running when ``timeout`` passes)."""
        last = None
        bar = cc.JobBar(cc.show_progress(progress), {"id": job_id})
        try:
            async for last in self.watch_job(job_id, timeout):
                bar.update(last)
        finally:
            bar.close()
        return last if last is not None else await self.get_job(job_id)

    async def run_job(self, kind: str, *, progress: bool | None = None, detach: bool = False,
                      timeout: float | None = None, **params) -> dict:
        """Start a job of ``kind`` and wait for it (see :meth:`_run_job`)."""
        return await self._run_job(await self.start_job(kind, **params), progress, detach, timeout)

    async def _run_job(self, job: dict, progress: bool | None = None, detach: bool = False,
                       timeout: float | None = None) -> dict:
        """As :meth:`retrieval.Client._run_job`: follow a job this client just started until it ends
        and return its final record; ``progress`` (a tqdm bar on stderr; None: when stderr is a
        terminal), ``detach`` (return ``job`` at once), ``timeout`` (seconds; past it the job is
        cancelled and :class:`JobTimeout` raised). Cancelling the awaiting task
        (``asyncio.CancelledError``, e.g. ``asyncio.wait_for`` giving up) cancels the server job too."""
        if detach:
            return job
        try:
            return await self._follow_job(job, progress, timeout)
        except (asyncio.CancelledError, KeyboardInterrupt, JobTimeout):
            await asyncio.shield(self._cancel_quietly(job["id"]))
            raise

    async def _follow_job(self, job: dict, progress: bool | None, timeout: float | None) -> dict:
        t_end = None if timeout is None else time.monotonic() + timeout
        bar = cc.JobBar(cc.show_progress(progress), job)
        rec = job
        try:
            while rec["state"] not in cc.JOB_FINAL:
                left = None if t_end is None else t_end - time.monotonic()
                if left is not None and left <= 0:
                    raise cc.job_timeout_error(rec, timeout)
                try:
                    async for rec in self.watch_job(job["id"], left):
                        bar.update(rec)
                except errors.RetrievalError as e:
                    if getattr(e, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise cc.job_timeout_error(rec, timeout) from None
                    raise
                if rec["state"] not in cc.JOB_FINAL:  # a watch may end on a stale record
                    await asyncio.sleep(0.05)
                    rec = await self.get_job(job["id"])
                    bar.update(rec)
            return rec
        finally:
            bar.close()

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self._call(self._jobs.Cancel, cc.job_ref(job_id), min(self.timeout, 10.0))
            log.info("cancelled job %s", job_id)
        except (errors.RetrievalError, ValueError) as e:
            log.warning("could not cancel job %s: %s", job_id, e)

    async def _finish_job(self, job: dict) -> dict:
        return await self._run_job(job, progress=False)

    async def job_kinds(self) -> list[dict]:
        return types.job_kinds(await self._call(self._jobs.Kinds, cc.job_kinds_request()))
