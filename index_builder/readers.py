"""Streaming readers for the input files of batch index builds.

Every reader opens one file (or a folder of same-format files), reports ``count`` (rows) and ``dim`` up
front without reading the vectors, and yields :class:`Block` s of at most ``block_size`` rows:

    Block(ids: uint64 (b,) | None, vectors: float32 (b, d), payloads: list[dict] | None)

so a file larger than memory is read a block at a time (``.npy`` is memory-mapped, ``.fvecs`` /
``.bvecs`` / ``.ivecs`` are memory-mapped and sliced record by record, HDF5 datasets and Parquet row
batches are read slice by slice). ``blocks(start=r)`` starts at row ``r``, so a build that resumes from
its last finished block does not reread the rows before it.

Formats (registry :data:`READERS`, by name; :func:`format_for_path` maps file extensions):

==========  ===========================  ============================================================
name        extensions                   content
==========  ===========================  ============================================================
``npy``     ``.npy``                     2-D numeric array (any int / uint / float dtype), no ids
``fvecs``   ``.fvecs``                   records ``int32 d`` + ``d x float32`` (TEXMEX format)
``bvecs``   ``.bvecs``                   records ``int32 d`` + ``d x uint8``
``ivecs``   ``.ivecs``                   records ``int32 d`` + ``d x int32``
``hdf5``    ``.hdf5``, ``.h5``           ann-benchmarks layout: ``train`` / ``test`` / ``neighbors``
``parquet`` ``.parquet``, ``.pq``        an id column, a vector column, payload columns (pyarrow)
==========  ===========================  ============================================================

Every block is validated before it is yielded; bad input raises :class:`retrieval.errors.InvalidArgument`
(or :class:`retrieval.errors.NotFound` for a missing file) with a sentence that names the file and the
row (0-based, counted over the whole file or folder): unreadable files, a record whose dimension differs
from the first one, mixed dtypes across the files of a folder or inside a Parquet vector column, a
truncated ``.fvecs`` file, rows holding NaN or infinity, null vectors, negative or duplicate ids, and an
HDF5 file without the expected datasets.

Client files (the server's jobs): ``open_reader(..., allowed_dirs=[...])`` opens the file, or the folder
and each of its files, through :mod:`retrieval.server.sandbox` (``O_NOFOLLOW``, the real path of the
*opened* file checked against the allowed folders, no hard links, no symlinks in folder listings) and the
readers read from those open files, so what was checked is what is read. Without ``allowed_dirs`` (local
command lines) paths are opened as given.

Duplicate ids are found while streaming with sorted runs merged like a binary counter (a log-structured
set): memory is 16 bytes per id (the id and its row), time ``O(n log^2 n)`` for ``n`` ids.

Thread-safety: a reader object is not thread-safe (it owns one open file handle); open one reader per
thread. Iterating ``blocks()`` twice on one reader is fine, one after the other.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, NamedTuple

import numpy as np

from retrieval.core.extras import need
from retrieval.core.registry import Registry
from retrieval.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 65_536
"""Rows per block when the caller does not say (about 32 MiB of float32 at d=128)."""


class Block(NamedTuple):
    """One block of rows. Unpacks as ``ids, vectors, payloads``.

    ids: ``uint64 (b,)``, or ``None`` when the file has no ids (the builder generates them).
    vectors: ``float32 (b, d)``, C-contiguous, finite.
    payloads: ``list`` of ``b`` dicts (JSON-compatible values), or ``None`` when the file has none.
    """

    ids: np.ndarray | None
    vectors: np.ndarray
    payloads: list[dict[str, Any]] | None


# --------------------------------------------------------------------------------------------------
# helpers shared by the readers
# --------------------------------------------------------------------------------------------------


def _check_file(path: Path) -> Path:
    """Resolve ``path``; NotFound when it does not exist, InvalidArgument when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"input file {str(path)!r} does not exist")
    if path.is_file() and not os.access(path, os.R_OK):
        raise InvalidArgument(f"input file {str(path)!r} is not readable (permission denied)")
    return path


def _close_file(f: BinaryIO | None) -> None:
    if f is not None:
        try:
            f.close()
        except Exception:  # already closed, or a memory map still holds it
            pass


def _file_size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def _npy_memmap(f: BinaryIO, path: Path) -> np.ndarray:
    """A read-only memory map of the ``.npy`` array in the open file ``f``. ``np.load(mmap_mode="r")``
    takes only names, so it is given ``/proc/self/fd/N``, which reopens the very file behind ``f`` (not
    whatever ``path`` names now); arrays of Python objects (pickles) are refused."""
    from retrieval.server import sandbox

    try:
        return np.load(sandbox.fd_path(f), mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e) or "object" in str(e):
            raise ValueError("the array holds Python objects (it needs pickle)") from None
        raise


def _check_block_size(block_size: int) -> int:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
        raise InvalidArgument(f"block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


def _check_start(start: int, count: int, path: Path) -> int:
    if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or not 0 <= start <= count:
        raise InvalidArgument(
            f"start row must be an integer in [0, {count}] for {str(path)!r}, got {start!r}"
        )
    return int(start)


def _to_float32_finite(x: np.ndarray, path: Path, first_row: int) -> np.ndarray:
    """Cast a ``(b, d)`` block to C-contiguous float32 and reject rows holding NaN / inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        # always a copy: a block must stay valid after its reader (and its memory map) is closed
        v = np.array(x, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(v).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        what = "NaN" if np.isnan(v[bad]).any() else "infinity"
        if np.isfinite(np.asarray(x[bad], dtype=np.float64)).all():
            what = "a value outside the float32 range"
        raise InvalidArgument(
            f"{str(path)!r} row {first_row + bad}: the vector holds {what}; every value must be a "
            f"finite number"
        )
    return v


class DuplicateIdChecker:
    """Finds repeated ids across a stream of blocks.

    Keeps the ids seen so far as sorted runs whose sizes grow like a binary counter; each new block is
    looked up in every run with a binary search, then merged in. Memory: 16 bytes per id.

    Thread-safety: not thread-safe.
    """

    def __init__(self, source: str) -> None:
        self._source = source
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted ids, their rows)

    def add(self, ids: np.ndarray, first_row: int, rows: np.ndarray | None = None) -> None:
        """Record ``ids`` (uint64 (b,)) at rows ``first_row ..`` (or at the int64 ``rows`` given, e.g.
        the rows of one shard of a block); InvalidArgument on a repeated id."""
        if len(ids) == 0:
            return
        if rows is None:
            rows = np.arange(first_row, first_row + len(ids), dtype=np.int64)
        else:
            rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        s_ids, s_rows = ids[order], rows[order]
        same = np.flatnonzero(s_ids[1:] == s_ids[:-1])
        if len(same):
            # the duplicate pair with the smallest later row is the one a reader meets first
            later = s_rows[same + 1]
            j = int(np.argmin(later))
            self._fail(int(s_ids[same[j] + 1]), int(s_rows[same[j]]), int(later[j]))
        hits: list[tuple[int, int, int]] = []
        for r_ids, r_rows in self._runs:
            pos = np.searchsorted(r_ids, s_ids)
            pos_c = np.minimum(pos, len(r_ids) - 1)
            found = np.flatnonzero(r_ids[pos_c] == s_ids)
            if len(found):
                j = int(found[np.argmin(s_rows[found])])
                hits.append((int(s_rows[j]), int(s_ids[j]), int(r_rows[pos_c[j]])))
        if hits:
            row, value, earlier = min(hits)
            self._fail(value, earlier, row)
        self._runs.append((s_ids, s_rows))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (a_ids, a_rows), (b_ids, b_rows) = self._runs[-2], self._runs[-1]
            m_ids = np.concatenate([a_ids, b_ids])
            m_rows = np.concatenate([a_rows, b_rows])
            o = np.argsort(m_ids, kind="stable")
            self._runs[-2:] = [(m_ids[o], m_rows[o])]

    def _fail(self, value: int, earlier: int, row: int) -> None:
        raise InvalidArgument(
            f"{self._source} row {row}: duplicate id {value} (already used by row {earlier}); ids must be "
            f"unique"
        )


def _ids_to_uint64(col: np.ndarray, path: Path, first_row: int) -> np.ndarray:
    """Integer ids -> uint64, rejecting negative values and non-integers."""
    if col.dtype.kind == "u":
        return col.astype(np.uint64, copy=False)
    if col.dtype.kind == "i":
        neg = np.flatnonzero(col < 0)
        if len(neg):
            r = int(neg[0])
            raise InvalidArgument(
                f"{str(path)!r} row {first_row + r}: id {int(col[r])} is negative; ids must be integers in "
                f"[0, 2**64)"
            )
        return col.astype(np.uint64)
    raise InvalidArgument(
        f"{str(path)!r}: the id column has dtype {col.dtype}; ids must be integers in [0, 2**64)"
    )


# --------------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------------


class VectorReader(ABC):
    """A file of vectors read in blocks. One subclass per format, registered in :data:`READERS`.

    Class fields: ``format`` (registry name), ``extensions`` (lower-case, with the dot).
    Instance fields, known after ``__init__`` without reading the vectors: ``path``, ``count`` (rows),
    ``dim``, ``dtype`` (the dtype stored in the file, before the cast to float32), ``has_ids``,
    ``has_payloads``.
    """

    format: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]

    path: Path
    count: int
    dim: int
    dtype: np.dtype
    has_ids: bool
    has_payloads: bool

    @abstractmethod
    def _read(self, start: int, stop: int) -> Block:
        """Rows ``[start, stop)`` as a validated :class:`Block` (vectors finite float32)."""

    def blocks(
        self, block_size: int = DEFAULT_BLOCK_SIZE, start: int = 0, check_duplicates: bool = True
    ) -> Iterator[Block]:
        """Yield the rows from ``start`` to the end in blocks of at most ``block_size`` rows.

        ``check_duplicates`` (default on, only matters when ``has_ids``): raise InvalidArgument on an id
        already seen in an earlier row *of this iteration* (rows before ``start`` are not read).
        """
        block_size = _check_block_size(block_size)
        start = _check_start(start, self.count, self.path)
        dup = DuplicateIdChecker(repr(str(self.path))) if (self.has_ids and check_duplicates) else None
        for a in range(start, self.count, block_size):
            b = min(a + block_size, self.count)
            block = self._read(a, b)
            if dup is not None and block.ids is not None:
                dup.add(block.ids, a)
            yield block

    def read_all(self) -> Block:
        """All rows as one block (for small files, e.g. query sets)."""
        blocks = list(self.blocks(block_size=max(self.count, 1)))
        if not blocks:
            return Block(
                np.zeros(0, np.uint64) if self.has_ids else None,
                np.zeros((0, self.dim), np.float32),
                [] if self.has_payloads else None,
            )
        return blocks[0]

    def close(self) -> None:
        """Release the file handle (idempotent)."""

    def __enter__(self) -> VectorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, count={self.count}, dim={self.dim})"


# --------------------------------------------------------------------------------------------------
# .npy
# --------------------------------------------------------------------------------------------------


class NpyReader(VectorReader):
    """A 2-D ``.npy`` array, memory-mapped (``numpy.load(mmap_mode="r")``). Rows are vectors; no ids."""

    format = "npy"
    extensions = (".npy",)

    def __init__(self, path: str | os.PathLike[str], *, file: BinaryIO | None = None) -> None:
        """``file``: the open file to read (e.g. from :mod:`retrieval.server.sandbox`); the reader owns it.
        Default: ``path`` is opened."""
        self.path = Path(path) if file is not None else _check_file(Path(path))
        self._file = file if file is not None else open(self.path, "rb")
        try:
            self._init(self._file)
        except BaseException:
            self._arr = None  # type: ignore[assignment]
            _close_file(self._file)
            raise

    def _init(self, file: BinaryIO) -> None:
        try:
            arr = _npy_memmap(file, self.path)
        except ValueError as e:  # object arrays need pickle: not a vector file
            raise InvalidArgument(
                f"{str(self.path)!r} is not a numeric .npy array ({e}); expected a 2-D array of ints or floats"
            ) from e
        except Exception as e:  # truncated header, not an npy file at all
            raise InvalidArgument(f"{str(self.path)!r} cannot be read as .npy: {e}") from e
        if arr.dtype.kind not in "iuf" or arr.dtype.fields is not None:
            raise InvalidArgument(
                f"{str(self.path)!r} has dtype {arr.dtype}; expected one numeric dtype (int, uint or float) "
                f"for every value"
            )
        if arr.ndim != 2:
            raise InvalidArgument(
                f"{str(self.path)!r} has shape {arr.shape}; expected a 2-D array (rows, dim)"
            )
        if arr.shape[1] < 1:
            raise InvalidArgument(f"{str(self.path)!r} has shape {arr.shape}; the dimension must be >= 1")
        self._arr = arr
        self.count, self.dim = int(arr.shape[0]), int(arr.shape[1])
        self.dtype = arr.dtype
        self.has_ids = False
        self.has_payloads = False

    def _read(self, start: int, stop: int) -> Block:
        return Block(None, _to_float32_finite(self._arr[start:stop], self.path, start), None)

    def close(self) -> None:
        mm = getattr(getattr(self, "_arr", None), "_mmap", None)
        self._arr = None  # type: ignore[assignment]
        if mm is not None:
            try:
                mm.close()
            except Exception:  # a view may still hold it; the GC frees it
                pass
        _close_file(getattr(self, "_file", None))
        self._file = None


# --------------------------------------------------------------------------------------------------
# .fvecs / .bvecs / .ivecs
# --------------------------------------------------------------------------------------------------


class _VecsReader(VectorReader):
    """TEXMEX ``*vecs`` files: each record is a little-endian ``int32`` dimension then ``d`` values."""

    value_dtype: ClassVar[np.dtype]

    def __init__(self, path: str | os.PathLike[str], *, file: BinaryIO | None = None) -> None:
        """``file``: the open file to read (the reader owns it); default: ``path`` is opened."""
        self.path = Path(path) if file is not None else _check_file(Path(path))
        self._mm = None
        self._file = file if file is not None else open(self.path, "rb")
        try:
            self._init(self._file)
        except BaseException:
            self.close()
            raise

    def _init(self, file: BinaryIO) -> None:
        size = _file_size(file)
        if size < 4:
            raise InvalidArgument(
                f"{str(self.path)!r} is truncated: {size} bytes, shorter than one record header (4 bytes)"
            )
        try:
            self._mm = np.memmap(file, dtype=np.uint8, mode="r")
        except OSError as e:
            raise InvalidArgument(f"{str(self.path)!r} cannot be read: {e}") from e
        d = int(np.frombuffer(self._mm[:4].tobytes(), dtype="<i4")[0])
        if d < 1 or d > 1 << 20:
            raise InvalidArgument(
                f"{str(self.path)!r} row 0: the record header says dimension {d}; expected a positive "
                f"dimension (is this really a {self.extensions[0]} file?)"
            )
        self.dim = d
        self.dtype = np.dtype(self.value_dtype)
        self._rec = 4 + d * self.dtype.itemsize
        self.count = size // self._rec
        self.has_ids = False
        self.has_payloads = False
        if size % self._rec:
            # either a record in the middle has another dimension, or the last record is cut short
            bad = self._first_bad_header(0, self.count)
            if bad is not None:
                self._wrong_dim(bad)
            raise InvalidArgument(
                f"{str(self.path)!r} is truncated: {size} bytes is not a whole number of {self._rec}-byte "
                f"records (dimension {d}); row {self.count} is incomplete ({size % self._rec} of "
                f"{self._rec} bytes)"
            )

    def _headers(self, start: int, stop: int) -> np.ndarray:
        return np.ndarray(
            (stop - start,), dtype="<i4", buffer=self._mm, offset=start * self._rec, strides=(self._rec,)
        )

    def _first_bad_header(self, start: int, stop: int) -> int | None:
        step = 1 << 20
        for a in range(start, stop, step):
            h = self._headers(a, min(a + step, stop))
            bad = np.flatnonzero(h != self.dim)
            if len(bad):
                return a + int(bad[0])
        return None

    def _wrong_dim(self, row: int) -> None:
        got = int(self._headers(row, row + 1)[0])
        raise InvalidArgument(
            f"{str(self.path)!r} row {row}: the record header says dimension {got}, but row 0 has dimension "
            f"{self.dim}; every record must have the same dimension"
        )

    def _read(self, start: int, stop: int) -> Block:
        bad = self._first_bad_header(start, stop)
        if bad is not None:
            self._wrong_dim(bad)
        vals = np.ndarray(
            (stop - start, self.dim),
            dtype=self.dtype.newbyteorder("<"),
            buffer=self._mm,
            offset=start * self._rec + 4,
            strides=(self._rec, self.dtype.itemsize),
        )
        return Block(None, _to_float32_finite(vals, self.path, start), None)

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        self._mm = None  # type: ignore[assignment]
        if mm is not None and getattr(mm, "_mmap", None) is not None:
            try:
                mm._mmap.close()
            except Exception:  # a view may still hold it; the GC frees it
                pass
        _close_file(getattr(self, "_file", None))
        self._file = None


class FvecsReader(_VecsReader):
    format = "fvecs"
    extensions = (".fvecs",)
    value_dtype = np.dtype("<f4")


class BvecsReader(_VecsReader):
    format = "bvecs"
    extensions = (".bvecs",)
    value_dtype = np.dtype("u1")


class IvecsReader(_VecsReader):
    format = "ivecs"
    extensions = (".ivecs",)
    value_dtype = np.dtype("<i4")


# --------------------------------------------------------------------------------------------------
# ann-benchmarks HDF5
# --------------------------------------------------------------------------------------------------

ANN_HDF5_DATASETS = ("train", "test", "neighbors")
"""Datasets an ann-benchmarks HDF5 file must hold (``distances`` is optional)."""


def _open_h5(path: Path, file: BinaryIO | None = None):
    h5py = need("h5py", "build", "reading HDF5 input")

    try:
        return h5py.File(file if file is not None else path, "r")
    except OSError as e:
        raise InvalidArgument(f"{str(path)!r} cannot be read as HDF5: {e}") from e


def _h5_missing(path: Path, f: Any, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in f]
    if missing:
        raise InvalidArgument(
            f"{str(path)!r} has no dataset {', '.join(repr(m) for m in missing)}; an ann-benchmarks HDF5 file "
            f"holds {', '.join(repr(n) for n in ANN_HDF5_DATASETS)} (found: {sorted(f.keys())})"
        )


class Hdf5Reader(VectorReader):
    """One 2-D dataset of an ann-benchmarks HDF5 file (default ``train``, the base vectors); no ids.

    ``dataset``: which dataset to stream (``"train"`` or ``"test"``). ``require``: datasets that must be
    present (default: ``train``, ``test`` and ``neighbors``, as in every ann-benchmarks file; pass
    ``(dataset,)`` to accept a file with the base vectors alone).
    """

    format = "hdf5"
    extensions = (".hdf5", ".h5")

    def __init__(
        self,
        path: str | os.PathLike[str],
        dataset: str = "train",
        require: Sequence[str] = ANN_HDF5_DATASETS,
        *,
        file: BinaryIO | None = None,
    ) -> None:
        """``file``: the open file to read (the reader owns it); default: ``path`` is opened by HDF5."""
        self._file = file
        try:
            self.path = Path(path) if file is not None else _check_file(Path(path))
            self._f = _open_h5(self.path, file)
        except BaseException:
            _close_file(file)
            raise
        try:
            _h5_missing(self.path, self._f, list(require) + [dataset])
            ds = self._f[dataset]
            if not hasattr(ds, "shape") or len(ds.shape) != 2:
                raise InvalidArgument(
                    f"{str(self.path)!r} dataset {dataset!r} has shape {getattr(ds, 'shape', None)}; "
                    f"expected a 2-D array (rows, dim)"
                )
            if ds.dtype.kind not in "iuf" or ds.dtype.fields is not None:
                raise InvalidArgument(
                    f"{str(self.path)!r} dataset {dataset!r} has dtype {ds.dtype}; expected one numeric dtype"
                )
        except Exception:
            self._f.close()
            _close_file(file)
            raise
        self._ds = ds
        self.dataset = dataset
        self.count, self.dim = int(ds.shape[0]), int(ds.shape[1])
        self.dtype = ds.dtype
        self.has_ids = False
        self.has_payloads = False
        self.metric = ann_metric(self._f.attrs.get("distance"), self.path)

    def _read(self, start: int, stop: int) -> Block:
        try:
            x = self._ds[start:stop]
        except OSError as e:
            raise InvalidArgument(f"{str(self.path)!r} rows {start}..{stop - 1} cannot be read: {e}") from e
        return Block(None, _to_float32_finite(x, self.path, start), None)

    def close(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()
            self._f = None
        _close_file(getattr(self, "_file", None))
        self._file = None


_ANN_METRICS = {"euclidean": "l2", "l2": "l2", "angular": "cosine", "cosine": "cosine", "ip": "ip", "dot": "ip"}


def ann_metric(value: Any, path: Path) -> str | None:
    """The ``distance`` attribute of an ann-benchmarks file as our metric name (None when absent)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    m = _ANN_METRICS.get(str(value).lower())
    if m is None:
        raise InvalidArgument(
            f"{str(path)!r} has distance {value!r}; supported: {', '.join(sorted(_ANN_METRICS))}"
        )
    return m


class AnnHdf5(NamedTuple):
    """The whole of an ann-benchmarks file except ``train``, which stays a streaming reader.

    train: reader over ``train`` (base); test: float32 ``(nq, d)``; neighbors: int64 ``(nq, K)``;
    distances: float32 ``(nq, K)`` or None; metric: ``"l2"`` / ``"cosine"`` / ``"ip"`` or None.
    """

    train: Hdf5Reader
    test: np.ndarray
    neighbors: np.ndarray
    distances: np.ndarray | None
    metric: str | None


def open_ann_hdf5(path: str | os.PathLike[str]) -> AnnHdf5:
    """Open an ann-benchmarks HDF5 file: check ``train`` / ``test`` / ``neighbors``, load all but train.

    Raises InvalidArgument when a dataset is missing, when ``test`` and ``train`` differ in dimension,
    when ``neighbors`` does not have one row per query or holds ids outside ``[0, len(train))``.
    """
    train = Hdf5Reader(path)
    try:
        p = train.path
        f = train._f
        test = Hdf5Reader(p, dataset="test").read_all().vectors
        if test.shape[1] != train.dim:
            raise InvalidArgument(
                f"{str(p)!r}: 'test' has dimension {test.shape[1]} but 'train' has {train.dim}"
            )
        nb = f["neighbors"]
        if len(nb.shape) != 2 or nb.shape[0] != test.shape[0] or nb.dtype.kind not in "iu":
            raise InvalidArgument(
                f"{str(p)!r}: 'neighbors' has shape {nb.shape} and dtype {nb.dtype}; expected integers of "
                f"shape ({test.shape[0]}, K), one row per query"
            )
        neighbors = np.asarray(nb[:], dtype=np.int64)
        if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= train.count):
            r = int(np.flatnonzero(((neighbors < 0) | (neighbors >= train.count)).any(axis=1))[0])
            raise InvalidArgument(
                f"{str(p)!r} 'neighbors' row {r}: holds an id outside [0, {train.count}) (the rows of 'train')"
            )
        distances = None
        if "distances" in f:
            distances = np.asarray(f["distances"][:], dtype=np.float32)
            if distances.shape != neighbors.shape:
                raise InvalidArgument(
                    f"{str(p)!r}: 'distances' has shape {distances.shape}, 'neighbors' {neighbors.shape}; "
                    f"they must match"
                )
        return AnnHdf5(train, test, neighbors, distances, train.metric)
    except Exception:
        train.close()
        raise


# --------------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------------

_VECTOR_COLUMN_NAMES = ("vector", "embedding", "emb", "vec")
_ID_COLUMN_NAMES = ("id",)


class ParquetReader(VectorReader):
    """A Parquet file with a vector column, an optional id column and payload columns (pyarrow).

    vector_column: a ``fixed_size_list`` or ``list`` / ``large_list`` of ints or floats. Default: the
        first of ``vector``, ``embedding``, ``emb``, ``vec`` present, else the only list-typed column.
    id_column: unsigned or non-negative integers. Default ``"id"`` when present; ``None`` for no ids
        (the builder generates them).
    payload_columns: the columns copied into each row's payload dict. Default: every other column;
        ``[]`` for no payloads. Timestamps, dates, decimals and binary values are turned into strings /
        floats so that payloads are JSON-compatible.
    """

    format = "parquet"
    extensions = (".parquet", ".pq")

    _AUTO: ClassVar[Any] = object()

    def __init__(
        self,
        path: str | os.PathLike[str],
        vector_column: str | None = None,
        id_column: str | None | Any = _AUTO,
        payload_columns: Sequence[str] | None = None,
        *,
        file: BinaryIO | None = None,
    ) -> None:
        """``file``: the open file to read (the reader owns it); default: ``path`` is opened by pyarrow."""
        self._file = file
        self._pf = None
        try:
            self.path = Path(path) if file is not None else _check_file(Path(path))
            self._init(vector_column, id_column, payload_columns)
        except BaseException:
            self.close()
            raise

    def _init(self, vector_column, id_column, payload_columns) -> None:
        pa = need("pyarrow", "build", "reading Parquet input")
        import pyarrow.parquet as pq

        try:
            self._pf = pq.ParquetFile(self._file if self._file is not None else self.path)
        except Exception as e:  # ArrowInvalid for a non-parquet / corrupt footer, OSError
            raise InvalidArgument(f"{str(self.path)!r} cannot be read as Parquet: {e}") from e
        schema = self._pf.schema_arrow
        names = list(schema.names)

        def _list_like(t: pa.DataType) -> bool:
            return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

        if vector_column is None:
            vector_column = next((n for n in _VECTOR_COLUMN_NAMES if n in names), None)
            if vector_column is None:
                lists = [n for n in names if _list_like(schema.field(n).type)]
                if len(lists) != 1:
                    raise InvalidArgument(
                        f"{str(self.path)!r}: cannot tell which column holds the vectors (list-typed columns: "
                        f"{lists}); pass vector_column= one of {names}"
                    )
                vector_column = lists[0]
        if vector_column not in names:
            raise InvalidArgument(
                f"{str(self.path)!r} has no column {vector_column!r} for the vectors; columns: {names}"
            )
        vtype = schema.field(vector_column).type
        if not _list_like(vtype) or not (
            pa.types.is_integer(vtype.value_type) or pa.types.is_floating(vtype.value_type)
        ):
            raise InvalidArgument(
                f"{str(self.path)!r} column {vector_column!r} has type {vtype}; expected a list or "
                f"fixed-size list of ints or floats"
            )
        if id_column is self._AUTO:
            id_column = next((n for n in _ID_COLUMN_NAMES if n in names), None)
        if id_column is not None:
            if id_column not in names:
                raise InvalidArgument(f"{str(self.path)!r} has no id column {id_column!r}; columns: {names}")
            if not pa.types.is_integer(schema.field(id_column).type):
                raise InvalidArgument(
                    f"{str(self.path)!r} id column {id_column!r} has type {schema.field(id_column).type}; "
                    f"ids must be integers in [0, 2**64)"
                )
        if payload_columns is None:
            payload_columns = [n for n in names if n not in (vector_column, id_column)]
        else:
            payload_columns = list(payload_columns)
            unknown = [c for c in payload_columns if c not in names]
            if unknown:
                raise InvalidArgument(
                    f"{str(self.path)!r} has no payload column(s) {unknown}; columns: {names}"
                )
        self.vector_column = vector_column
        self.id_column = id_column
        self.payload_columns = payload_columns
        self.count = int(self._pf.metadata.num_rows)
        self.dtype = np.dtype(vtype.value_type.to_pandas_dtype())
        self.has_ids = id_column is not None
        self.has_payloads = bool(payload_columns)
        if pa.types.is_fixed_size_list(vtype):
            self.dim = int(vtype.list_size)
        else:
            self.dim = self._first_length()
        if self.dim < 1:
            raise InvalidArgument(f"{str(self.path)!r} row 0: the vector is empty; the dimension must be >= 1")
        # row group boundaries, to start a read in the right group
        md = self._pf.metadata
        self._rg_starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])

    def _first_length(self) -> int:
        for batch in self._pf.iter_batches(batch_size=1, columns=[self.vector_column]):
            col = batch.column(0)
            if len(col) == 0:
                continue
            if col.null_count:
                raise InvalidArgument(
                    f"{str(self.path)!r} row 0: the vector is null; every row needs a vector"
                )
            return int(col.value_lengths()[0].as_py())
        return 0 if self.count == 0 else 1

    def _batches(self, start: int, stop: int, block_size: int) -> Iterator[tuple[int, Any]]:
        """Arrow record batches covering rows ``[start, stop)``, each with its first row number."""
        cols = [self.vector_column] + ([self.id_column] if self.id_column else []) + self.payload_columns
        g = int(np.searchsorted(self._rg_starts, start, side="right") - 1)
        row = int(self._rg_starts[g])
        groups = list(range(g, len(self._rg_starts) - 1))
        try:
            for batch in self._pf.iter_batches(batch_size=block_size, row_groups=groups, columns=cols):
                n = batch.num_rows
                lo, hi = max(start, row), min(stop, row + n)
                if hi > lo:
                    yield lo, batch.slice(lo - row, hi - lo)
                row += n
                if row >= stop:
                    return
        except OSError as e:
            raise InvalidArgument(f"{str(self.path)!r} near row {row} cannot be read: {e}") from e

    def blocks(
        self, block_size: int = DEFAULT_BLOCK_SIZE, start: int = 0, check_duplicates: bool = True
    ) -> Iterator[Block]:
        block_size = _check_block_size(block_size)
        start = _check_start(start, self.count, self.path)
        dup = DuplicateIdChecker(repr(str(self.path))) if (self.has_ids and check_duplicates) else None
        pending: list[Block] = []
        pending_rows = 0
        for lo, batch in self._batches(start, self.count, block_size):
            blk = self._convert(batch, lo)
            if dup is not None and blk.ids is not None:
                dup.add(blk.ids, lo)
            pending.append(blk)
            pending_rows += len(blk.vectors)
            while pending_rows >= block_size:
                out, pending = _split_blocks(pending, block_size)
                pending_rows -= block_size
                yield out
        if pending_rows:
            out, _ = _split_blocks(pending, pending_rows)
            yield out

    def _read(self, start: int, stop: int) -> Block:
        parts = [self._convert(b, lo) for lo, b in self._batches(start, stop, max(stop - start, 1))]
        out, _ = _split_blocks(parts, stop - start)
        return out

    def _convert(self, batch: Any, first_row: int) -> Block:
        import pyarrow as pa
        import pyarrow.compute as pc

        col = batch.column(self.vector_column)
        n = len(col)
        if col.null_count:
            r = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InvalidArgument(f"{str(self.path)!r} row {first_row + r}: the vector is null; every row needs one")
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != self.dim)
        if len(bad):
            r = int(bad[0])
            raise InvalidArgument(
                f"{str(self.path)!r} row {first_row + r}: the vector has {int(lengths[r])} values, but the "
                f"dimension is {self.dim} (from row 0); every vector must have the same dimension"
            )
        values = col.flatten()
        if values.null_count:
            flat = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            raise InvalidArgument(
                f"{str(self.path)!r} row {first_row + flat // self.dim}: value {flat % self.dim} of the vector is "
                f"null; every value must be a number"
            )
        vec = values.to_numpy(zero_copy_only=False).reshape(n, self.dim)
        vectors = _to_float32_finite(vec, self.path, first_row)
        ids = None
        if self.id_column is not None:
            idc = batch.column(self.id_column)
            if idc.null_count:
                r = int(np.flatnonzero(idc.is_null().to_numpy(zero_copy_only=False))[0])
                raise InvalidArgument(f"{str(self.path)!r} row {first_row + r}: the id is null; every row needs one")
            ids = _ids_to_uint64(idc.to_numpy(zero_copy_only=False), self.path, first_row)
        payloads = None
        if self.payload_columns:
            arrays = []
            for c in self.payload_columns:
                a = batch.column(c)
                t = a.type
                if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                    a = _binary_to_str(a)
                elif pa.types.is_temporal(t):
                    a = _temporal_to_json(a)
                elif pa.types.is_decimal(t):
                    a = pc.cast(a, pa.float64())
                arrays.append(a)
            payloads = pa.Table.from_arrays(arrays, names=self.payload_columns).to_pylist()
        return Block(ids, vectors, payloads)

    def close(self) -> None:
        pf = getattr(self, "_pf", None)
        if pf is not None:
            try:
                pf.close()
            except Exception:  # older pyarrow: no close(); the GC closes the handle
                pass
            self._pf = None
        _close_file(getattr(self, "_file", None))
        self._file = None


def _temporal_to_json(a: Any) -> Any:
    """Timestamps / dates / times -> ISO 8601 strings; durations -> seconds (float); nulls kept."""
    import pyarrow as pa

    vals = a.to_pylist()
    if pa.types.is_duration(a.type):
        return pa.array([None if v is None else v.total_seconds() for v in vals], pa.float64())
    return pa.array([None if v is None else v.isoformat() for v in vals], pa.string())


def _binary_to_str(a: Any) -> Any:
    """Binary payload values -> UTF-8 strings (hex when not valid UTF-8), keeping nulls."""
    import pyarrow as pa

    out = []
    for v in a.to_pylist():
        if v is None:
            out.append(None)
        else:
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(v.hex())
    return pa.array(out, pa.string())


def _split_blocks(parts: list[Block], n: int) -> tuple[Block, list[Block]]:
    """Concatenate the first ``n`` rows of ``parts`` into one Block; return it and the remaining parts."""
    take: list[Block] = []
    rest: list[Block] = []
    need = n
    for p in parts:
        m = len(p.vectors)
        if need == 0:
            rest.append(p)
        elif m <= need:
            take.append(p)
            need -= m
        else:
            take.append(Block(_sl(p.ids, 0, need), p.vectors[:need], _sl(p.payloads, 0, need)))
            rest.append(Block(_sl(p.ids, need, m), p.vectors[need:], _sl(p.payloads, need, m)))
            need = 0
    if len(take) == 1:
        return take[0], rest
    ids = None if take[0].ids is None else np.concatenate([t.ids for t in take])
    vectors = np.concatenate([t.vectors for t in take]) if take else np.zeros((0, 0), np.float32)
    payloads = None if take[0].payloads is None else [p for t in take for p in t.payloads]
    return Block(ids, vectors, payloads), rest


def _sl(x: Any, a: int, b: int) -> Any:
    return None if x is None else x[a:b]


# --------------------------------------------------------------------------------------------------
# folders of files
# --------------------------------------------------------------------------------------------------


class ConcatReader(VectorReader):
    """Several files of one format read as one stream (e.g. a folder of ``part-*.parquet``).

    Rows are numbered over the whole sequence; every file must have the same dimension and dtype (a
    folder mixing e.g. float32 and uint8 files is rejected, naming both files). Duplicate ids are
    checked across files.
    """

    extensions = ()

    def __init__(self, readers: Sequence[VectorReader], path: Path) -> None:
        if not readers:
            raise InvalidArgument(f"{str(path)!r} holds no input files")
        self.path = Path(path)
        self.format = readers[0].format  # type: ignore[misc]
        self._readers = list(readers)
        r0 = readers[0]
        for r in readers[1:]:
            if r.dim != r0.dim:
                raise InvalidArgument(
                    f"{str(r.path)!r} has dimension {r.dim} but {str(r0.path)!r} has {r0.dim}; every file of "
                    f"{str(path)!r} must have the same dimension"
                )
            if r.dtype != r0.dtype:
                raise InvalidArgument(
                    f"{str(r.path)!r} stores {r.dtype} but {str(r0.path)!r} stores {r0.dtype}; mixed dtypes in "
                    f"{str(path)!r}: convert the files to one dtype"
                )
            if (r.has_ids, r.has_payloads) != (r0.has_ids, r0.has_payloads):
                raise InvalidArgument(
                    f"{str(r.path)!r} and {str(r0.path)!r} differ in having ids or payloads; every file of "
                    f"{str(path)!r} must have the same columns"
                )
        self.dim, self.dtype = r0.dim, r0.dtype
        self.has_ids, self.has_payloads = r0.has_ids, r0.has_payloads
        self._starts = np.cumsum([0] + [r.count for r in readers])
        self.count = int(self._starts[-1])

    def _read(self, start: int, stop: int) -> Block:
        parts = []
        for i, r in enumerate(self._readers):
            a, b = max(start, int(self._starts[i])), min(stop, int(self._starts[i + 1]))
            if b > a:
                try:
                    parts.append(r._read(a - int(self._starts[i]), b - int(self._starts[i])))
                except InvalidArgument as e:
                    raise InvalidArgument(
                        f"{e} (file {i} of {str(self.path)!r}; its row 0 is row {int(self._starts[i])} of the "
                        f"folder)"
                    ) from e
        out, _ = _split_blocks(parts, stop - start)
        return out

    def close(self) -> None:
        for r in self._readers:
            r.close()


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

READERS: Registry[type[VectorReader]] = Registry("input format")
"""Reader classes by format name."""
for _cls in (NpyReader, FvecsReader, BvecsReader, IvecsReader, Hdf5Reader, ParquetReader):
    READERS.register(_cls.format, _cls)

EXTENSIONS: dict[str, str] = {ext: cls.format for cls in READERS.values() for ext in cls.extensions}
"""Format name by lower-case file extension."""


def reader_class(format: str) -> type[VectorReader]:
    """The reader class registered as ``format``; InvalidArgument (listing the valid names) otherwise."""
    return READERS.get(format)


def format_for_path(path: str | os.PathLike[str]) -> str:
    """The format name for a file's extension; InvalidArgument when the extension is not known."""
    ext = Path(path).suffix.lower()
    fmt = EXTENSIONS.get(ext)
    if fmt is None:
        raise InvalidArgument(
            f"cannot tell the format of {str(path)!r} from its extension {ext!r}; known extensions: "
            f"{', '.join(sorted(EXTENSIONS))} (or pass format= one of {READERS.choices()})"
        )
    return fmt


def open_reader(path: str | os.PathLike[str], format: str | None = None, *,
                allowed_dirs: Sequence[str | os.PathLike[str]] | None = None, **options: Any) -> VectorReader:
    """Open ``path`` with the reader for ``format`` (default: from the extension).

    ``path`` may be a folder: every file in it with the format's extensions (sorted by name) is read as
    one stream (:class:`ConcatReader`); ``format`` is then required unless all files share one known
    extension. ``options`` go to the reader (e.g. ``dataset="test"`` for HDF5, ``vector_column=`` /
    ``id_column=`` / ``payload_columns=`` for Parquet).

    ``allowed_dirs``: read a client's file for the server: the file (or folder, and each of its files) is
    opened once through :mod:`retrieval.server.sandbox` and must really lie inside one of these folders;
    symlinks (at the end of the path or in a folder listing) and hard-linked files are refused with
    PermissionDenied. The readers read from the files so opened.
    """
    if allowed_dirs is not None:
        return _open_confined(path, format, list(allowed_dirs), options)
    p = Path(path)
    if not p.exists():
        raise NotFound(f"input path {str(p)!r} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
        if format is None:
            fmts = {EXTENSIONS[f.suffix.lower()] for f in files}
            if len(fmts) > 1:
                raise InvalidArgument(
                    f"folder {str(p)!r} mixes formats {sorted(fmts)}; pass format= one of them"
                )
            if not fmts:
                raise InvalidArgument(
                    f"folder {str(p)!r} holds no file with a known extension ({', '.join(sorted(EXTENSIONS))})"
                )
            format = fmts.pop()
        cls = reader_class(format)
        files = [f for f in files if f.suffix.lower() in cls.extensions]
        readers: list[VectorReader] = []
        try:
            for f in files:
                readers.append(cls(f, **options))
        except Exception:
            for r in readers:
                r.close()
            raise
        return ConcatReader(readers, p)
    cls = reader_class(format if format is not None else format_for_path(p))
    try:
        return cls(p, **options)
    except TypeError as e:  # an option this reader does not take
        raise InvalidArgument(f"bad option for the {cls.format} reader of {str(p)!r}: {e}") from e


def _format_of_files(names: Sequence[str], folder: Path, format: str | None) -> str:
    if format is not None:
        return format
    fmts = {EXTENSIONS[Path(n).suffix.lower()] for n in names}
    if len(fmts) > 1:
        raise InvalidArgument(f"folder {str(folder)!r} mixes formats {sorted(fmts)}; pass format= one of them")
    if not fmts:
        raise InvalidArgument(
            f"folder {str(folder)!r} holds no file with a known extension ({', '.join(sorted(EXTENSIONS))})"
        )
    return fmts.pop()


def _open_confined(path: str | os.PathLike[str], format: str | None, allowed: list, options: dict) -> VectorReader:
    """:func:`open_reader` for a client's file: every file is opened by the sandbox, then read from."""
    from retrieval.server import sandbox

    p = Path(path)
    if sandbox.is_dir(p):
        with sandbox.open_dir(p, allowed, "input folder") as d:
            names = d.files(EXTENSIONS)
            cls = reader_class(_format_of_files(names, p, format))
            names = [n for n in names if Path(n).suffix.lower() in cls.extensions]
            readers: list[VectorReader] = []
            try:
                for n in names:
                    f = d.open(n, "input file")
                    try:
                        readers.append(cls(p / n, file=f, **options))
                    except TypeError as e:
                        _close_file(f)
                        raise InvalidArgument(f"bad option for the {cls.format} reader of {str(p)!r}: {e}") from e
                return ConcatReader(readers, p)
            except BaseException:
                for r in readers:
                    r.close()
                raise
    cls = reader_class(format if format is not None else format_for_path(p))
    f = sandbox.open_file(p, allowed, "input file")
    try:
        return cls(p, file=f, **options)
    except TypeError as e:  # an option this reader does not take
        _close_file(f)
        raise InvalidArgument(f"bad option for the {cls.format} reader of {str(p)!r}: {e}") from e


def read_vectors(path: str | os.PathLike[str], format: str | None = None, **options: Any) -> np.ndarray:
    """The whole file as one float32 ``(n, d)`` array (for query sets and tests; not for big bases)."""
    with open_reader(path, format, **options) as r:
        return r.read_all().vectors
