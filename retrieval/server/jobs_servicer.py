"""Servicer of the Jobs service (proto/retrieval/v1/jobs.proto)."""

from __future__ import annotations

from retrieval.convert import job_to_proto
from retrieval.jobs.manager import JobManager
from retrieval.jsonlimits import loads_client_json
from retrieval.v1 import jobs_pb2, jobs_pb2_grpc


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs

    async def Start(self, request, context):
        params = loads_client_json(request.params_json, "params_json", default={}, expect=dict)
        return job_to_proto(await self.jobs.start(request.kind, params))

    async def Get(self, request, context):
        return job_to_proto(self.jobs.get(request.id))

    async def List(self, request, context):
        return jobs_pb2.ListJobsResponse(jobs=[job_to_proto(r) for r in self.jobs.list(request.kind, request.state)])

    async def Watch(self, request, context):
        async for rec in self.jobs.watch(request.id):
            yield job_to_proto(rec)

    async def Cancel(self, request, context):
        return job_to_proto(await self.jobs.cancel(request.id))

    async def Kinds(self, request, context):
        return jobs_pb2.ListJobKindsResponse(kinds=[
            jobs_pb2.JobKindInfo(name=k.name, description=k.description, resumable=k.resumable)
            for k in sorted(self.jobs.kinds.values(), key=lambda k: k.name)])
