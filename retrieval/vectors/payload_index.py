"""Payload indexes of one shard and the evaluation of filters from them (Qdrant's payload indexes).

A payload index is declared per collection as ``(key, type)``, type one of :data:`TYPES`:

* ``keyword``: JSON strings, answers ``equals`` / ``any_of`` with strings;
* ``integer``: JSON integers in int64, answers ``equals`` / ``any_of`` / ``range`` with numbers;
* ``float``: JSON numbers (integers up to 2**53 in magnitude, and reals), same conditions;
* ``bool``: ``true`` / ``false``, answers ``equals`` / ``any_of`` with bools;
* ``datetime``: RFC 3339 / ISO 8601 strings as epoch seconds (millisecond precision), and numbers as
  they are; answers ``range`` with bounds in **epoch seconds**. A range condition on a key with a
  datetime index matches such strings, on every path (the SQL of :func:`filters.to_sql` is given the
  datetime keys and compares with the same SQLite expression, :data:`filters.DATETIME_SQL`, that
  computes the indexed timestamps here, so both agree by construction).

Every index also answers ``is_null``. A value that is an array indexes each element, as the filter
semantics of :mod:`retrieval.vectors.filters` say (a condition holds when any element satisfies it).

Exactness: a filter is evaluated here only if every condition in it is answered *exactly* as the SQL
path would. Elements of a type an index does not hold are counted per kind (text, number, bool) as
"foreign"; a condition about a foreign kind is answered "no point" when no point holds such an
element at that key, else the whole filter falls back to SQL (:meth:`PayloadIndexSet.evaluate`
returns None). Examples: ``equals "5"`` on an integer index is the empty set unless some point has a
string there; a real 5.5 on an integer-indexed key makes numeric conditions on it fall back.

Layout: points get dense *slots* (``slot_of_ext``, ``ext_of_slot``, reused after deletes); every slot
has a version (``ver``) bumped on each write, and an index entry ``(value, slot, version)`` is valid
while its version is the slot's. Each key keeps a sorted main array of entries and an unsorted tail
(appended on writes, merged in when it grows past an eighth of the main array), plus per-slot
``present`` (value not missing/null) and ``foreign`` bits. A filter evaluates to a bool mask over
slots with numpy only: ``searchsorted`` slices of the main arrays, vectorised tests of the tails,
``&`` / ``|`` / ``~`` for must / should / must_not. No per-point Python on the query path.

``lab_of_slot`` mirrors the shard's vector labels (``Shard.ext_of_lab``) so a mask over slots turns
into a mask over labels with one gather; it is synced lazily (:meth:`PayloadIndexSet.sync_labels`).

The contents are derived data: built from the point store at open (:func:`build`), maintained on
every applied write in write-sequence order, so after any crash they equal a rebuild from the store.

Thread-safety: none. A :class:`PayloadIndexSet` is read and written on the shard's event-loop thread
only (:func:`build` makes a new one on a worker thread, which the loop then installs).
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from retrieval.errors import InvalidArgument
from retrieval.vectors import filters as flt
from retrieval.vectors.delta import NO_ID

logger = logging.getLogger(__name__)

TYPES = ("keyword", "integer", "float", "bool", "datetime")
EXACT_BLOCK = 8192  # slots per block of exact_knn
F_TEXT, F_NUM, F_BOOL = 1, 2, 4
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_EXACT_INT = 2**53  # integers up to this magnitude are exact in float64


def validate_key(key: object) -> str:
    """A payload index key: the dotted-key grammar of :mod:`filters`; raise InvalidArgument otherwise."""
    if not isinstance(key, str) or not key or len(key) > 256 or flt._KEY_RE.fullmatch(key) is None:
        raise InvalidArgument(f"payload index key {str(key)[:80]!r} is not valid: use dotted parts of letters, "
                              "digits, '_' and '-'")
    return key


def validate_type(type_: object) -> str:
    if type_ not in TYPES:
        raise InvalidArgument(f"unknown payload index type {str(type_)[:40]!r}; valid: {', '.join(TYPES)}")
    return type_


# --------------------------------------------------------------------------------------------------
# Datetime strings -> epoch seconds, with SQLite's own expression (so the SQL path agrees exactly)
# --------------------------------------------------------------------------------------------------
_tls = threading.local()
_DT_QUERY = "SELECT " + flt.DATETIME_SQL.format(v="?1")


def datetime_seconds(s: str) -> float | None:
    """Epoch seconds of an ISO 8601 / RFC 3339 string as SQLite computes them, or None."""
    con = getattr(_tls, "con", None)
    if con is None:
        con = _tls.con = sqlite3.connect(":memory:", check_same_thread=False)
    r = con.execute(_DT_QUERY, (s,)).fetchone()[0]
    return None if r is None else float(r)


# --------------------------------------------------------------------------------------------------
# One key's index
# --------------------------------------------------------------------------------------------------
def _grow(a: np.ndarray, n: int, fill=0) -> np.ndarray:
    if n <= len(a):
        return a
    out = np.full(max(n, 2 * len(a), 256), fill, a.dtype)
    out[: len(a)] = a
    return out


class _Column:
    """Entries of one indexed key (see the module docstring)."""

    def __init__(self, key: str, type_: str) -> None:
        self.key = key
        self.type = type_
        self.parts = key.split(".")
        self.dtype = np.float64 if type_ in ("float", "datetime") else np.int64
        self.mv = np.zeros(0, self.dtype)        # main: values, sorted
        self.ms = np.zeros(0, np.int64)          # main: slots
        self.mver = np.zeros(0, np.uint32)       # main: versions
        self.tv = np.zeros(256, self.dtype)      # tail (unsorted), first tn rows used
        self.ts = np.zeros(256, np.int64)
        self.tver = np.zeros(256, np.uint32)
        self.tn = 0
        self.present = np.zeros(0, bool)         # per slot: value not missing / null
        self.foreign = np.zeros(0, np.uint8)     # per slot: F_* bits of elements this index does not hold
        self.nent = np.zeros(0, np.int32)        # per slot: entries it has
        self.nforeign = {F_TEXT: 0, F_NUM: 0, F_BOOL: 0}
        self.points = 0                          # slots with at least one entry
        self.dead = 0                            # invalidated entries still stored
        self.codes: dict[str, int] = {}          # keyword: string -> code

    # ---------------- maintenance ----------------
    def grow(self, n: int) -> None:
        self.present = _grow(self.present, n, False)
        self.foreign = _grow(self.foreign, n, 0)
        self.nent = _grow(self.nent, n, 0)

    def clear(self, slots: np.ndarray) -> None:
        """Forget what ``slots`` held (their entries were invalidated by a version bump)."""
        if not len(slots):
            return
        self.present[slots] = False
        bits = self.foreign[slots]
        for b in (F_TEXT, F_NUM, F_BOOL):
            self.nforeign[b] -= int(np.count_nonzero(bits & b))
        self.foreign[slots] = 0
        ne = self.nent[slots]
        self.points -= int(np.count_nonzero(ne))
        self.dead += int(ne.sum())
        self.nent[slots] = 0

    def _element(self, e):
        """-> (indexed value or None, foreign bit or 0) of one element."""
        t = self.type
        if e is True or e is False:
            return (int(e), 0) if t == "bool" else (None, F_BOOL)
        if isinstance(e, str):
            if t == "keyword":
                c = self.codes.get(e)
                if c is None:
                    c = self.codes[e] = len(self.codes)
                return c, 0
            if t == "datetime":
                return datetime_seconds(e), 0  # unparseable text never matches a range: nothing to hold
            return None, F_TEXT
        if isinstance(e, int):
            if t == "integer" and _I64_MIN <= e <= _I64_MAX:
                return e, 0
            if t in ("float", "datetime") and -_EXACT_INT <= e <= _EXACT_INT:
                return float(e), 0
            return None, F_NUM
        if isinstance(e, float):
            if t in ("float", "datetime") and math.isfinite(e):
                return e, 0
            return None, F_NUM
        return None, 0  # null, arrays and objects inside arrays never match a condition

    def add(self, slots: list[int], objs: list, ver: np.ndarray) -> None:
        """Index the payload objects (parsed JSON or None) of freshly cleared ``slots``."""
        vals: list = []
        sl: list[int] = []
        pres: list[int] = []
        fs: list[int] = []
        fb: list[int] = []
        es: list[int] = []
        en: list[int] = []
        parts = self.parts
        t = self.type
        fast = {"keyword": str, "integer": int, "float": float, "bool": bool}.get(t)
        codes = self.codes
        element = self._element
        for s, obj in zip(slots, objs):
            v = obj
            for p in parts:
                if type(v) is dict and p in v:
                    v = v[p]
                else:
                    v = None
                    break
            if v is None:
                continue
            pres.append(s)
            elems = v if type(v) is list else (() if type(v) is dict else (v,))
            bits = 0
            n = 0
            for e in elems:
                if type(e) is fast and (fast is not int or _I64_MIN <= e <= _I64_MAX) \
                        and (fast is not float or math.isfinite(e)):
                    if fast is str:
                        x = codes.get(e)
                        if x is None:
                            x = codes[e] = len(codes)
                    elif fast is bool:
                        x = int(e)
                    else:
                        x = e
                else:
                    x, b = element(e)
                    bits |= b
                    if x is None:
                        continue
                vals.append(x)
                sl.append(s)
                n += 1
            if bits:
                fs.append(s)
                fb.append(bits)
            if n:
                es.append(s)
                en.append(n)
        if pres:
            self.present[np.asarray(pres, np.int64)] = True
        if fs:
            bits_a = np.asarray(fb, np.uint8)
            self.foreign[np.asarray(fs, np.int64)] = bits_a
            for b in (F_TEXT, F_NUM, F_BOOL):
                self.nforeign[b] += int(np.count_nonzero(bits_a & b))
        if es:
            self.nent[np.asarray(es, np.int64)] = np.asarray(en, np.int32)
            self.points += len(es)
        if vals:
            m = len(vals)
            if self.tn + m > len(self.tv):
                cap = max(2 * len(self.tv), self.tn + m)
                for name in ("tv", "ts", "tver"):
                    a = getattr(self, name)
                    b2 = np.zeros(cap, a.dtype)
                    b2[: self.tn] = a[: self.tn]
                    setattr(self, name, b2)
            sla = np.asarray(sl, np.int64)
            self.tv[self.tn : self.tn + m] = np.asarray(vals, self.dtype)
            self.ts[self.tn : self.tn + m] = sla
            self.tver[self.tn : self.tn + m] = ver[sla]
            self.tn += m

    def merge(self, ver: np.ndarray, force: bool = False) -> None:
        """Fold the tail into the sorted main arrays (and drop invalid entries) once it is large."""
        if not force and self.tn <= max(4096, len(self.mv) // 8) and self.dead <= max(4096, len(self.mv) // 2):
            return
        v = np.concatenate([self.mv, self.tv[: self.tn]])
        s = np.concatenate([self.ms, self.ts[: self.tn]])
        w = np.concatenate([self.mver, self.tver[: self.tn]])
        ok = w == ver[s]
        v, s, w = v[ok], s[ok], w[ok]
        order = np.argsort(v, kind="stable")
        self.mv, self.ms, self.mver = v[order], s[order], w[order]
        self.tn = 0
        self.dead = 0

    # ---------------- queries ----------------
    def select(self, out: np.ndarray, ver: np.ndarray, lo=None, lo_incl=True, hi=None, hi_incl=True) -> None:
        """Set ``out[slot]`` for every slot with an entry in the interval (None: unbounded)."""
        a = 0 if lo is None else int(np.searchsorted(self.mv, lo, "left" if lo_incl else "right"))
        b = len(self.mv) if hi is None else int(np.searchsorted(self.mv, hi, "right" if hi_incl else "left"))
        if b > a:
            s = self.ms[a:b]
            out[s[self.mver[a:b] == ver[s]]] = True
        if self.tn:
            tv = self.tv[: self.tn]
            sel = np.ones(self.tn, bool)
            if lo is not None:
                sel &= (tv >= lo) if lo_incl else (tv > lo)
            if hi is not None:
                sel &= (tv <= hi) if hi_incl else (tv < hi)
            s = self.ts[: self.tn][sel]
            out[s[self.tver[: self.tn][sel] == ver[s]]] = True

    def _value_code(self, v):
        """The entry value a filter value matches in this index; None: cannot answer; False: matches nothing."""
        t = self.type
        if isinstance(v, bool):
            if t == "bool":
                return int(v)
            return False if self.nforeign[F_BOOL] == 0 else None
        if isinstance(v, str):
            if t == "keyword":
                c = self.codes.get(v)
                return False if c is None else c
            if t == "datetime":
                return None  # text equality is not what the timestamps hold
            return False if self.nforeign[F_TEXT] == 0 else None
        # a number
        if t == "integer":
            if self.nforeign[F_NUM]:
                return None
            if isinstance(v, int):
                return v if _I64_MIN <= v <= _I64_MAX else False
            return int(v) if v.is_integer() and _I64_MIN <= v <= _I64_MAX else False
        if t == "float":
            if self.nforeign[F_NUM]:
                return None
            if isinstance(v, int) and not -_EXACT_INT <= v <= _EXACT_INT:
                return None
            return float(v)
        if t == "datetime":
            return None  # the numbers share the array with timestamps of strings
        return False if self.nforeign[F_NUM] == 0 else None

    def condition(self, c: flt.Condition, live: np.ndarray, ver: np.ndarray) -> np.ndarray | None:
        n = len(live)
        if c.is_null is not None:
            present = self.present[:n]
            return (live & ~present) if c.is_null else present.copy()
        out = np.zeros(n, bool)
        if c.range is not None:
            if self.type in ("keyword", "bool"):
                return out if self.nforeign[F_NUM] == 0 else None
            if self.nforeign[F_NUM]:
                return None
            r = c.range
            self.merge(ver)
            if self.type == "integer":
                lo, hi = _I64_MIN, _I64_MAX
                if r.gt is not None:
                    lo = max(lo, math.floor(float(r.gt)) + 1)
                if r.gte is not None:
                    lo = max(lo, math.ceil(float(r.gte)))
                if r.lt is not None:
                    hi = min(hi, math.ceil(float(r.lt)) - 1)
                if r.lte is not None:
                    hi = min(hi, math.floor(float(r.lte)))
                if lo <= hi:
                    self.select(out, ver, lo, True, hi, True)
                return out
            lo, lo_incl, hi, hi_incl = None, True, None, True
            for b, incl in ((r.gt, False), (r.gte, True)):
                if b is not None:
                    b = float(b)
                    if lo is None or b > lo or (b == lo and not incl):
                        lo, lo_incl = b, incl
            for b, incl in ((r.lt, False), (r.lte, True)):
                if b is not None:
                    b = float(b)
                    if hi is None or b < hi or (b == hi and not incl):
                        hi, hi_incl = b, incl
            self.select(out, ver, lo, lo_incl, hi, hi_incl)
            return out
        values = (c.equals,) if c.equals is not None else c.any_of
        codes = []
        for v in values:
            code = self._value_code(v)
            if code is None:
                return None
            if code is not False:
                codes.append(code)
        if codes:
            self.merge(ver)
            for code in set(codes):
                self.select(out, ver, code, True, code, True)
        return out


# --------------------------------------------------------------------------------------------------
# All indexes of a shard
# --------------------------------------------------------------------------------------------------
class PayloadIndexSet:
    """The payload indexes of one shard (see the module docstring). Empty (no keys): holds nothing."""

    def __init__(self, specs: dict[str, str] | None = None, d: int = 0) -> None:
        """``d``: also hold each point's index-ready vector (per slot), so that a filter matching up to
        ``indexing.filter_exact_in_memory`` points (32,768) is searched exactly from memory, with no
        index or store reads: a gather and one matrix product, ~3 ms for 32k x 128 on 2 cores, faster
        than a filtered graph search (whose filter callback runs per visited node) and exact."""
        self.columns: dict[str, _Column] = {k: _Column(k, t) for k, t in (specs or {}).items()}
        self.vec: np.ndarray | None = np.zeros((0, d), np.float32) if d and self.columns else None
        self.sqn = np.zeros(0, np.float32)      # squared length of each slot's vector (with ``vec``)
        self.slot_of_ext: dict[int, int] = {}
        self.ext_of_slot = np.zeros(0, np.uint64)
        self.live = np.zeros(0, bool)
        self.ver = np.zeros(0, np.uint32)
        self.lab = np.zeros(0, np.int64)        # vector label of each slot, -1: not in the index (delta)
        self.n = 0                              # slots in use (high-water mark)
        self.free: list[int] = []
        self._lab_index = None                  # the vector index lab was synced against
        self._lab_hw = 0                        # labels below this were synced

    def specs(self) -> dict[str, str]:
        return {k: c.type for k, c in self.columns.items()}

    def datetime_keys(self) -> frozenset[str]:
        return frozenset(k for k, c in self.columns.items() if c.type == "datetime")

    def info(self) -> list[dict]:
        return [{"key": k, "type": c.type, "points": c.points} for k, c in self.columns.items()]

    def count_live(self) -> int:
        return len(self.slot_of_ext)

    def memory_bytes(self) -> int:
        b = self.ext_of_slot.nbytes + self.live.nbytes + self.ver.nbytes + self.lab.nbytes + 100 * len(self.slot_of_ext)
        b += self.vec.nbytes + self.sqn.nbytes if self.vec is not None else 0
        for c in self.columns.values():
            b += c.mv.nbytes + c.ms.nbytes + c.mver.nbytes + c.tv.nbytes + c.ts.nbytes + c.tver.nbytes
            b += c.present.nbytes + c.foreign.nbytes + c.nent.nbytes
        return b

    def drop(self, key: str) -> None:
        self.columns.pop(key, None)

    # ---------------- writes (applied in write-sequence order) ----------------
    def _grow(self, n: int) -> None:
        if n > len(self.live):
            cap = max(n, 2 * len(self.live), 1024)
            self.ext_of_slot = _grow(self.ext_of_slot, cap, NO_ID)
            self.live = _grow(self.live, cap, False)
            self.ver = _grow(self.ver, cap, 0)
            self.lab = _grow(self.lab, cap, -1)
            if self.vec is not None:
                v = np.zeros((cap, self.vec.shape[1]), np.float32)
                v[: len(self.vec)] = self.vec
                self.vec = v
                self.sqn = _grow(self.sqn, cap, 0)
            for c in self.columns.values():
                c.grow(cap)

    def _slots(self, ids: list[int]) -> np.ndarray:
        out = np.empty(len(ids), np.int64)
        get = self.slot_of_ext.get
        for j, i in enumerate(ids):
            s = get(i)
            if s is None:
                if self.free:
                    s = self.free.pop()
                else:
                    s = self.n
                    self.n += 1
                    if s >= len(self.live):
                        self._grow(s + 1)
                self.slot_of_ext[i] = s
            out[j] = s
        return out

    def upsert(self, ids: np.ndarray, payloads: list[str | None] | None, vectors: np.ndarray | None = None) -> None:
        """Points ``ids`` (unique) now hold ``payloads`` (compact JSON or None each; None: no payloads)
        and, when the set holds vectors, the index-ready ``vectors`` (n, d)."""
        if not self.columns or not len(ids):
            return
        slots = self._slots(ids.tolist())
        self.ext_of_slot[slots] = ids
        if self.vec is not None:
            v = np.asarray(vectors, np.float32)
            self.vec[slots] = v
            self.sqn[slots] = np.einsum("ij,ij->i", v, v)
        self.live[slots] = True
        self.ver[slots] += np.uint32(1)
        self.lab[slots] = -1  # an upserted point goes to the delta until the indexer labels it
        for c in self.columns.values():
            c.clear(slots)
        if payloads is None:
            return
        objs = [json.loads(p) if p else None for p in payloads]
        sl = slots.tolist()
        for c in self.columns.values():
            c.add(sl, objs, self.ver)

    def delete(self, ids: np.ndarray) -> None:
        if not self.columns or not len(ids):
            return
        pop = self.slot_of_ext.pop
        slots = [s for s in (pop(i, -1) for i in ids.tolist()) if s >= 0]
        if not slots:
            return
        sa = np.asarray(slots, np.int64)
        self.live[sa] = False
        self.ver[sa] += np.uint32(1)
        self.lab[sa] = -1
        self.ext_of_slot[sa] = NO_ID
        for c in self.columns.values():
            c.clear(sa)
        self.free.extend(slots)

    def exact_knn(self, xq: np.ndarray, slots: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN of ``xq`` (nq, d) among the points in ``slots`` from the held vectors -> (D float32
        (nq, k), point ids uint64 (nq, k), NO_ID / inf padded). ``metric``: "l2" (squared) or "ip"
        (``1 - <q, x>``), as :func:`retrieval.indexes.exact.knn`. In blocks of :data:`EXACT_BLOCK`
        slots (a gather that stays in cache, one matrix product, a partial sort), numpy only."""
        nq = len(xq)
        q = np.asarray(xq, np.float32)
        qn = np.einsum("ij,ij->i", q, q)[None, :]
        cand_d, cand_s = [], []
        for b in range(0, len(slots), EXACT_BLOCK):
            sl = slots[b : b + EXACT_BLOCK]
            ip = self.vec[sl] @ q.T                                   # (m, nq)
            dist = (np.maximum(self.sqn[sl][:, None] - 2 * ip + qn, 0) if metric == "l2" else 1 - ip)
            if len(sl) > k:
                top = np.argpartition(dist, k - 1, axis=0)[:k]        # (k, nq)
                cand_d.append(np.take_along_axis(dist, top, 0))
                cand_s.append(sl[top])
            else:
                cand_d.append(dist)
                cand_s.append(np.broadcast_to(sl[:, None], dist.shape))
        if not cand_d:
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), NO_ID, np.uint64)
        Dc = np.vstack(cand_d).T.astype(np.float32)                   # (nq, candidates)
        Sc = np.vstack(cand_s).T
        order = np.argsort(Dc, axis=1, kind="stable")[:, :k]
        D = np.take_along_axis(Dc, order, 1)
        ids = self.ext_of_slot[np.take_along_axis(Sc, order, 1)]
        if D.shape[1] < k:
            pad = k - D.shape[1]
            D = np.hstack([D, np.full((nq, pad), np.inf, np.float32)])
            ids = np.hstack([ids, np.full((nq, pad), NO_ID, np.uint64)])
        return D, ids

    def unlabel(self, ids: np.ndarray) -> None:
        """These points left the vector index (hidden by a write); labels are resynced lazily."""
        if not self.columns or not len(ids):
            return
        get = self.slot_of_ext.get
        slots = [s for s in (get(i, -1) for i in ids.tolist()) if s >= 0]
        if slots:
            self.lab[np.asarray(slots, np.int64)] = -1

    # ---------------- labels ----------------
    def sync_labels(self, index: object, ext_of_lab: np.ndarray, next_label: int) -> None:
        """Bring ``lab`` up to date with the shard's label map (labels given since the last call; all
        of them after the vector index was replaced)."""
        hw = self._lab_hw
        if index is self._lab_index and next_label == hw:
            return
        if index is not self._lab_index or next_label < hw or next_label - hw > 4096:
            if index is not self._lab_index or next_label < hw:
                self.lab[:] = -1
                hw = 0
            ext = ext_of_lab[hw:next_label]
            labs = np.flatnonzero(ext != NO_ID)
            if len(labs) and self.n:
                e = ext[labs]
                live_slots = np.flatnonzero(self.live[: self.n])
                se = self.ext_of_slot[live_slots]
                order = np.argsort(se)
                ses = se[order]
                pos = np.minimum(np.searchsorted(ses, e), len(ses) - 1) if len(ses) else None
                if pos is not None:
                    hit = ses[pos] == e
                    self.lab[live_slots[order[pos[hit]]]] = labs[hit] + hw
        else:
            ext = ext_of_lab[hw:next_label]
            get = self.slot_of_ext.get
            for j in np.flatnonzero(ext != NO_ID).tolist():
                s = get(int(ext[j]))
                if s is not None:
                    self.lab[s] = hw + j
        self._lab_index = index
        self._lab_hw = next_label

    # ---------------- queries ----------------
    def covers(self, f: flt.Filter) -> bool:
        """Every condition of ``f`` is on an indexed key."""
        for c in (*f.must, *f.should, *f.must_not):
            if isinstance(c, flt.Filter):
                if not self.covers(c):
                    return False
            elif c.key not in self.columns:
                return False
        return True

    def touches(self, f: flt.Filter, keys: frozenset[str]) -> bool:
        for c in (*f.must, *f.should, *f.must_not):
            if isinstance(c, flt.Filter):
                if self.touches(c, keys):
                    return True
            elif c.key in keys:
                return True
        return False

    def evaluate(self, f: flt.Filter) -> np.ndarray | None:
        """Bool mask over slots ``[0, n)`` of the live points matching ``f``, exactly as the SQL path
        would; None when some condition is not on an indexed key or not answerable exactly."""
        if not self.columns or not self.covers(f):
            return None
        return self._filter(f, self.live[: self.n])

    def _filter(self, f: flt.Filter, live: np.ndarray) -> np.ndarray | None:
        m = live.copy()
        for c in f.must:
            x = self._clause(c, live)
            if x is None:
                return None
            m &= x
        if f.should:
            s = np.zeros(len(live), bool)
            for c in f.should:
                x = self._clause(c, live)
                if x is None:
                    return None
                s |= x
            m &= s
        for c in f.must_not:
            x = self._clause(c, live)
            if x is None:
                return None
            m &= ~x
        return m

    def _clause(self, c, live: np.ndarray) -> np.ndarray | None:
        if isinstance(c, flt.Filter):
            return self._filter(c, live)
        return self.columns[c.key].condition(c, live, self.ver[: self.n])


def scan_build(specs: dict[str, str], rows: Iterable[tuple], d: int = 0, prepare=None) -> PayloadIndexSet:
    """A new set with ``specs`` holding the points of ``rows``: blocks of (ids, payloads), or with
    ``d`` of (ids, payloads, stored vectors), which ``prepare`` makes index-ready."""
    pset = PayloadIndexSet(specs, d)
    for ids, payloads, *vecs in rows:
        pset.upsert(ids, payloads, (prepare(vecs[0]) if prepare else vecs[0]) if d else None)
    for c in pset.columns.values():
        c.merge(pset.ver, force=True)
    return pset


# --------------------------------------------------------------------------------------------------
# The filtered-search planner
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """``kind``: "none" (no point matches), "exact" (brute force over the matches) or "index" (the
    vector index with an allowed-label mask, beam ``ef``)."""

    kind: str
    ef: int = 0


def plan_filtered(n_match: int, n_total: int, k: int, threshold: int, ef: int = 0, exact: bool = False,
                  ef_cap: int = 2048) -> Plan:
    """Choose how to search ``n_match`` of ``n_total`` points for ``k`` neighbours: exactly when at most
    ``threshold`` match (or ``exact``), else in the index with the beam ``ef`` (0: default max(k, 64))
    widened as the selectivity ``s = n_match / n_total`` drops below 10%: ``ef * sqrt(0.1 / s)``,
    at most ``ef_cap`` (and never below the requested beam)."""
    if n_match <= 0:
        return Plan("none")
    if exact or n_match <= threshold:
        return Plan("exact")
    base = max(k, ef or 64)
    s = n_match / max(n_total, n_match, 1)
    if s < 0.1:
        base = max(base, min(ef_cap, math.ceil(base * math.sqrt(0.1 / s))))
    return Plan("index", base)
