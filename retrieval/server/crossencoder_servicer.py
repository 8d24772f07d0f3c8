"""The CrossEncoder gRPC service (``proto/retrieval/v1/crossencoder.proto``, docs/crossencoder.md).

Searches and adds spend seconds in the cross-encoder, so every call that scores pairs, loads a model
or touches the disk runs in the default executor, never on the event loop. Building an index is the
job kind ``crossencoder_build``; ``BuildIndex`` stages inline items into a file and starts the job.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from retrieval import convert
from retrieval.crossencoder import convert as cconv
from retrieval.crossencoder.engine import JOB_KIND, CrossEncoderEngine
from retrieval.errors import InvalidArgument, ResourceExhausted
from retrieval.v1 import crossencoder_pb2 as pb
from retrieval.v1 import crossencoder_pb2_grpc

logger = logging.getLogger(__name__)

MAX_BATCH = 256       # queries per SearchBatch
MAX_K = 1000
MAX_BUDGET = 100_000  # calls per query


async def _run(fn, *args, **kw):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kw))


def _check_k(k: int) -> int:
    k = int(k) or 10
    if k > MAX_K:
        raise ResourceExhausted(f"k = {k} exceeds the limit of {MAX_K}")
    return k


class CrossEncoderServicer(crossencoder_pb2_grpc.CrossEncoderServicer):
    def __init__(self, engine: CrossEncoderEngine, jobs) -> None:
        self.engine = engine
        self.jobs = jobs

    async def BuildIndex(self, request, context):
        p = cconv.build_request_from_proto(request)
        items = p.pop("items")
        staged = None
        if items:
            if p["items_path"]:
                raise InvalidArgument("send items inline or an items_path, not both")
            self.engine.check_name(p["name"])
            staged = await _run(self.engine.stage_items, f"{p['name']}-{secrets.token_hex(4)}", items)
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
        idx = await _run(self.engine.get, request.index)
        res = await _run(idx.add_items, [i["id"] for i in items], [i["text"] for i in items],
                         [i["payload"] for i in items])
        return cconv.add_result_to_proto(res)

    async def DeleteItems(self, request, context):
        idx = await _run(self.engine.get, request.index)
        n = await _run(idx.delete_items, [int(i) for i in request.ids])
        return pb.DeleteCrossEncoderItemsResponse(deleted=n)

    def _params(self, msg):
        p = cconv.search_params_from_proto(msg)
        if p.budget > MAX_BUDGET:
            raise ResourceExhausted(f"budget = {p.budget} calls exceeds the limit of {MAX_BUDGET}")
        return p

    async def Search(self, request, context):
        k = _check_k(request.k)
        params = self._params(request.params)
        idx = await _run(self.engine.get, request.index)

        def work():
            r = idx.search(request.query, k, params)
            pls = [p["payload"] for p in idx.get_items(r.ids[r.ids >= 0].tolist())] if request.with_payloads else None
            return cconv.hits_to_proto(r, pls)

        return await _run(work)

    async def SearchBatch(self, request, context):
        if len(request.queries) > MAX_BATCH:
            raise ResourceExhausted(f"{len(request.queries)} queries exceed the batch limit of {MAX_BATCH}")
        k = _check_k(request.k)
        params = self._params(request.params)
        idx = await _run(self.engine.get, request.index)

        def work():
            out = pb.CrossEncoderSearchBatchResponse()
            for r in idx.search_batch(list(request.queries), k, params):
                pls = ([p["payload"] for p in idx.get_items(r.ids[r.ids >= 0].tolist())]
                       if request.with_payloads else None)
                out.results.append(cconv.hits_to_proto(r, pls))
            return out

        return await _run(work)

    async def Describe(self, request, context):
        d = await _run(self.engine.describe, request.index)
        spec = await _run(self.engine.spec, request.index)
        return cconv.info_to_proto(request.index, d, spec)

    async def ListIndexes(self, request, context):
        def work():
            out = pb.ListCrossEncoderIndexesResponse()
            for name in self.engine.names():
                out.indexes.append(cconv.info_to_proto(name, self.engine.describe(name), self.engine.spec(name)))
            return out

        return await _run(work)

    async def DropIndex(self, request, context):
        await _run(self.engine.drop, request.index)
        return pb.DropCrossEncoderIndexResponse()

    async def SetAnchorItems(self, request, context):
        kw = cconv.set_anchor_items_from_proto(request)
        idx = await _run(self.engine.get, request.index)
        await _run(idx.set_anchor_items, **kw)
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
    crossencoder_pb2_grpc.add_CrossEncoderServicer_to_server(CrossEncoderServicer(engine, ctx.jobs), server)

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
