"""Proto <-> domain conversions of the Drafts service, one function per message and direction.

Token ids travel as packed ``repeated int32``; budgets use 0 for "server default". The ``*_to_proto``
builders (the client's side) refuse ids that are not integers or do not fit int32 with
:class:`InvalidArgument` naming the argument, before anything is sent; the server checks the vocabulary.
"""

from __future__ import annotations

import json

import numpy as np

from retrieval.drafting.draft import Draft, DraftBudget
from retrieval.errors import InvalidArgument
from retrieval.v1 import drafts_pb2


INT32_MAX = 2**31 - 1


def ids_to_wire(ids, what: str) -> list[int]:
    """``ids`` (any integer sequence / array) as a list for a ``repeated int32`` field, or
    :class:`InvalidArgument` naming ``what`` (non-integers, values outside int32)."""
    try:
        a = np.asarray(ids)
    except Exception as e:  # ragged lists
        raise InvalidArgument(f"{what} must be a sequence of integer token ids: {e}") from e
    if a.size == 0:
        return []
    if not np.issubdtype(a.dtype, np.integer):
        raise InvalidArgument(f"{what} must be integer token ids, got dtype {a.dtype}")
    a = a.ravel()
    bad = (a < -1) | (a > INT32_MAX) if a.dtype.kind == "i" else a > INT32_MAX
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidArgument(f"{what}[{i}] = {int(a[i])} is not a token id: ids must lie in [0, 2**31 - 1]")
    return a.astype(np.int64).tolist()


# --- budget ---------------------------------------------------------------------------------------------

def budget_to_proto(b: DraftBudget | None) -> drafts_pb2.DraftBudget:
    if b is None:
        return drafts_pb2.DraftBudget()
    return drafts_pb2.DraftBudget(max_nodes=b.max_nodes, max_depth=b.max_depth, chain=not b.tree)


def budget_from_proto(m: drafts_pb2.DraftBudget, default: DraftBudget | None = None) -> DraftBudget:
    """0 fields take ``default``'s values (``DraftBudget()`` when not given)."""
    d = default or DraftBudget()
    return DraftBudget(max_nodes=m.max_nodes or d.max_nodes, max_depth=m.max_depth or d.max_depth, tree=not m.chain)


# --- draft ----------------------------------------------------------------------------------------------

def draft_to_proto(d: Draft, out: drafts_pb2.Draft | None = None) -> drafts_pb2.Draft:
    m = out if out is not None else drafts_pb2.Draft()
    m.tokens.extend(d.tokens.tolist())
    m.parents.extend(d.parents.tolist())
    m.probs.extend(d.probs.tolist())
    m.source_index.extend(d.source_index.tolist())
    m.source_names.extend(d.source_names)
    return m


def draft_from_proto(m: drafts_pb2.Draft) -> Draft:
    n = len(m.tokens)
    return Draft(np.asarray(m.tokens, np.int32).reshape(n), np.asarray(m.parents, np.int32),
                 np.asarray(m.probs, np.float32), np.asarray(m.source_index, np.uint8), tuple(m.source_names))


# --- session messages -----------------------------------------------------------------------------------

def _vocab_to_wire(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or not 0 <= vocab_size < 2**32:
        raise InvalidArgument(f"vocab_size={vocab_size!r} must be the model's vocabulary size, a positive integer")
    return int(vocab_size)


def open_to_proto(prompt_ids, vocab_size: int, datastore: str | None = None, sources=None,
                  budget: DraftBudget | None = None, tokenizer_fingerprint: str | None = None
                  ) -> drafts_pb2.SessionRequest:
    o = drafts_pb2.OpenSession(vocab_size=_vocab_to_wire(vocab_size), datastore=datastore or "",
                               sources=list(sources or ()), budget=budget_to_proto(budget),
                               tokenizer_fingerprint=tokenizer_fingerprint or "")
    o.prompt_ids.extend(ids_to_wire(prompt_ids, "prompt_ids"))
    return drafts_pb2.SessionRequest(open=o)


def open_from_proto(m: drafts_pb2.OpenSession, default: DraftBudget | None = None) -> dict:
    """Keyword arguments of :meth:`SessionManager.open` plus ``vocab_size`` and ``tokenizer_fingerprint``
    (None when empty)."""
    return {"prompt_ids": np.asarray(m.prompt_ids, dtype=np.int64), "vocab_size": int(m.vocab_size),
            "tokenizer_fingerprint": m.tokenizer_fingerprint or None,
            "datastore": m.datastore or None, "sources": list(m.sources) or None,
            "budget": budget_from_proto(m.budget, default)}


def append_to_proto(accepted_ids, topk=None, budget: DraftBudget | None = None) -> drafts_pb2.SessionRequest:
    a = drafts_pb2.AppendTokens()
    a.accepted_ids.extend(ids_to_wire(accepted_ids, "accepted_ids"))
    if topk is not None:
        t = np.asarray(topk)
        if t.ndim != 2:
            raise InvalidArgument(f"topk must be a 2-D (positions, k) array, got shape {t.shape}")
        a.topk_k = t.shape[1]
        a.topk_ids.extend(ids_to_wire(t, "topk"))
    if budget is not None:
        a.budget.CopyFrom(budget_to_proto(budget))
    return drafts_pb2.SessionRequest(append=a)


def append_from_proto(m: drafts_pb2.AppendTokens, default: DraftBudget | None = None) -> dict:
    """``accepted_ids``, ``topk`` ((n, k) or None) and ``budget`` (None: the session's)."""
    acc = np.asarray(m.accepted_ids, dtype=np.int64)
    topk = None
    if m.topk_k or len(m.topk_ids):
        k = int(m.topk_k)
        if k == 0 or len(m.topk_ids) != k * len(acc):
            raise InvalidArgument(f"topk_ids has {len(m.topk_ids)} ids; expected len(accepted_ids) x topk_k = "
                                  f"{len(acc)} x {k}")
        topk = np.asarray(m.topk_ids, dtype=np.int64).reshape(len(acc), k)
    budget = budget_from_proto(m.budget, default) if m.HasField("budget") else None
    return {"accepted_ids": acc, "topk": topk, "budget": budget}


def close_to_proto(discard: bool = False) -> drafts_pb2.SessionRequest:
    return drafts_pb2.SessionRequest(close=drafts_pb2.CloseSession(discard=discard))


def close_from_proto(m: drafts_pb2.CloseSession) -> dict:
    return {"record": not m.discard}


# --- stateless --------------------------------------------------------------------------------------------

def draft_request_to_proto(context_ids, vocab_size: int, datastore: str | None = None, sources=None,
                           budget: DraftBudget | None = None, tokenizer_fingerprint: str | None = None
                           ) -> drafts_pb2.DraftRequest:
    r = drafts_pb2.DraftRequest(vocab_size=_vocab_to_wire(vocab_size), datastore=datastore or "",
                                sources=list(sources or ()), budget=budget_to_proto(budget),
                                tokenizer_fingerprint=tokenizer_fingerprint or "")
    r.context_ids.extend(ids_to_wire(context_ids, "context_ids"))
    return r


def draft_request_from_proto(m: drafts_pb2.DraftRequest, default: DraftBudget | None = None) -> dict:
    return {"context_ids": np.asarray(m.context_ids, dtype=np.int64), "vocab_size": int(m.vocab_size),
            "tokenizer_fingerprint": m.tokenizer_fingerprint or None,
            "datastore": m.datastore or None, "sources": list(m.sources) or None,
            "budget": budget_from_proto(m.budget, default)}


# --- errors inside a session stream -----------------------------------------------------------------------

def session_error_to_proto(e: Exception, out: drafts_pb2.SessionReply) -> drafts_pb2.SessionReply:
    """Set ``out.error`` from a domain exception (its gRPC code and message)."""
    import grpc

    code = getattr(e, "code", grpc.StatusCode.INTERNAL)
    out.error.code = code.value[0] if isinstance(code, grpc.StatusCode) else int(grpc.StatusCode.INTERNAL.value[0])
    out.error.message = str(e)
    return out


def session_error_from_proto(m: drafts_pb2.SessionError) -> Exception:
    """The package's exception for an error reply (``RetrievalError`` with the code for unmapped codes)."""
    import grpc

    from retrieval import errors
    from retrieval.client_convert import CODES

    code = next((c for c in grpc.StatusCode if c.value[0] == m.code), grpc.StatusCode.UNKNOWN)
    cls = CODES.get(code, errors.RetrievalError)
    err = cls(m.message)
    if cls is errors.RetrievalError:
        err.code = code
    return err


# --- datastores -------------------------------------------------------------------------------------------

def build_request_to_proto(name: str, inputs, tokenizer: str | None = None, vocab_size: int | None = None,
                           input_format: str = "auto", text_fields=None, overwrite: bool = False,
                           tokenizer_fingerprint: str | None = None) -> drafts_pb2.BuildDatastoreRequest:
    return drafts_pb2.BuildDatastoreRequest(name=name, inputs=[str(p) for p in inputs], input_format=input_format,
                                            tokenizer=tokenizer or "", vocab_size=int(vocab_size or 0),
                                            text_fields=list(text_fields or ()), overwrite=overwrite,
                                            tokenizer_fingerprint=tokenizer_fingerprint or "")


def build_request_from_proto(m: drafts_pb2.BuildDatastoreRequest) -> dict:
    """The ``build_datastore`` job's parameters (JSON-serializable)."""
    p = {"name": m.name, "inputs": list(m.inputs), "input_format": m.input_format or "auto", "overwrite": m.overwrite}
    if m.tokenizer:
        p["tokenizer"] = m.tokenizer
    if m.vocab_size:
        p["vocab_size"] = int(m.vocab_size)
    if len(m.text_fields):
        p["text_fields"] = list(m.text_fields)
    if m.tokenizer_fingerprint:
        p["tokenizer_fingerprint"] = m.tokenizer_fingerprint
    return p


def datastore_info_to_proto(manifest: dict) -> drafts_pb2.DatastoreInfo:
    tok = manifest.get("tokenizer") or {}
    return drafts_pb2.DatastoreInfo(name=manifest["name"], n_tokens=int(manifest["n_tokens"]),
                                    n_docs=int(manifest["n_docs"]), vocab_size=int(manifest["vocab_size"]),
                                    tokenizer_fingerprint=tok.get("vocab_fingerprint") or "",
                                    bytes_on_disk=int(manifest.get("bytes_on_disk", 0)),
                                    manifest_json=json.dumps(manifest))


def datastore_info_from_proto(m: drafts_pb2.DatastoreInfo) -> dict:
    d = json.loads(m.manifest_json) if m.manifest_json else {}
    d.update({"name": m.name, "n_tokens": m.n_tokens, "n_docs": m.n_docs, "vocab_size": m.vocab_size,
              "tokenizer_fingerprint": m.tokenizer_fingerprint, "bytes_on_disk": m.bytes_on_disk})
    return d
