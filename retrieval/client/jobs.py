"""The jobs client methods: start, follow (a tqdm bar from ``Jobs.Watch``), cancel, list; and
:meth:`JobsMixin._run_job`, the wait that every job-starting method of the other engines shares."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.client import types
from retrieval.client.types import JobInfo, JobKind
from retrieval.client_convert import JobTimeout

log = logging.getLogger("retrieval.client")


class JobsMixin:
    """Jobs (``client.jobs``); needs a :class:`~retrieval.client.transport.Transport`."""

    # --- jobs --------------------------------------------------------------------------------------
    def start_job(self, kind: str, **params) -> JobInfo:
        """Start a job (e.g. ``start_job("build_index", ...)``); returns its record at once."""
        return types.job(self._call(self._jobs.Start, cc.start_job_request(kind, params)))

    def get_job(self, job_id: str) -> JobInfo:
        return types.job(self._call(self._jobs.Get, cc.job_ref(job_id)))

    def list_jobs(self, kind: str = "", state: str = "") -> list[JobInfo]:
        return types.job_list(self._call(self._jobs.List, cc.list_jobs_request(kind, state)))

    def cancel_job(self, job_id: str) -> JobInfo:
        return types.job(self._call(self._jobs.Cancel, cc.job_ref(job_id)))

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[JobInfo]:
        """The job's record now and at every change, until it ends."""
        for msg in self._server_stream(self._jobs.Watch, cc.job_ref(job_id), timeout):
            yield types.job(msg)

    def wait_job(self, job_id: str, timeout: float | None = None, progress: bool | None = False) -> JobInfo:
        """Block until the job ends; returns its final record (check ``state`` and ``error``).
        ``timeout``: seconds (the watch's deadline; the job is left running when it passes: it is
        not this call's job to cancel). ``progress``: a tqdm bar on stderr (None: when stderr is a
        terminal)."""
        last = None
        bar = cc.JobBar(cc.show_progress(progress), {"id": job_id})
        try:
            for last in self.watch_job(job_id, timeout):
                bar.update(last)
        finally:
            bar.close()
        return last if last is not None else self.get_job(job_id)

    def run_job(self, kind: str, *, progress: bool | None = None, detach: bool = False,
                timeout: float | None = None, **params) -> JobInfo:
        """Start a job of ``kind`` (see :meth:`job_kinds`; e.g. ``build_index``) and wait for it, like
        every job-starting method: see :meth:`_run_job` for ``progress`` / ``detach`` / ``timeout``."""
        return self._run_job(self.start_job(kind, **params), progress, detach, timeout)

    def _run_job(self, job: JobInfo, progress: bool | None = None, detach: bool = False,
                 timeout: float | None = None) -> JobInfo:
        """Follow a job this client just started (record ``job``) until it ends; returns its final
        record (``state`` "succeeded" | "failed" | "cancelled"; a failed job is returned, not raised).

        ``progress``: a tqdm bar on stderr driven by ``Jobs.Watch`` (None, the default: only when
        stderr is a terminal; True: always; False: never). ``detach``: return ``job`` at once and
        leave the job running. ``timeout``: seconds to wait (None: no limit); past it the job is
        cancelled on the server and :class:`JobTimeout` raised. A ``KeyboardInterrupt`` (Ctrl-C)
        while waiting cancels the job too, then propagates."""
        if detach:
            return job
        try:
            return self._follow_job(job, progress, timeout)
        except (KeyboardInterrupt, JobTimeout):
            self._cancel_quietly(job["id"])
            raise

    def _follow_job(self, job: JobInfo, progress: bool | None, timeout: float | None) -> JobInfo:
        t_end = None if timeout is None else time.monotonic() + timeout
        bar = cc.JobBar(cc.show_progress(progress), job)
        rec = job
        try:
            while rec["state"] not in cc.JOB_FINAL:
                left = None if t_end is None else t_end - time.monotonic()
                if left is not None and left <= 0:
                    raise cc.job_timeout_error(rec, timeout)
                try:
                    for rec in self.watch_job(job["id"], left):
                        bar.update(rec)
                except errors.RetrievalError as e:
                    if getattr(e, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise cc.job_timeout_error(rec, timeout) from None
                    raise
                if rec["state"] not in cc.JOB_FINAL:  # a watch may end on a stale record
                    time.sleep(0.05)
                    rec = self.get_job(job["id"])
                    bar.update(rec)
            return rec
        finally:
            bar.close()

    def _cancel_quietly(self, job_id: str) -> None:
        """Cancel a job this client gave up on; a job that ended meanwhile, or a server that cannot be
        reached, is logged, not raised (the interrupt or timeout is what the caller must see)."""
        try:
            self._call(self._jobs.Cancel, cc.job_ref(job_id), min(self.timeout, 10.0))
            log.info("cancelled job %s", job_id)
        except (errors.RetrievalError, ValueError) as e:
            log.warning("could not cancel job %s: %s", job_id, e)

    def job_kinds(self) -> list[JobKind]:
        return types.job_kinds(self._call(self._jobs.Kinds, cc.job_kinds_request()))

    def _finish_job(self, job: JobInfo) -> JobInfo:
        return self._run_job(job, progress=False)
