"""The CrossEncoder gRPC service (``proto/retrieval/v1/crossencoder.proto``, docs/crossencoder.md).

Searches and adds spend seconds in the cross-encoder, so every call that scores pairs, loads a model
or touches the disk runs in the default executor, never on the event loop. Building an index is the
job kind ``crossencoder_build``; ``BuildIndex`` stages inline items into a file and starts the job.
"""

from __future__ import annotations

import logging
import secrets

from retrieval import convert
from retrieval.config import LimitsSettings
from retrieval.core.calls import check_count, check_k, run_blocking
from retrieval.crossencoder import convert as cconv
from retrieval.crossencoder.engine import JOB_KIND, CrossEncoderEngine
from retrieval.errors import InvalidArgument, ResourceExhausted
from retrieval.v1 import crossencoder_pb2 as pb
from retrieval.v1 import crossencoder_pb2_grpc

logger = logging.getLogger(__name__)

class CrossEncoderServicer(crossencoder_pb2_grpc.CrossEncoderServicer):
    def __init__(self, engine: CrossEncoderEngine, jobs, limits: LimitsSettings | None = None) -> None:
        self.engine = engine
        self.jobs = jobs
        self.limits = limits or LimitsSettings()

    async def BuildIndex(self, request, context):
        p = cconv.build_request_from_proto(request)
        items = p.pop("items")
        staged = None
        if items:
            if p["items_path"]:
                raise InvalidArgument("send items inline or an items_path, not both")
            self.engine.check_name(p["name"])
            staged = await run_blocking(self.engine.stage_items, f"{p['name']}-{secrets.token_hex(4)}", items)
            p["items_path"], p["staged"] = staged, True
        try:
            rec = await self.jobs.start(JOB_KIND, p)
        except BaseException:
            if staged:
                import os

                os.unlink(staged)
            raise
        return convert.job_to_proto(rec)

    async def AddItems(self, request, context):
        items = cconv.items_from_proto(request.items)
        idx = await run_blocking(self.engine.get, request.index)
        res = await run_blocking(idx.add_items, [i["id"] for i in items], [i["text"] for i in items],
                         [i["payload"] for i in items])
        return cconv.add_result_to_proto(res)

    async def DeleteItems(self, request, context):
        idx = await run_blocking(self.engine.get, request.index)
        n = await run_blocking(idx.delete_items, [int(i) for i in request.ids])
        return pb.DeleteCrossEncoderItemsResponse(deleted=n)

    def _params(self, msg):
        p = cconv.search_params_from_proto(msg)
        if p.budget > self.limits.max_ce_budget:
            raise ResourceExhausted(f"budget = {p.budget} calls exceeds the limit of {self.limits.max_ce_budget} "
                                    "(limits.max_ce_budget)")
        return p

    async def Search(self, request, context):
        k = check_k(request.k, self.limits.max_k)
        params = self._params(request.params)
        idx = await run_blocking(self.engine.get, request.index)

        def work():
            r = idx.search(request.query, k, params)
            pls = [p["payload"] for p in idx.get_items(r.ids[r.ids >= 0].tolist())] if request.with_payloads else None
            return cconv.hits_to_proto(r, pls)

        return await run_blocking(work)

    async def SearchBatch(self, request, context):
        check_count(len(request.queries), self.limits.max_ce_batch, "queries")
        k = check_k(request.k, self.limits.max_k)
        params = self._params(request.params)
        idx = await run_blocking(self.engine.get, request.index)

        def work():
            out = pb.CrossEncoderSearchBatchResponse()
            for r in idx.search_batch(list(request.queries), k, params):
                pls = ([p["payload"] for p in idx.get_items(r.ids[r.ids >= 0].tolist())]
                       if request.with_payloads else None)
                out.results.append(cconv.hits_to_proto(r, pls))
            return out

        return await run_blocking(work)

    async def Describe(self, request, context):
        d = await run_blocking(self.engine.describe, request.index)
        spec = await run_blocking(self.engine.spec, request.index)
        return cconv.info_to_proto(request.index, d, spec)

    async def ListIndexes(self, request, context):
        def work():
            out = pb.ListCrossEncoderIndexesResponse()
            for name in self.engine.names():
                out.indexes.append(cconv.info_to_proto(name, self.engine.describe(name), self.engine.spec(name)))
            return out

        return await run_blocking(work)

    async def DropIndex(self, request, context):
        await run_blocking(self.engine.drop, request.index)
        return pb.DropCrossEncoderIndexResponse()

    async def SetAnchorItems(self, request, context):
        kw = cconv.set_anchor_items_from_proto(request)
        idx = await run_blocking(self.engine.get, request.index)
        await run_blocking(idx.set_anchor_items, **kw)
        return await self.Describe(pb.CrossEncoderIndexRef(index=request.index), context)


def register(server, ctx) -> CrossEncoderEngine:
    """Create the engine under ``ctx.data_dir / "crossencoder"``, register the servicer and the job kind."""
    from pathlib import Path

    from retrieval.jobs.manager import JobKind
    from retrieval.server.auth import allowed_client_dirs, resolve_client_file

    # the job (and a later load of the index's models) reads the client's files through the sandbox,
    # confined to the folders the settings allow when it reads them
    engine = CrossEncoderEngine(ctx.data_dir / "crossencoder",
                                allowed_dirs=lambda: allowed_client_dirs(ctx.settings, ctx.data_dir))
    crossencoder_pb2_grpc.add_CrossEncoderServicer_to_server(CrossEncoderServicer(engine, ctx.jobs, ctx.settings.limits), server)

    staging = (engine.root / "staging").resolve()

    def validate(params: dict) -> dict:
        # Files a client names must lie in the folders clients may read (security.client_file_dirs);
        # only items the servicer staged itself may come from the engine's staging folder.
        params = dict(params)
        for key in ("scorer", "dual_encoder"):
            spec = params.get(key)
            if isinstance(spec, dict) and spec.get("model_dir"):
                params[key] = {**spec, "model_dir": str(resolve_client_file(
                    spec["model_dir"], ctx.settings, ctx.data_dir, f"{key} model directory"))}
        path = params.get("items_path")
        if params.get("staged"):
            if not isinstance(path, str) or Path(path).resolve().parent != staging:
                raise InvalidArgument("staged items must come from the server's own staging folder")
        elif path:
            params["items_path"] = str(resolve_client_file(path, ctx.settings, ctx.data_dir, "items file"))
        return engine.validate_build(params)

    ctx.jobs.register(JobKind(JOB_KIND, body=engine.build_body, validate=validate, resumable=True,
                              description="cross-encoder index: score k_q anchor queries x all items (resumable), "
                                          "then CUR factors"))
    return engine
