"""Teacher-forced acceptance: replay recorded greedy generations against a drafter, without the model.

Under greedy decoding the verifier accepts a draft path exactly while it equals the tokens the model
generates, so recorded greedy outputs stand in for the model (Spec-Bench's PLD row is reproduced within
0.01 this way, see ``docs/drafting.md``). At each step the drafter sees ``prompt + output[:i]``; the
draft's longest root path equal to ``output[i:]`` is accepted (:func:`accepted_length`), capped so the
step's bonus token exists; the step appends ``a + 1`` tokens. MAT (mean accepted tokens per step,
bonus included) = tokens / steps, pooled over all steps as Spec-Bench does.

The verifier's feedback is the same as a real client's: the accepted ids (no logits), sent back to the
session with :meth:`Session.append`, so calibration and learning sources see nothing a real server
would not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from retrieval.drafting.draft import Draft, accepted_length


@dataclass
class ReplayStats:
    """Tokens, steps and draft latencies, overall and per category."""

    tokens: int = 0
    steps: int = 0
    by_cat: dict = field(default_factory=dict)  # category -> [tokens, steps]
    latency_s: list = field(default_factory=list)
    draft_nodes: list = field(default_factory=list)

    @property
    def mat(self) -> float:
        return self.tokens / max(self.steps, 1)

    def mat_by_cat(self) -> dict[str, float]:
        return {c: t / max(s, 1) for c, (t, s) in self.by_cat.items()}


def replay(turns: Iterable, open_session: Callable[[np.ndarray], object] | None = None,
           drafter: Callable[[np.ndarray], Draft] | None = None, close_session: Callable[[object], None] | None = None,
           stats: ReplayStats | None = None, record_latency: bool = True) -> ReplayStats:
    """Replay ``turns`` (objects with ``prompt``, ``output`` int arrays and ``category``).

    Either ``open_session(prompt) -> session`` (with ``draft()`` / ``append(ids)``; ``close_session(s)``
    at the end of each turn) or a stateless ``drafter(context) -> Draft``.
    """
    st = stats or ReplayStats()
    for tr in turns:
        out = np.asarray(tr.output)
        G = len(out)
        sess = open_session(np.asarray(tr.prompt)) if open_session is not None else None
        ctx = list(tr.prompt) if sess is None else None
        i = 0
        cat = st.by_cat.setdefault(tr.category, [0, 0])
        while i < G:
            t0 = time.perf_counter()
            if sess is not None:
                d = sess.draft()
            else:
                d = drafter(np.asarray(ctx + out[:i].tolist(), dtype=np.int32))
            if record_latency:
                st.latency_s.append(time.perf_counter() - t0)
                st.draft_nodes.append(len(d))
            a = accepted_length(d.tokens, d.parents, out[i: i + len(d) + 1].tolist()) if len(d) else 0
            a = min(a, G - i - 1)
            if sess is not None:
                sess.append(out[i: i + a + 1])
            i += a + 1
            st.steps += 1
            cat[1] += 1
        st.tokens += G
        cat[0] += G
        if sess is not None and close_session is not None:
            close_session(sess)
    return st
