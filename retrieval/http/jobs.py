"""``/v1/jobs``: list, get, start, cancel, and a progress stream as server-sent events (``Jobs.Watch``).

The event stream (``GET /v1/jobs/{id}/events``, ``text/event-stream``) sends one ``event: job`` with
the job's record as ``data`` at once and after each progress update, and ends after the record in a
final state (succeeded, failed, cancelled). It counts as an open stream for ``limits.max_streams``.
Browsers' ``EventSource`` cannot send an API key header; the dashboard reads the stream with ``fetch``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, StrictStr

from retrieval import convert
from retrieval.http.common import Body, call, handle
from retrieval.v1 import jobs_pb2

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
J = "/retrieval.v1.Jobs/"


class StartJob(Body):
    kind: StrictStr
    params: dict[str, Any] = Field(default_factory=dict)


@router.get("", summary="List jobs, optionally of one kind / state (Jobs.List)")
async def list_jobs(request: Request, kind: str = "", state: str = ""):
    h = handle(request)
    resp = await call(request, J + "List", h.jobs.List, jobs_pb2.ListJobsRequest(kind=kind, state=state))
    return {"jobs": [convert.job_from_proto(j) for j in resp.jobs]}


@router.get("/kinds", summary="The kinds of job this server runs (Jobs.Kinds)")
async def job_kinds(request: Request):
    h = handle(request)
    resp = await call(request, J + "Kinds", h.jobs.Kinds, jobs_pb2.ListJobKindsRequest())
    return {"kinds": [{"name": k.name, "description": k.description, "resumable": k.resumable} for k in resp.kinds]}


@router.post("", status_code=201, summary="Start a job (Jobs.Start)")
async def start_job(request: Request, body: StartJob):
    h = handle(request)
    req = jobs_pb2.StartJobRequest(kind=body.kind, params_json=json.dumps(body.params))
    return convert.job_from_proto(await call(request, J + "Start", h.jobs.Start, req))


@router.get("/{job_id}", summary="A job's record (Jobs.Get)")
async def get_job(request: Request, job_id: str):
    h = handle(request)
    return convert.job_from_proto(await call(request, J + "Get", h.jobs.Get, jobs_pb2.JobRef(id=job_id)))


@router.post("/{job_id}/cancel", summary="Cancel a job (Jobs.Cancel)")
async def cancel_job(request: Request, job_id: str):
    h = handle(request)
    return convert.job_from_proto(await call(request, J + "Cancel", h.jobs.Cancel, jobs_pb2.JobRef(id=job_id)))


@router.get("/{job_id}/events", summary="Progress as server-sent events until the job ends (Jobs.Watch)",
            response_class=StreamingResponse)
async def job_events(request: Request, job_id: str):
    h = handle(request)
    ref = jobs_pb2.JobRef(id=job_id)
    # key and existence are checked before the 200 goes out, so errors get their status code
    await call(request, J + "Get", h.jobs.Get, ref)
    slot = h.gate.stream(request.headers, J + "Watch")
    slot.__enter__()

    async def events():
        exc: BaseException | None = None
        try:
            async for msg in h.jobs.Watch(ref, None):
                yield f"event: job\ndata: {json.dumps(convert.job_from_proto(msg))}\n\n"
        except BaseException as e:  # the client went away (cancelled) or the watch failed
            exc = e
            raise
        finally:
            slot.__exit__(type(exc) if exc else None, exc, None)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
