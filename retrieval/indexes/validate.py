"""Every index spec is checked here before it is stored: a spec that would crash or break the process
is refused with :class:`~retrieval.errors.InvalidArgument` and the library's own message.

Why a child process: a native library's assertion is a process abort (SIGABRT, SIGSEGV, SIGFPE) that
no ``try`` catches. faiss accepts factory strings such as ``HNSW0`` (aborts on the first add),
``HNSW1`` (segfaults), ``IVF16,PQ4x0`` (SIGFPE) or ``IVF0,Flat`` (every search fails). So a faiss
spec is tried in a fresh ``python -m retrieval.indexes.validate`` process, the way the service uses it
(:class:`~retrieval.indexes.faiss_index.FaissIndex`: build, train, add, remove, search with the default
query params, with an allowed mask and after a removal, read vectors back, serialise and reload). A
child that dies by a signal, errors or runs past :data:`CHILD_TIMEOUT_S` makes the spec invalid, with
the text the library wrote (faiss prints its assertions to stderr, which is captured).

Before any child, a static check (:func:`check_faiss_factory`) refuses numbers that would make a huge
allocation or an endless training (an IVF with 10**9 lists, PQ codes of 30 bits, training samples
of many GiB) and an explicit ``train_size`` below what faiss needs to train at all.

The trial itself is scaled: large list counts and code widths (``IVF65536`` -> ``IVF256``, ``PQ8x16``
-> ``PQ8x10``) are probed at the smaller size, so a trial is about a second whatever the spec; their
cost is what the static check bounds, and the full string is still parsed by faiss in the child. The
child trains on ``max(points faiss needs, 256)`` fixed-seed random points (standard normal; unit
length for ``ip``).

Results are cached per (factory, ef_construction, d, metric) for the process's life, failures as
well (they are deterministic), except timeouts; at most :data:`MAX_CHILDREN` trials run at once.

hnsw and exact specs need no child: their parameters are range-checked (in the spec classes and in
:func:`check_spec`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import numbers
import os
import re
import signal
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path

from retrieval.errors import InvalidArgument
from retrieval.indexes.base import ExactSpec, FaissSpec, HnswSpec, IndexSpec
from retrieval.indexes.faiss_factory import (
    _IMI,
    _IVF,
    _PQ,
    _PRQ,
    _code_bits,
    default_train_size,
    min_train_points,
)

logger = logging.getLogger(__name__)

MAX_NUMBER = 1 << 20            # any number in a factory string
MAX_IVF_LISTS = 1 << 20
MAX_HNSW_M = 256                # faiss HNSW links per node (M); M < 2 crashes faiss
MAX_CODE_BITS = 16              # bits per PQ / RQ / LSQ sub-code (faiss itself stops at 24)
MAX_IMI_BITS = 10               # IMI2xN: 2**(2N) lists
MAX_TABLE_BYTES = 2 << 30       # coarse centroids or codebooks: nlist * d * 4, 2**nbits * d * 4
MAX_TRAIN_BYTES = 2 << 30       # the training sample the service collects: train_size * d * 4
MAX_TRAIN_SIZE = 100_000_000
MAX_EF_CONSTRUCTION = 10_000
MAX_DIM = 1 << 16

PROBE_MIN_POINTS = 256          # the trial trains on max(needed, 256) points
PROBE_MAX_LISTS = 256           # IVF lists probed at most (larger: probed at this size)
PROBE_MAX_BITS = 10             # PQ / RQ bits probed at most
PROBE_MAX_IMI_BITS = 4
CHILD_TIMEOUT_S = 120.0
MAX_CHILDREN = 2
CACHE_SIZE = 4096

_cache: OrderedDict[tuple, str | None] = OrderedDict()  # key -> None (valid) or the error message
_cache_lock = threading.Lock()
_key_locks: dict[tuple, threading.Lock] = {}
_children = threading.BoundedSemaphore(MAX_CHILDREN)


def _index_metric(metric: str) -> str:
    if metric not in ("l2", "ip", "cosine"):
        raise InvalidArgument(f"unknown metric {metric!r}; valid: cosine, ip, l2")
    return "l2" if metric == "l2" else "ip"


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise InvalidArgument(f"{what} must be an integer, got {v!r}")
    return v


# ------------------------------------------------------------------------------------------------
# Static checks of a factory string
# ------------------------------------------------------------------------------------------------
_HNSW = re.compile(r"HNSW(\d+)")
_NSG = re.compile(r"NSG(\d+)")
_TRANSFORM = re.compile(r"(?<![A-Z])(PCAW?R?|RR|ITQ|OPQ\d+_)(\d+)")  # vector transforms: output dimension
def check_faiss_factory(factory: str, d: int, train_size: int = 0) -> None:
    """Refuse, without running faiss, numbers that cannot work or would allocate too much."""
    where = f"faiss factory string {factory!r}"
    for m in re.finditer(r"\d+", factory):
        if len(m.group(0)) > 7 or int(m.group(0)) > MAX_NUMBER:
            raise InvalidArgument(f"{where}: the number {m.group(0)[:20]} is too large (the limit is {MAX_NUMBER})")
    for m in _IVF.finditer(factory):
        nlist = int(m.group(1))
        if nlist < 1:
            raise InvalidArgument(f"{where}: IVF needs at least 1 list, got {nlist}")
        if nlist > MAX_IVF_LISTS:
            raise InvalidArgument(f"{where}: {nlist} IVF lists is above the limit of {MAX_IVF_LISTS}")
        if nlist * d * 4 > MAX_TABLE_BYTES:
            raise InvalidArgument(f"{where}: {nlist} IVF centroids of dimension {d} need "
                                  f"{nlist * d * 4 / 2**30:.1f} GiB; the limit is {MAX_TABLE_BYTES >> 30} GiB")
    for m in _IMI.finditer(factory):
        if int(m.group(1)) != 2:
            raise InvalidArgument(f"{where}: only IMI2xN is supported")
        bits = int(m.group(2))
        if not 1 <= bits <= MAX_IMI_BITS:
            raise InvalidArgument(f"{where}: IMI2x{bits}: bits must be in [1, {MAX_IMI_BITS}]")
    for m in _HNSW.finditer(factory):
        M = int(m.group(1))
        if not 2 <= M <= MAX_HNSW_M:
            raise InvalidArgument(f"{where}: HNSW{M}: M (links per node) must be in [2, {MAX_HNSW_M}]")
    for m in _NSG.finditer(factory):
        R = int(m.group(1))
        if not 2 <= R <= MAX_HNSW_M:
            raise InvalidArgument(f"{where}: NSG{R}: R (links per node) must be in [2, {MAX_HNSW_M}]")
    for m in _TRANSFORM.finditer(factory):
        if int(m.group(2)) < 1:
            raise InvalidArgument(f"{where}: {m.group(0)}: a transform to {m.group(2)} dimensions leaves nothing to search")
    for m in _PQ.finditer(factory):
        M = int(m.group(1))
        if M < 1:
            raise InvalidArgument(f"{where}: {m.group(0)}: the number of sub-quantizers must be >= 1")
        if M > d and not m.group(0).startswith("OPQ"):
            raise InvalidArgument(f"{where}: {m.group(0)}: {M} sub-quantizers for dimension {d}; at most {d}")
    for b in _code_bits(factory):
        if not 1 <= b <= MAX_CODE_BITS:
            raise InvalidArgument(f"{where}: {b} bits per code; must be in [1, {MAX_CODE_BITS}]")
        if (1 << b) * d * 4 > MAX_TABLE_BYTES:
            raise InvalidArgument(f"{where}: codebooks of 2**{b} centroids at dimension {d} need "
                                  f"{(1 << b) * d * 4 / 2**30:.1f} GiB; the limit is {MAX_TABLE_BYTES >> 30} GiB")
    need = min_train_points(factory)
    if train_size and train_size < need:
        raise InvalidArgument(f"{where}: train_size {train_size} is below the {need} points faiss needs to train it")
    train = train_size or default_train_size(factory)
    if train * d * 4 > MAX_TRAIN_BYTES:
        raise InvalidArgument(f"{where}: training would collect {train} points of dimension {d} "
                              f"({train * d * 4 / 2**30:.1f} GiB; the limit is {MAX_TRAIN_BYTES >> 30} GiB): "
                              "use fewer lists or shorter codes, or a smaller train_size")


def probe_factory(factory: str) -> str:
    """``factory`` with large list counts and code widths scaled down for the trial (see the module
    docstring); small and zero values are kept as they are, since those are what crash."""
    s = _IVF.sub(lambda m: f"IVF{min(int(m.group(1)), PROBE_MAX_LISTS)}", factory)
    s = _IMI.sub(lambda m: f"IMI{m.group(1)}x{min(int(m.group(2)), PROBE_MAX_IMI_BITS)}", s)

    def bits(m: re.Match) -> str:
        if m.group(2) is None or m.group(0).startswith("OPQ"):
            return m.group(0)
        head = m.group(0)[: m.start(2) - m.start(0)]
        return f"{head}{min(int(m.group(2)), PROBE_MAX_BITS)}"

    s = _PQ.sub(bits, s)
    s = _PRQ.sub(lambda m: m.group(0) if m.group(3) is None else
                 f"{m.group(0)[: m.start(3) - m.start(0)]}{min(int(m.group(3)), PROBE_MAX_BITS)}", s)
    return s


# ------------------------------------------------------------------------------------------------
# The whole check
# ------------------------------------------------------------------------------------------------
def check_spec(spec: IndexSpec, d: int, metric: str = "l2") -> None:
    """Raise :class:`InvalidArgument` unless ``spec`` can serve ``d``-dimensional vectors under
    ``metric`` (``l2``, ``ip`` or ``cosine``) without crashing or failing. May run a trial child
    process (seconds, once per distinct faiss spec): call :func:`acheck_spec` from an event loop."""
    index_metric = _index_metric(metric)
    d = _int(d, "dimension")
    if not 1 <= d <= MAX_DIM:
        raise InvalidArgument(f"dimension must be in [1, {MAX_DIM}], got {d}")
    if isinstance(spec, HnswSpec):
        _int(spec.m, "hnsw m")
        _int(spec.ef_construction, "hnsw ef_construction")
        spec.__post_init__()  # the ranges
        return
    if isinstance(spec, ExactSpec):
        return
    if not isinstance(spec, FaissSpec):
        raise InvalidArgument(f"unknown index spec {spec!r}")
    if not isinstance(spec.factory, str):
        raise InvalidArgument(f"faiss factory must be a string, got {spec.factory!r}")
    _int(spec.train_size, "faiss train_size")
    _int(spec.ef_construction, "faiss ef_construction")
    spec.__post_init__()
    if spec.train_size > MAX_TRAIN_SIZE:
        raise InvalidArgument(f"faiss train_size {spec.train_size} is above the limit of {MAX_TRAIN_SIZE}")
    if spec.ef_construction > MAX_EF_CONSTRUCTION:
        raise InvalidArgument(f"faiss ef_construction {spec.ef_construction} is above the limit of "
                              f"{MAX_EF_CONSTRUCTION}")
    check_faiss_factory(spec.factory, d, spec.train_size)
    _trial_cached(spec.factory, spec.ef_construction, d, index_metric)


async def acheck_spec(spec: IndexSpec, d: int, metric: str = "l2") -> None:
    """:func:`check_spec` off the event loop (cheap when the answer is cached)."""
    key = _key(spec, d, metric) if isinstance(spec, FaissSpec) else None
    if key is None or key not in _cache:
        await asyncio.get_running_loop().run_in_executor(None, check_spec, spec, d, metric)
    else:
        check_spec(spec, d, metric)


def _key(spec: FaissSpec, d, metric) -> tuple | None:
    try:
        return (spec.factory, spec.ef_construction, d, _index_metric(metric))
    except InvalidArgument:
        return None


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _trial_cached(factory: str, ef_construction: int, d: int, metric: str) -> None:
    key = (factory, ef_construction, d, metric)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            err = _cache[key]
            if err is not None:
                raise InvalidArgument(err)
            return
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:  # one trial per key at a time; the others wait for its answer
        with _cache_lock:
            if key in _cache:
                err = _cache[key]
                if err is not None:
                    raise InvalidArgument(err)
                return
        try:
            err, cache = _trial(factory, ef_construction, d, metric)
        finally:
            with _cache_lock:
                _key_locks.pop(key, None)
        if cache:
            with _cache_lock:
                _cache[key] = err
                while len(_cache) > CACHE_SIZE:
                    _cache.popitem(last=False)
    if err is not None:
        raise InvalidArgument(err)


def _library_message(text: str) -> str:
    """The useful part of a faiss error: the assertion, or ``Error: ...``, without the C++ signature."""
    text = text.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("WARNING")]
    for ln in reversed(lines):
        if ln.startswith("Faiss assertion"):
            m = re.match(r"Faiss assertion ('.*?') failed in .*? at (\S+)$", ln)
            return f"faiss assertion {m.group(1)} failed at {Path(m.group(2)).name}" if m else ln[:300]
    for ln in reversed(lines):
        m = re.search(r"Error in .*? at (\S+?): (.*)$", ln)
        if m:
            return f"{m.group(2).strip()} ({Path(m.group(1)).name})"[:300]
    return (lines[-1] if lines else "no message")[:300]


def _failure(factory: str, step: str, detail: str) -> str:
    if step in ("start", "building the factory string"):
        return f"faiss cannot build factory string {factory!r}: {detail}"
    return f"faiss factory string {factory!r} fails when {step}: {detail}"


def _trial(factory: str, ef_construction: int, d: int, metric: str) -> tuple[str | None, bool]:
    """Run the trial child; returns (error message or None, whether to cache the answer)."""
    where = f"faiss factory string {factory!r}"
    probe = probe_factory(factory)
    job = {"factory": factory, "probe": probe, "ef_construction": ef_construction, "d": d, "metric": metric}
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with _children:
        try:
            r = subprocess.run([sys.executable, "-m", "retrieval.indexes.validate"], input=json.dumps(job),
                               capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=root)
        except subprocess.TimeoutExpired:
            logger.warning("index spec trial of %r (d=%d, %s) ran past %.0f s", factory, d, metric, CHILD_TIMEOUT_S)
            return (f"{where}: a trial build with a few points did not finish within {CHILD_TIMEOUT_S:.0f} s; "
                    "use smaller parameters", False)
        except OSError as e:
            raise InvalidArgument(f"{where}: could not start the trial process to check it ({e})") from None
    step = "start"
    for ln in r.stderr.splitlines():
        if ln.startswith("validate-step: "):
            step = ln[len("validate-step: "):].strip()
    stderr = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("validate-step: "))
    if r.returncode == 0:
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = {"ok": False, "error": "the trial process wrote no answer", "step": step}
        if out.get("ok"):
            logger.info("index spec %r (d=%d, %s) passed its trial", factory, d, metric)
            return None, True
        msg = _failure(factory, out.get("step", step), _library_message(out.get("error", "")))
        logger.info("index spec refused: %s", msg)
        return msg, True
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        how = f"the faiss library crashed the process ({sig})"
    else:
        how = f"the trial process exited with status {r.returncode}"
    lib = _library_message(stderr)
    msg = _failure(factory, step, f"{how}: {lib}")
    logger.warning("index spec refused: %s", msg)
    return msg, True


# ------------------------------------------------------------------------------------------------
# The child
# ------------------------------------------------------------------------------------------------
def _child_main() -> int:
    job = json.loads(sys.stdin.read())
    step = "start"

    def at(s: str) -> None:
        nonlocal step
        step = s
        print(f"validate-step: {s}", file=sys.stderr, flush=True)

    try:
        import faiss
        import numpy as np

        from retrieval.indexes.base import QueryParams
        from retrieval.indexes.faiss_index import FaissIndex

        d, metric = int(job["d"]), job["metric"]
        at("building the factory string")
        faiss.index_factory(d, job["factory"], faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
        spec = FaissSpec(job["probe"], ef_construction=int(job["ef_construction"]))
        at("building the index")
        index = FaissIndex(d, metric, spec, threads=1)
        rng = np.random.default_rng(0)
        n = max(min_train_points(job["probe"]), PROBE_MIN_POINTS)
        x = rng.standard_normal((n, d)).astype(np.float32)
        if metric == "ip":
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        if not index.is_trained():
            at("training")
            index.train(x)
            if not index.is_trained():
                raise RuntimeError("the index is still untrained after training")
        at("adding")
        index.add(x, np.arange(n, dtype=np.int64))
        k, xq, qp = 10, x[:8], QueryParams()
        at("searching")
        D, I = index.search(xq, k, qp)
        if D.shape != (len(xq), k) or I.shape != (len(xq), k):
            raise RuntimeError(f"search returned shapes {D.shape}, {I.shape}")
        if not (I[:, 0] >= 0).any():
            raise RuntimeError("search found nothing in an index of %d points" % n)
        at("searching with a filter")
        allowed = np.zeros(n, bool)
        allowed[::2] = True
        _, I = index.search(xq, k, qp, allowed)
        if ((I >= 0) & (I % 2 == 1)).any():
            raise RuntimeError("a filtered search returned a label outside the filter")
        at("removing")
        index.remove(np.arange(0, n, 3, dtype=np.int64))
        index.search(xq, k, qp)
        at("reading vectors back")
        v = index.get_vectors(np.array([1, 2], np.int64))
        if v.shape != (2, d):
            raise RuntimeError(f"reading vectors back gave shape {v.shape}")
        at("saving and loading")
        faiss.deserialize_index(faiss.serialize_index(index._index)).search(xq, k)
        at("done")
        print(json.dumps({"ok": True}), flush=True)
    except BaseException as e:  # noqa: BLE001 - everything is the answer
        print(json.dumps({"ok": False, "step": step, "error": f"{type(e).__name__}: {e}"
                          if not isinstance(e, RuntimeError) else str(e)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
