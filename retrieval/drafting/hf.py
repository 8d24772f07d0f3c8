"""Speculative decoding of a Hugging Face causal LM with drafts from the draft service (extra ``[drafts]``).

Tree verification as in SpecInfer (Miao et al., ASPLOS 2024) and Medusa (Cai et al., ICML 2024), greedy
acceptance. Each step the model runs **one** forward pass over ``pending + draft``: ``pending`` are the
tokens whose keys/values are not cached yet (normally only the last token, the root of the draft; the
rest of the prompt is prefilled first with the model's own causal mask), ``draft`` the ``n`` nodes of
the server's chain or tree. With ``C`` tokens in the cache and ``m`` pending ones, row ``r`` of the
``(m + n, C + m + n)`` attention mask allows

* every cached token, the pending tokens up to ``r`` (causal) for a pending row,
* every cached and pending token and the node's ancestors and itself (``tree_attention_mask``) for the
  row of draft node ``i``, at position ``C + m - 1 + depth(i)`` (``position_ids``; siblings share one).

Greedy acceptance: let ``y(v) = argmax p(. | context, path to v)`` (``v`` = the root or a node). Starting
at the root, the walk moves to the child ``c`` of ``v`` with ``tokens[c] == y(v)`` while there is one;
the accepted ids are the tokens of the path plus the **bonus** ``y(last)``. Each accepted id is exactly
the token greedy decoding emits at that position, so the output equals ``model.generate(do_sample=False)``
(up to float rounding differences between a batched and an incremental forward pass, which flip a token
only on exact near-ties of the logits).

The format consumed is ``docs/drafting.md``'s worked example: context of 7 tokens ending in "The",
``tokens = [cat, sat, on, dog, ran, is]``, ``parents = [-1, 0, 1, -1, 3, 0]``. The forward pass feeds
``[The, cat, sat, on, dog, ran, is]`` (the root is the only pending token) at positions
``[6, 7, 8, 9, 7, 8, 8]``; if the argmax after "The" is "cat", after "The cat" "is" and after "The cat is"
"nice", the path is nodes 0 -> 5, the step emits ``[cat, is, nice]`` and sends ``append([cat, is, nice])``.

KV cache (``kv=``): after the forward pass the cache holds the prefix, the pending tokens and all ``n``
nodes, but only the accepted path is valid. ``"gather"`` (default) keeps the prefix and re-gathers the
entries of the accepted nodes along the sequence axis (one ``index_select`` per layer; a plain crop when
they are contiguous, as in a chain); the bonus token is then the only pending token. ``"rerun"`` crops
the cache to the prefix plus the longest run of accepted nodes stored contiguously right after it (for
a chain: the whole path, so nothing is re-run), and feeds the other accepted nodes again as pending
tokens at the next step. Both give the same tokens; ``bench/drafts/generate.py`` measures both.

Departures: greedy only (no sampling, no logits processors: repetition penalties and the like in the
model's ``generation_config`` are not applied); batch size 1; models whose cache is not a plain
:class:`transformers.DynamicCache` of full-attention layers (sliding windows, linear attention,
quantized caches) are refused, since the custom mask would ignore the window.

Thread-safety: a call uses the model read-only (``torch.inference_mode``) and its own cache and draft
session; concurrent calls on one model are safe as far as the model's forward pass is.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from retrieval.drafting.draft import DraftBudget, tree_depths
from retrieval.errors import InvalidArgument

logger = logging.getLogger(__name__)

KV_MODES = ("gather", "rerun")
_DEFAULT = object()


@dataclass
class SpeculativeOutput:
    """What :func:`speculative_generate` did.

    ``sequences``: ``(1, P + G)`` int64 on the model's device, prompt then the ``G`` new tokens (what
    ``model.generate`` returns). Per verification step (one forward pass each): ``accepted`` draft tokens
    accepted (bonus excluded), ``emitted`` tokens appended (accepted + bonus, fewer on the last step when
    ``max_new_tokens`` or EOS cut it), ``paths`` the accepted node indices, ``draft_nodes`` nodes in the
    draft, ``forward_tokens`` tokens fed, ``verify_s`` seconds of the forward pass and acceptance,
    ``draft_s`` seconds of the draft round trip that produced the step's draft (the ``open`` for the first
    step, the previous ``append`` after); ``close_s`` the final ``append`` + ``close``. ``total_s`` wall
    time of the call.
    """

    sequences: torch.Tensor
    prompt_len: int
    accepted: list[int] = field(default_factory=list)
    paths: list[list[int]] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)
    draft_nodes: list[int] = field(default_factory=list)
    forward_tokens: list[int] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    draft_s: list[float] = field(default_factory=list)
    close_s: float = 0.0
    total_s: float = 0.0
    session_id: str = ""

    @property
    def new_tokens(self) -> list[int]:
        return self.sequences[0, self.prompt_len:].tolist()

    @property
    def steps(self) -> int:
        return len(self.emitted)

    @property
    def mat(self) -> float:
        """Mean tokens per verification step, bonus included (Spec-Bench's MAT): ``G / steps``."""
        return sum(self.emitted) / max(self.steps, 1)


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older signature
        cache = DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []})
        raise InvalidArgument(f"speculative_generate needs a DynamicCache of full-attention layers; this model's "
                              f"cache has {kinds or 'no layers attribute'} (sliding-window, linear or quantized "
                              "caches are not supported)")
    return cache


def _keep(cache, keep: torch.Tensor | int) -> None:
    """Keep the sequence entries ``keep`` (an index tensor, or an int: the first ``keep``) of every layer."""
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
            continue
        if isinstance(keep, int):
            layer.keys = layer.keys[..., :keep, :]
            layer.values = layer.values[..., :keep, :]
        else:
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)


def verify_inputs(C: int, m: int, parents: np.ndarray, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive 4D mask ``(1, 1, m + n, C + m + n)`` (0 = attend, ``finfo(dtype).min`` = blocked) and
    the ``(1, m + n)`` position ids of one verification pass: ``C`` cached tokens, ``m >= 1`` pending ones,
    then the draft nodes with ``parents`` (see the module doc)."""
    n = len(parents)
    q, kv = m + n, C + m + n
    allow = torch.zeros((q, kv), dtype=torch.bool)
    allow[:, :C] = True
    allow[:m, C:C + m] = torch.tril(torch.ones((m, m), dtype=torch.bool))
    if n:
        from retrieval.drafting.draft import tree_attention_mask

        allow[m:, C:C + m] = True
        allow[m:, C + m:] = torch.from_numpy(tree_attention_mask(parents))
    mask = torch.full((q, kv), torch.finfo(dtype).min, dtype=dtype)
    mask.masked_fill_(allow, 0.0)
    pos = np.concatenate([np.arange(C, C + m), C + m - 1 + tree_depths(parents)]).astype(np.int64)
    return mask.view(1, 1, q, kv).to(device), torch.from_numpy(pos).view(1, q).to(device)


def greedy_walk(tokens, parents, pred) -> tuple[list[int], int]:
    """Greedy acceptance: ``pred[0]`` = argmax after the root, ``pred[1 + i]`` after node ``i``.
    Returns ``(path, bonus)``: the accepted node indices root-down and the verifier's next token."""
    children: dict[int, dict[int, int]] = {}
    for i, (t, p) in enumerate(zip(tokens, parents)):
        children.setdefault(p, {}).setdefault(t, i)  # the first child carrying a token wins
    path, cur, y = [], -1, pred[0]
    while True:
        nxt = children.get(cur, {}).get(y)
        if nxt is None:
            return path, y
        path.append(nxt)
        cur, y = nxt, pred[1 + nxt]


def _eos_set(model, eos_token_id) -> set[int]:
    if eos_token_id is _DEFAULT:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, (int, np.integer)):
        return {int(eos_token_id)}
    if isinstance(eos_token_id, torch.Tensor):
        return {int(x) for x in eos_token_id.flatten().tolist()}
    return {int(x) for x in eos_token_id}


def _prompt_ids(input_ids) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.ndim == 2:
            if input_ids.shape[0] != 1:
                raise InvalidArgument(f"input_ids has batch size {input_ids.shape[0]}; speculative_generate "
                                      "decodes one sequence (batch size 1)")
            input_ids = input_ids[0]
        if input_ids.ndim != 1:
            raise InvalidArgument(f"input_ids must be (1, P) or (P,), got shape {tuple(input_ids.shape)}")
        ids = input_ids.tolist()
    else:
        ids = np.asarray(input_ids).reshape(-1).tolist()
    if not ids:
        raise InvalidArgument("input_ids is empty; at least one prompt token is needed")
    return [int(t) for t in ids]


@torch.inference_mode()
def _check_generate_args(kv, max_new_tokens, topk, budget) -> None:
    if kv not in KV_MODES:
        raise InvalidArgument(f"kv={kv!r} is not a KV cache mode; valid: {', '.join(KV_MODES)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InvalidArgument(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 0:
        raise InvalidArgument(f"topk must be an integer >= 0, got {topk!r}")
    if budget is not None and not isinstance(budget, DraftBudget):
        raise InvalidArgument(f"budget must be a DraftBudget, got {type(budget).__name__}")


def _accepted(acc: list[int], eos, room: int) -> tuple[list[int], bool]:
    """The accepted tokens of a step (draft path + bonus) cut at the first EOS and at ``room`` tokens,
    and whether generation ends with them."""
    cut = min(len(acc), room)
    for j, t in enumerate(acc[:cut]):
        if t in eos:
            cut = j + 1
            break
    done = cut < len(acc) or cut >= room or acc[cut - 1] in eos
    return acc[:cut], done


def _advance_cache(cache, kv: str, C: int, m: int, path: list[int], toks: list[int], bonus: int, device):
    """Keep the KV cache of the accepted path only; returns the new ``(cached tokens, pending tokens)``."""
    j = 0  # path[:j] == [0, 1, ..., j-1]: stored contiguously right after the pending tokens
    while j < len(path) and path[j] == j:
        j += 1
    if kv == "rerun" or j == len(path):
        _keep(cache, C + m + j)
        return C + m + j, [toks[i] for i in path[j:]] + [bonus]
    keep = torch.cat([torch.arange(C + m), C + m + torch.tensor(path, dtype=torch.long)]).to(device)
    _keep(cache, keep)
    return C + m + len(path), [bonus]


def speculative_generate(model, input_ids, client, *, datastore: str | None = None, max_new_tokens: int = 32,
                         budget: DraftBudget | None = None, sources=None, vocab_size: int | None = None,
                         eos_token_id=_DEFAULT, topk: int = 0, kv: str = "gather", discard: bool = False,
                         tokenizer=None, session_options: dict | None = None) -> SpeculativeOutput:
    """Greedy speculative decoding of ``model`` with drafts from ``client`` (see the module doc).

    ``model``: a Hugging Face causal LM (``model(input_ids, attention_mask=4D, position_ids=, cache=)``),
    in eval mode, on any device. ``input_ids``: ``(1, P)`` or ``(P,)`` ids (tensor, list or array).
    ``client``: a :class:`retrieval.client.Client` (anything with its ``draft_session``). ``datastore``,
    ``sources``: the session's (server defaults when ``None``). ``budget``: :class:`DraftBudget` (server
    default 64 nodes, depth 10, tree). ``vocab_size``: the session's vocabulary, default
    ``model.config.vocab_size``. ``eos_token_id``: int, list or ``None`` (default: the model's
    ``generation_config``); generation stops after an EOS, which is kept, as ``generate`` does.
    ``max_new_tokens``: at most this many new tokens. ``topk``: when > 0, each append also carries the
    model's top-``topk`` ids at every accepted position (for token recycling). ``kv``: ``"gather"`` or
    ``"rerun"`` (module doc). ``discard``: close the session without recording the output in the history.
    ``tokenizer``: the model's tokenizer or its fingerprint, passed to ``client.draft_session(tokenizer=)``
    (the server keeps learned state per tokenizer and checks datastores against it; ``None``: not sent).
    ``session_options``: more keyword arguments for ``client.draft_session``.

    Returns a :class:`SpeculativeOutput`; ``.sequences`` equals ``model.generate(input_ids,
    do_sample=False, max_new_tokens=max_new_tokens)``.
    """
    t_start = time.perf_counter()
    _check_generate_args(kv, max_new_tokens, topk, budget)
    prompt = _prompt_ids(input_ids)
    V = int(vocab_size or model.config.vocab_size)
    eos = _eos_set(model, eos_token_id)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    cache = _new_cache(model)
    fwd = {_cache_kwarg(model): cache, "use_cache": True}
    keep_rows = "logits_to_keep" in inspect.signature(model.forward).parameters

    res = SpeculativeOutput(sequences=torch.empty(0), prompt_len=len(prompt))
    out: list[int] = []
    pending = [prompt[-1]]  # not in the cache yet; pending[-1] is the root of the next draft
    C = len(prompt) - 1  # tokens in the cache
    if C:  # prefill all but the root with the model's own causal mask (no (P, P) custom mask for long prompts)
        kw = {"logits_to_keep": 1} if keep_rows else {}
        model(input_ids=torch.tensor([prompt[:-1]], dtype=torch.long, device=device), **fwd, **kw)
    b = budget or DraftBudget()
    opts = dict(session_options or {})
    if tokenizer is not None:
        opts["tokenizer"] = tokenizer
    t0 = time.perf_counter()
    sess = client.draft_session(prompt, vocab_size=V, datastore=datastore, sources=sources,
                                max_nodes=b.max_nodes, max_depth=b.max_depth, chain=not b.tree, **opts)
    try:
        res.session_id = getattr(sess, "session_id", "")
        d = sess.draft
        res.draft_s.append(time.perf_counter() - t0)
        while True:
            t1 = time.perf_counter()
            toks, pars = d.tokens.tolist(), d.parents
            n, m = len(toks), len(pending)
            mask, pos = verify_inputs(C, m, pars, dtype, device)
            ids = torch.tensor([pending + toks], dtype=torch.long, device=device)
            kw = {"logits_to_keep": n + 1} if keep_rows else {}
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **fwd, **kw).logits[0, -(n + 1):]
            pred = logits.argmax(-1).tolist()
            path, bonus = greedy_walk(toks, pars.tolist(), pred)
            acc, done = _accepted([toks[i] for i in path] + [bonus], eos, max_new_tokens - len(out))
            cut = len(acc)
            out += acc
            top = None
            if topk:
                rows = torch.tensor([0] + [1 + i for i in path], device=logits.device)[:cut]
                top = logits.index_select(0, rows).topk(min(topk, logits.shape[-1]), dim=-1).indices.cpu().numpy()
            if not done:  # keep the cache of the accepted path only
                C, pending = _advance_cache(cache, kv, C, m, path, toks, bonus, device)
            res.accepted.append(len(path))
            res.paths.append(path)
            res.emitted.append(cut)
            res.draft_nodes.append(n)
            res.forward_tokens.append(m + n)
            res.verify_s.append(time.perf_counter() - t1)
            t2 = time.perf_counter()
            d = sess.append(np.asarray(acc, dtype=np.int64), topk=top)  # also the last step: the server records it
            if done:
                sess.close(discard=discard)
                res.close_s = time.perf_counter() - t2
                break
            res.draft_s.append(time.perf_counter() - t2)
    except BaseException:
        abort = getattr(sess, "abort", None)
        if abort is not None:
            abort()
        raise
    res.sequences = torch.tensor([prompt + out], dtype=torch.long, device=device)
    res.total_s = time.perf_counter() - t_start
    logger.debug("speculative_generate: %d tokens in %d steps (MAT %.3f), session %s", len(out), res.steps,
                 res.mat, res.session_id)
    return res


class _LocalSession:
    """A :class:`retrieval.client.DraftSession` look-alike over an in-process :class:`SessionManager`, in the
    server's order (the calibration update of a step runs after its next draft is made)."""

    def __init__(self, mgr, prompt_ids, datastore, sources, budget) -> None:
        self._mgr = mgr
        self._s = mgr.open(prompt_ids, sources=sources, datastore=datastore, budget=budget)
        self.session_id = self._s.session_id
        self.draft = self._s.draft()
        self.closed = False

    def append(self, accepted_ids, topk=None):
        self._mgr.append(self.session_id, accepted_ids, topk, defer_feedback=True)
        self.draft = self._s.draft()
        self._s.flush_feedback()
        return self.draft

    def close(self, discard: bool = False) -> None:
        if not self.closed:
            self.closed = True
            self._mgr.close(self.session_id, record=not discard)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._mgr.close(self.session_id, record=False)


class InProcessDrafts:
    """``client`` for :func:`speculative_generate` without a server: one :class:`SessionManager` (or a
    :class:`DraftsEngine`, which picks the manager by vocabulary as the server does). For benchmarks and
    tests (the draft round trip without gRPC). Thread-safety: as the manager's."""

    def __init__(self, manager_or_engine) -> None:
        self._m = manager_or_engine

    def draft_session(self, prompt_ids, vocab_size: int, datastore: str | None = None, sources=None,
                      max_nodes: int = 0, max_depth: int = 0, chain: bool = False, tokenizer=None) -> _LocalSession:
        """As :meth:`retrieval.client.Client.draft_session` (``tokenizer``: an object, a tokenizer file or a
        fingerprint string, which picks the engine's manager)."""
        if hasattr(self._m, "manager"):
            fp = None
            if tokenizer is not None:
                import os

                from retrieval.drafting.tokenizer import tokenizer_fingerprint

                fp = (tokenizer if isinstance(tokenizer, str) and not os.path.exists(tokenizer)
                      else tokenizer_fingerprint(tokenizer))
            mgr = self._m.manager(vocab_size, fp) if fp else self._m.manager(vocab_size)
        else:
            mgr = self._m
        if mgr.config.vocab_size != vocab_size:
            raise InvalidArgument(f"vocab_size={vocab_size} but the manager serves {mgr.config.vocab_size}")
        if datastore is not None and getattr(mgr, "needs_prepare", lambda _: False)(datastore):
            mgr.prepare_datastore(datastore)  # as the server does before opening (map, check, warm start)
        budget = DraftBudget(max_nodes or 64, max_depth or 10, not chain)
        return _LocalSession(mgr, prompt_ids, datastore, sources, budget)
