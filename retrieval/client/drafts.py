"""The drafts client methods (n-gram draft lookups for speculative decoding): stateless drafts,
:class:`DraftSession` (one generation's stream), corpus datastores; shared by the async client
(:func:`_fingerprint`, :func:`_budget`)."""

from __future__ import annotations

import os
import queue

import grpc

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.client import types
from retrieval.client.types import DatastoreInfo, JobInfo
from retrieval.v1 import drafts_pb2


def _dconv():
    """``retrieval.drafting.convert``, imported on the first drafts call: it loads the drafting engine
    package (its datastores, sources, ...), which a vector-search client never needs."""
    from retrieval.drafting import convert

    return convert


def _budget(max_nodes: int, max_depth: int, chain: bool | None):
    """The draft budget of the arguments (0: the server's default)."""
    from retrieval.drafting.draft import DraftBudget

    return DraftBudget(max_nodes or 64, max_depth or 10, not chain)


class DraftsMixin:
    """Drafts (``client.drafts``); needs a :class:`~retrieval.client.transport.Transport`."""

    # --- drafts (speculative decoding) -------------------------------------------------------------
    def _drafts_stub(self):
        return self._drafts

    def draft_session(self, prompt_ids, vocab_size: int, datastore: str | None = None, sources=None,
                      max_nodes: int = 0, max_depth: int = 0, chain: bool = False, *,
                      tokenizer=None) -> "DraftSession":
        """Open a draft session (one bidirectional stream per generation); ``session.draft`` is the
        first draft. Then ``session.append(accepted_ids, topk=None) -> Draft`` per verification step, and
        ``session.close()`` (or a ``with`` block) at the end. 0 budgets: server default.

        ``tokenizer`` (optional, recommended): the model's tokenizer (a Hugging Face / ``tokenizers`` /
        SentencePiece object, a tokenizer file) or its fingerprint string
        (:func:`retrieval.drafting.tokenizer.tokenizer_fingerprint`, computed once per object and cached).
        The server then keeps learned state for that tokenizer alone and refuses a datastore built with
        another one (``FailedPrecondition``). Without it, state is shared by every tokenizer of
        ``vocab_size`` ids that names none.

        A message the server refuses (bad ids, malformed top-k...) raises the matching error from
        ``append`` and leaves the session open and as it was."""
        req = _dconv().open_to_proto(prompt_ids, vocab_size, datastore, sources, _budget(max_nodes, max_depth, chain),
                                     _fingerprint(tokenizer))
        return DraftSession(self._drafts_stub(), req, self._error)

    def draft(self, context_ids, vocab_size: int, datastore: str | None = None, sources=None, max_nodes: int = 0,
              max_depth: int = 0, chain: bool = False, *, tokenizer=None):
        """Stateless draft for ``context_ids`` -> :class:`retrieval.drafting.Draft` (``tokenizer``: as in
        :meth:`draft_session`)."""
        dconv = _dconv()
        req = dconv.draft_request_to_proto(context_ids, vocab_size, datastore, sources,
                                           _budget(max_nodes, max_depth, chain), _fingerprint(tokenizer))
        return dconv.draft_from_proto(self._call(self._drafts_stub().Draft, req).draft)

    def draft_batch(self, contexts, vocab_size: int, datastore: str | None = None, sources=None, max_nodes: int = 0,
                    max_depth: int = 0, chain: bool = False, *, tokenizer=None) -> list:
        """Stateless drafts for several contexts in one call (``tokenizer``: as in :meth:`draft_session`)."""
        dconv = _dconv()
        b = _budget(max_nodes, max_depth, chain)
        fp = _fingerprint(tokenizer)
        req = drafts_pb2.DraftBatchRequest(
            requests=[dconv.draft_request_to_proto(c, vocab_size, datastore, sources, b, fp) for c in contexts])
        return [dconv.draft_from_proto(r.draft) for r in self._call(self._drafts_stub().DraftBatch, req).replies]

    def build_datastore(self, name: str, inputs, tokenizer: str | None = None, vocab_size: int | None = None,
                        input_format: str = "auto", text_fields=None, overwrite: bool = False, wait: bool = True, *,
                        progress: bool | None = None, detach: bool = False, timeout: float | None = None,
                        tokenizer_fingerprint=None) -> JobInfo:
        """Build a corpus datastore from files the server can read (a job, kind ``build_datastore``).
        Returns the final job record; ``detach`` (or ``wait=False``): the record at once.
        ``progress`` / ``timeout`` / Ctrl-C: as in :meth:`_run_job`. ``tokenizer_fingerprint`` (id inputs):
        the tokenizer that made the ids (an object or a fingerprint, as ``tokenizer=`` of :meth:`draft_session`),
        recorded so sessions naming another tokenizer are refused (a text build records its tokenizer's)."""
        dconv = _dconv()
        req = dconv.build_request_to_proto(name, inputs, tokenizer, vocab_size, input_format, text_fields, overwrite,
                                           _fingerprint(tokenizer_fingerprint))
        job = types.job(self._call(self._drafts_stub().BuildDatastore, req))
        return self._run_job(job, progress, detach or not wait, timeout)

    def list_datastores(self) -> list[DatastoreInfo]:
        resp = self._call(self._drafts_stub().ListDatastores, drafts_pb2.ListDatastoresRequest())
        return [types.datastore_info(d) for d in resp.datastores]

    def describe_datastore(self, name: str) -> DatastoreInfo:
        return types.datastore_info(self._call(self._drafts_stub().DescribeDatastore,
                                               drafts_pb2.DatastoreRef(name=name)))

    def drop_datastore(self, name: str) -> None:
        self._call(self._drafts_stub().DropDatastore, drafts_pb2.DatastoreRef(name=name))


def _fingerprint(tokenizer) -> str | None:
    """The vocabulary fingerprint of ``tokenizer`` (None stays None), cached on objects that allow it."""
    if tokenizer is None:
        return None
    from retrieval.drafting.tokenizer import is_fingerprint, tokenizer_fingerprint  # the drafting package

    if isinstance(tokenizer, str):
        return tokenizer if is_fingerprint(tokenizer) or not os.path.exists(tokenizer) else tokenizer_fingerprint(tokenizer)
    fp = getattr(tokenizer, "_retrieval_vocab_fingerprint", None)
    if fp is None:
        fp = tokenizer_fingerprint(tokenizer)
        try:
            tokenizer._retrieval_vocab_fingerprint = fp  # hashing a 32k vocabulary costs ~10 ms: once per object
        except (AttributeError, TypeError):  # objects without a __dict__
            pass
    return fp


class DraftSession:
    """One generation's draft stream (see :meth:`Client.draft_session`). Not shared between threads.

    A message the server refuses gets an error reply: :meth:`append` raises the matching
    :class:`retrieval.errors.RetrievalError` and the session stays open, as it was (the next ``append``
    continues from the last accepted ids). Only a failed ``open``, an evicted session (``NotFound``), a
    broken stream or an internal error end it (``closed`` becomes True)."""

    def __init__(self, stub, open_request, error=cc.error_from_rpc) -> None:
        self._error = error  # grpc.RpcError -> the package's exception (the client's mapping)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = stub.Session(iter(self._q.get, None), timeout=None)
        self.closed = False
        reply = self._send(open_request)
        self.session_id: str = reply.session_id

    def _send(self, req):
        dconv = _dconv()
        if self.closed:
            raise errors.FailedPrecondition("this draft session is closed")
        self._q.put(req)
        try:
            reply = next(self._responses)
        except grpc.RpcError as e:
            self.closed = True
            raise self._error(e) from None
        except StopIteration:
            self.closed = True
            raise errors.Unavailable("the draft stream ended") from None
        if reply.HasField("error"):
            raise dconv.session_error_from_proto(reply.error)
        self.step = reply.step
        self.draft = dconv.draft_from_proto(reply.draft)
        return reply

    def append(self, accepted_ids, topk=None, max_nodes: int = 0, max_depth: int = 0, chain: bool | None = None):
        """Send the accepted ids (accepted draft tokens + the bonus token), optionally the model's top-k
        ids per position (``(len(accepted_ids), k)``); returns the next draft."""
        budget = None
        if max_nodes or max_depth or chain is not None:
            budget = _budget(max_nodes, max_depth, chain)
        self._send(_dconv().append_to_proto(accepted_ids, topk, budget))
        return self.draft

    def close(self, discard: bool = False) -> None:
        """End the generation; the server records its output in the shared history unless ``discard``."""
        if self.closed:
            return
        self._q.put(_dconv().close_to_proto(discard))
        self._q.put(None)
        self.closed = True
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise self._error(e) from None

    def abort(self) -> None:
        """Drop the stream without ending the generation cleanly (nothing is recorded)."""
        self.closed = True
        self._responses.cancel()

    def __enter__(self) -> "DraftSession":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
