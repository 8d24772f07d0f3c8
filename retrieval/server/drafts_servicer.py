"""The Drafts gRPC service: draft sessions (bidirectional stream), stateless drafts, datastores.

A draft costs about a millisecond of CPU (bounded by the budget's 1024 nodes), so draft and append run
on the event loop: handing them to a thread pool would cost more than it saves. Work that can take
longer runs in the default executor: closing a session (it may re-index the history) and describing
or dropping a datastore (disk I/O). Datastore builds are jobs (kind ``build_datastore``).

A session lives as long as its stream. A ``close`` message ends the generation and records its output
in the history (unless ``discard``); a stream that ends without it or breaks (client gone) drops the
session without learning from it (a cancelled stream cannot always be told from a half-closed one, so
only the explicit message counts).

Errors inside a stream: a message refused with a domain error (:class:`retrieval.errors.RetrievalError`:
bad ids, malformed top-k, a budget out of range, a context over the maximum, ``append`` before ``open``, a
second ``open``) is answered with a reply whose ``error`` carries the status code and message; the
session is left as it was and the stream goes on. The stream ends with a status only when it cannot go
on: a failed first ``open`` (no session), the session evicted, an unexpected (internal) error.

A session idle past ``idle_timeout_s`` is evicted by the service's sweeper, and its stream is ended at
once with NOT_FOUND (so the stream's admission slot, ``limits.max_sessions``, is released too, even when
the client stays silent).

Sessions name their tokenizer (``tokenizer_fingerprint``); learned state is kept per
``(vocab_size, fingerprint)`` (:class:`DraftsEngine`), and a datastore of another tokenizer is refused.
"""

from __future__ import annotations

import asyncio
import logging

from retrieval.core.calls import check_count
from retrieval.drafting import convert as dconv
from retrieval.drafting.engine import JOB_KIND, DraftsEngine
from retrieval.drafting.session import draft as stateless_draft
from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound, RetrievalError
from retrieval.v1 import drafts_pb2, drafts_pb2_grpc

logger = logging.getLogger(__name__)

class DraftsServicer(drafts_pb2_grpc.DraftsServicer):
    def __init__(self, engine: DraftsEngine, jobs, max_batch: int = 256) -> None:
        self.engine = engine
        self.max_batch = max_batch  # requests per DraftBatch
        self.jobs = jobs

    # --- sessions ------------------------------------------------------------------------------
    async def _manager(self, vocab_size: int, fingerprint: str | None, datastore: str | None):
        mgr = self.engine.manager(vocab_size, fingerprint)
        if mgr.needs_prepare(datastore):  # map + check the datastore, warm-start recycling: off the loop
            await asyncio.get_running_loop().run_in_executor(None, mgr.prepare_datastore, datastore)
        return mgr

    async def Session(self, request_iterator, context):
        mgr = sess = None
        record = False
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        state = {"evicted": False, "done": False}

        def on_evict():  # any thread: end this stream now (it may be waiting for a message that never comes)
            def cancel():
                if not state["done"]:
                    state["evicted"] = True
                    task.cancel()
            loop.call_soon_threadsafe(cancel)

        def gone() -> NotFound:
            return NotFound(f"session {sess.session_id} was evicted after {mgr.config.idle_timeout_s:g}s idle; "
                            "open a new session")

        try:
            it = request_iterator.__aiter__()
            while True:
                try:
                    req = await it.__anext__()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if state["evicted"]:
                        task.uncancel()
                        raise gone() from None
                    raise
                if sess is not None and sess.closed:  # evicted between two messages
                    raise gone()
                kind = req.WhichOneof("kind")
                try:
                    if kind == "close":
                        if sess is None:
                            raise FailedPrecondition("the first message of a draft session must be 'open'")
                        record = not req.close.discard
                        yield drafts_pb2.SessionReply(session_id=sess.session_id, step=sess.steps)
                        break
                    if kind == "open":
                        if sess is not None:
                            raise FailedPrecondition(f"session {sess.session_id} is already open on this stream; "
                                                     "send append messages, or open a new stream")
                        p = dconv.open_from_proto(req.open)
                        vocab, fp = p.pop("vocab_size"), p.pop("tokenizer_fingerprint")
                        mgr = await self._manager(vocab, fp, p["datastore"])
                        p["budget"] = dconv.budget_from_proto(req.open.budget, mgr.config.default_budget)
                        sess = mgr.open(**p)
                        sess.on_evict = on_evict
                        d = sess.draft()
                    elif kind == "append":
                        if sess is None:
                            raise FailedPrecondition("the first message of a draft session must be 'open'")
                        a = dconv.append_from_proto(req.append, sess.budget)
                        mgr.append(sess.session_id, a["accepted_ids"], a["topk"], defer_feedback=True)
                        d = sess.draft(a["budget"])
                    else:
                        raise InvalidArgument("a session message must set 'open', 'append' or 'close'")
                except RetrievalError as e:
                    if sess is None and kind == "open":
                        raise  # no session to keep: the stream ends with this status
                    if sess is not None and sess.closed:
                        raise gone() from None
                    reply = drafts_pb2.SessionReply(session_id=sess.session_id if sess else "",
                                                    step=sess.steps if sess else 0)
                    yield dconv.session_error_to_proto(e, reply)
                    continue
                reply = drafts_pb2.SessionReply(session_id=sess.session_id, step=sess.steps)
                dconv.draft_to_proto(d, reply.draft)
                yield reply
                sess.flush_feedback()  # calibration learns while the client verifies the draft
        finally:
            state["done"] = True
            if sess is not None:
                sess.on_evict = None
                if record:
                    try:
                        await loop.run_in_executor(None, mgr.close, sess.session_id, True)
                    except NotFound:  # evicted meanwhile
                        pass
                else:
                    try:
                        mgr.close(sess.session_id, record=False)
                    except NotFound:
                        pass

    # --- stateless -----------------------------------------------------------------------------
    async def _draft_one(self, m: drafts_pb2.DraftRequest) -> drafts_pb2.DraftReply:
        p = dconv.draft_request_from_proto(m)
        mgr = await self._manager(p["vocab_size"], p["tokenizer_fingerprint"], p["datastore"])
        budget = dconv.budget_from_proto(m.budget, mgr.config.default_budget)
        srcs = mgr.resolve_sources(p["sources"], p["datastore"])
        d = stateless_draft(p["context_ids"], budget, srcs, mgr.calibrator, vocab_size=p["vocab_size"],
                            max_context_tokens=mgr.config.limits.max_context_tokens, combine=mgr.config.combine)
        reply = drafts_pb2.DraftReply()
        dconv.draft_to_proto(d, reply.draft)
        return reply

    async def Draft(self, request, context):
        return await self._draft_one(request)

    async def DraftBatch(self, request, context):
        check_count(len(request.requests), self.max_batch, "draft requests")
        out = drafts_pb2.DraftBatchReply()
        for r in request.requests:
            out.replies.append(await self._draft_one(r))
        return out

    # --- datastores ----------------------------------------------------------------------------
    async def BuildDatastore(self, request, context):
        from retrieval.convert import job_to_proto

        rec = await self.jobs.start(JOB_KIND, dconv.build_request_from_proto(request))
        return job_to_proto(rec)

    async def ListDatastores(self, request, context):
        loop = asyncio.get_running_loop()
        cat = self.engine.catalog

        def work():
            return [cat.describe(n) for n in cat.names()]

        out = drafts_pb2.ListDatastoresResponse()
        for m in await loop.run_in_executor(None, work):
            out.datastores.append(dconv.datastore_info_to_proto(m))
        return out

    async def DescribeDatastore(self, request, context):
        loop = asyncio.get_running_loop()
        m = await loop.run_in_executor(None, self.engine.catalog.describe, request.name)
        return dconv.datastore_info_to_proto(m)

    async def DropDatastore(self, request, context):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.engine.drop_datastore, request.name)
        return drafts_pb2.DropDatastoreResponse()


def register(server, ctx, idle_timeout_s: float | None = None) -> tuple[DraftsEngine, "asyncio.Task"]:
    """Create the engine under ``ctx.data_dir / "drafting"``, register the servicer, the job kind and the
    idle-session sweeper. Returns the engine and the sweeper task (cancel it on stop)."""
    from retrieval.jobs.manager import JobKind

    engine = DraftsEngine(ctx.data_dir / "drafting")  # warm-starts recycling from datastores (what docs report)
    if idle_timeout_s is not None:
        engine.template.idle_timeout_s = float(idle_timeout_s)
    drafts_pb2_grpc.add_DraftsServicer_to_server(DraftsServicer(engine, ctx.jobs), server)
    from retrieval.server.auth import allowed_client_dirs, resolve_client_file

    def validate(params: dict) -> dict:
        # Files a client names must lie in the folders clients may read (security.client_file_dirs).
        params = engine.validate_build(params)
        params["inputs"] = [str(resolve_client_file(p, ctx.settings, ctx.data_dir, "datastore input"))
                            for p in params["inputs"]]
        if params.get("tokenizer"):
            params["tokenizer"] = str(resolve_client_file(params["tokenizer"], ctx.settings, ctx.data_dir,
                                                          "tokenizer file"))
        # the job reads them through retrieval.server.sandbox, confined to these folders (not a client field:
        # validate_build above refuses unknown keys)
        params["allowed_dirs"] = [str(d) for d in allowed_client_dirs(ctx.settings, ctx.data_dir)]
        return params

    ctx.jobs.register(JobKind(JOB_KIND, body=engine.build_body, validate=validate, resumable=True,
                              description="build a corpus draft datastore (suffix array) from text or id files"))

    from retrieval.server import metrics

    g_sessions = metrics.gauge("retrieval_draft_sessions", "draft sessions open (all tokenizers)")
    g_bytes = metrics.gauge("retrieval_draft_session_bytes", "memory of the open draft sessions (Session.nbytes), bytes")
    g_max = metrics.gauge("retrieval_draft_session_max_bytes", "memory of the largest open draft session, bytes")
    g_slots = metrics.gauge("retrieval_draft_state_slots", "per-tokenizer draft state slots held (recycling, "
                            "history, calibration), at most DraftsEngine.max_vocabularies")

    def refresh() -> None:
        st = engine.stats()
        g_sessions.set(st["sessions"])
        g_bytes.set(st["session_bytes"])
        g_max.set(max((m["max_session_bytes"] for m in st["per_manager"]), default=0))
        g_slots.set(st["managers"])

    metrics.add_refresher(refresh)

    async def sweep():
        # the sweeper ends evicted sessions' streams (Session.on_evict), which frees their admission slots
        period = max(0.25, min(1.0, engine.template.idle_timeout_s / 4))
        try:
            while True:
                await asyncio.sleep(period)
                try:
                    engine.evict_idle()  # each manager logs what it evicted
                except Exception:  # the sweeper must keep running
                    logger.exception("idle draft session sweep failed")
        finally:
            metrics.remove_refresher(refresh)

    return engine, asyncio.get_running_loop().create_task(sweep())
