"""The write side of a cross-encoder index: adding items (each scored against the anchor queries), deleting
them, and replacing the anchor items, each committed durably as a new state of the index folder
(:class:`IndexWrites`, a mixin of :class:`retrieval.crossencoder.index.CrossEncoderIndex`), and the
state and file helpers both sides share."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.crossencoder.cur import CurFactors, project_items, select_anchor_items, solve_cur
from retrieval.crossencoder.scorers import CallStats, validate_texts
from retrieval.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from retrieval.storage import atomic


@dataclasses.dataclass
class AddResult:
    """``added``: items added; ``calls``: cross-encoder calls (``k_q`` per item); seconds in the
    scorer and in total; ``truncated_items``: items cut to the model's limit against some anchor query."""

    added: int
    calls: int
    scorer_seconds: float
    seconds: float
    truncated_items: int


def _append_bytes(path: Path, at: int, data: bytes) -> int:
    """Truncate ``path`` to ``at`` bytes, append ``data``, fsync; returns the new size."""
    mode = "r+b" if path.exists() else "w+b"
    with open(path, mode) as f:
        f.truncate(at)
        f.seek(at)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return at + len(data)


def _open_f32(path: Path, rows: int, cols: int, mode: str = "r") -> np.ndarray:
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), dtype=np.float32)
    return np.memmap(path, dtype="<f4", mode=mode, shape=(rows, cols))


@dataclasses.dataclass(frozen=True)
class _State:
    """Immutable snapshot a search works on."""

    gen: int  # bumps on every mutation (cache key)
    n_rows: int
    RT: np.ndarray  # (n_rows, k_q) memmap
    alive: np.ndarray  # (n_rows,) bool
    ids: np.ndarray  # (n_rows,) int64
    texts: tuple[str, ...]
    row_of: dict[int, int]  # id -> row, alive rows only
    cur: CurFactors  # stored CUR generation (anchors, U, mu, E)
    de: np.ndarray | None  # (n_rows, d)

    @property
    def n_alive(self) -> int:
        return len(self.row_of)


def _save_cur(path: Path, gen: int, cur: CurFactors) -> None:
    atomic.save_npz(path / f"cur-{gen}.npz", anchors=cur.anchors, U=cur.U, mu=cur.mu)
    atomic.write_with(path / f"E-{gen}.f32", lambda f: f.write(np.ascontiguousarray(cur.E, dtype="<f4").tobytes()))


class IndexWrites:
    """Methods of :class:`CrossEncoderIndex` (see the module docstring); mixed into it, not used alone."""

    # --- mutations ---------------------------------------------------------------------------
    def add_items(self, ids: Sequence[int], texts: Sequence[str], payloads: Sequence[dict | None] | None = None,
                  batch_items: int = 64) -> AddResult:
        """Add items: ``k_q`` cross-encoder calls each (against the anchor queries), no re-factorisation.

        Raises :class:`AlreadyExists` for an id already present (nothing is stored then) and
        :class:`InvalidArgument` for empty texts or mismatched lengths.
        """
        t0 = time.perf_counter()
        texts = validate_texts(texts, "texts")
        ids_l = [self._check_id(i) for i in ids]
        if len(ids_l) != len(texts):
            raise InvalidArgument(f"ids and texts must have the same length, got {len(ids_l)} and {len(texts)}")
        if payloads is None:
            payloads = [None] * len(texts)
        payloads = list(payloads)
        if len(payloads) != len(texts):
            raise InvalidArgument(f"payloads must have one entry per text, got {len(payloads)} for {len(texts)} texts")
        for j, pl in enumerate(payloads):
            if pl is not None and not isinstance(pl, dict):
                raise InvalidArgument(f"payloads[{j}] must be a JSON object (dict) or None, got {type(pl).__name__}")
        if len(set(ids_l)) != len(ids_l):
            raise InvalidArgument("ids contain duplicates")
        if not ids_l:
            return AddResult(0, 0, 0.0, 0.0, 0)
        with self._lock:
            st = self._state
            dup = [i for i in ids_l if i in st.row_of]
            if dup:
                raise AlreadyExists(f"item ids already in the index: {dup[:10]}{' ...' if len(dup) > 10 else ''}")
            stats = CallStats()
            kq = self.k_q
            new_rt = np.empty((len(texts), kq), dtype=np.float32)
            trunc_items = 0
            for s in range(0, len(texts), batch_items):
                chunk = texts[s : s + batch_items]
                qs = [q for _ in chunk for q in self.anchor_queries]
                its = [t for t in chunk for _ in self.anchor_queries]
                sc, _, ti = self.scorer.score_detailed(qs, its, stats)
                new_rt[s : s + len(chunk)] = sc.reshape(len(chunk), kq)
                trunc_items += int(ti.reshape(len(chunk), kq).any(axis=1).sum())
            new_de = None
            if st.de is not None:
                if self.dual_encoder is None:
                    raise FailedPrecondition(
                        "this index stores dual-encoder embeddings: load it with its dual_encoder to add items"
                    )
                new_de = self.dual_encoder.encode(texts)
            new_E = project_items(new_rt, st.cur.U, st.cur.mu)
            self._commit_add(st, ids_l, texts, payloads, new_rt, new_E, new_de)
            return AddResult(len(texts), stats.calls, stats.seconds, time.perf_counter() - t0, trunc_items)

    @staticmethod
    def _check_id(i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise InvalidArgument(f"item ids must be integers, got {i!r}")
        if not 0 <= int(i) < 2**63:
            raise InvalidArgument(f"item ids must be in [0, 2^63), got {i}")
        return int(i)

    def _commit_add(self, st: _State, ids: list[int], texts: list[str], payloads: list, new_rt: np.ndarray,
                    new_E: np.ndarray, new_de: np.ndarray | None) -> None:
        m = dict(self._meta)
        sizes = dict(m["sizes"])
        p = self.path
        sizes["R"] = _append_bytes(p / "R.f32", sizes["R"], np.ascontiguousarray(new_rt, dtype="<f4").tobytes())
        sizes["alive"] = _append_bytes(p / "alive.u8", sizes["alive"], np.ones(len(ids), dtype=np.uint8).tobytes())
        lines = b"".join(
            (json.dumps({"id": i, "text": t, "payload": pl}, ensure_ascii=False) + "\n").encode()
            for i, t, pl in zip(ids, texts, payloads, strict=True)
        )
        sizes["items"] = _append_bytes(p / "items.jsonl", sizes["items"], lines)
        gen = int(m["cur_gen"])
        sizes["E"] = _append_bytes(p / f"E-{gen}.f32", sizes["E"], np.ascontiguousarray(new_E, dtype="<f4").tobytes())
        if new_de is not None:
            sizes["de"] = _append_bytes(p / "de.f32", sizes["de"], np.ascontiguousarray(new_de, dtype="<f4").tobytes())
        m["sizes"] = sizes
        m["n_rows"] = st.n_rows + len(ids)
        atomic.write_json(p / "meta.json", m)
        self._meta = m
        n = m["n_rows"]
        RT = _open_f32(p / "R.f32", n, self.k_q)
        alive = np.concatenate([st.alive, np.ones(len(ids), dtype=bool)])
        all_ids = np.concatenate([st.ids, np.asarray(ids, dtype=np.int64)])
        row_of = dict(st.row_of)
        for j, i in enumerate(ids):
            row_of[i] = st.n_rows + j
        cur = CurFactors(st.cur.anchors, st.cur.U, st.cur.mu, np.concatenate([st.cur.E, new_E]))
        de = None if st.de is None else np.concatenate([st.de, new_de])
        self._state = _State(st.gen + 1, n, RT, alive, all_ids, st.texts + tuple(texts), row_of, cur, de)

    def delete_items(self, ids: Sequence[int]) -> int:
        """Delete items by id; returns how many. :class:`NotFound` if any id is unknown (nothing changes)."""
        ids_l = [self._check_id(i) for i in ids]
        with self._lock:
            st = self._state
            missing = [i for i in ids_l if i not in st.row_of]
            if missing:
                raise NotFound(f"item ids not in the index: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
            rows = sorted({st.row_of[i] for i in ids_l})
            if not rows:
                return 0
            with open(self.path / "alive.u8", "r+b") as f:
                for r in rows:
                    f.seek(r)
                    f.write(b"\x00")
                f.flush()
                os.fsync(f.fileno())
            alive = st.alive.copy()
            alive[rows] = False
            row_of = {i: r for i, r in st.row_of.items() if alive[r]}
            self._state = dataclasses.replace(st, gen=st.gen + 1, alive=alive, row_of=row_of)
            return len(rows)

    def set_anchor_items(self, k_i: int | None = None, anchor_method: str | None = None, seed: int | None = None,
                         solver: str | None = None, ridge: float | None = None, rank: int | None = None) -> dict[str, Any]:
        """Re-choose the anchor items and re-solve the CUR factors from the stored ``R``: no new calls.

        Any argument left ``None`` keeps its build value. Returns the new build params and the time.
        """
        t0 = time.perf_counter()
        with self._lock:
            st = self._state
            old = self.build_params
            changes = {k: v for k, v in dict(k_i=k_i, anchor_method=anchor_method, seed=seed, solver=solver,
                                             ridge=ridge, rank=rank).items() if v is not None}
            bp = dataclasses.replace(old, **changes).validate()
            if bp.anchor_method == "kmeans-de" and st.de is None:
                raise InvalidArgument("anchor_method 'kmeans-de' needs dual-encoder item embeddings; this index has none")
            if bp.k_i > st.n_alive:
                raise InvalidArgument(f"k_i = {bp.k_i} exceeds the {st.n_alive} items in the index")
            anchors = select_anchor_items(bp.anchor_method, bp.k_i, st.RT, np.flatnonzero(st.alive), st.de, bp.seed)
            cur = solve_cur(st.RT, anchors, bp.solver, bp.ridge, bp.rank)
            m = dict(self._meta)
            old_gen = int(m["cur_gen"])
            gen = old_gen + 1
            _save_cur(self.path, gen, cur)
            m["cur_gen"] = gen
            m["build"] = dataclasses.asdict(bp)
            m["sizes"] = dict(m["sizes"], E=int(cur.E.nbytes))
            atomic.write_json(self.path / "meta.json", m)
            self._meta = m
            for f in (self.path / f"cur-{old_gen}.npz", self.path / f"E-{old_gen}.f32"):
                f.unlink(missing_ok=True)
            self._state = dataclasses.replace(st, gen=st.gen + 1, cur=cur)
            return {"build": dataclasses.asdict(bp), "seconds": time.perf_counter() - t0, "calls": 0}
