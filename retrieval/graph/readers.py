"""Graph file readers behind a registry by name.

=============  =====================================================================================
name           reads
=============  =====================================================================================
``edgelist``   text edge lists ``.txt`` / ``.csv`` / ``.tsv`` / ``.edges`` (optionally ``.gz``): one edge
               per line ``u v [w]``, separated by whitespace, comma or tab; CRLF; ``#`` / ``%`` comments;
               an optional header line; duplicate and reverse-duplicate rows; self-loops.
``mat``        MATLAB ``.mat`` (``scipy.io.loadmat``): adjacency under ``network`` (BlogCatalog) or
               ``net`` (SEAL link-prediction sets), multi-labels under ``group``.
``planetoid``  a Planetoid folder (Yang et al. 2016): the pickle-free ``derived/<name>_planetoid.npz``
               when present, else the ``ind.<name>.*`` pickles through an allow-list unpickler
               (numpy / scipy array types, ``defaultdict`` / ``list`` only).
``ogbl``       an OGB link-prediction folder (e.g. ``ogbl-ddi``): ``raw/edge.csv.gz`` (train graph),
               ``raw/num-node-list.csv.gz``, and the official split from ``derived/valid_test_edges.npz``
               or ``split/<kind>/{valid,test}.pt`` (legacy torch files, loaded with
               ``torch.load(weights_only=True)`` and only numpy array types allowed).
=============  =====================================================================================

Every reader returns a :class:`ReadResult` (the graph plus any official splits); malformed input raises
:class:`retrieval.errors.InvalidArgument` naming the file and, for text, the line.

Thread-safety: readers hold no state; any number may run at once.
"""

from __future__ import annotations

import gzip
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from retrieval.core.registry import Registry
from retrieval.errors import InvalidArgument, NotFound
from retrieval.graph.graph import Graph

logger = logging.getLogger(__name__)


@dataclass
class ReadResult:
    """A graph read from files. ``splits``: official splits when the format has them, e.g.
    ``{"valid": {"edge": [P,2], "edge_neg": [Q,2]}, "test": {...}}`` (OGB) or node index arrays
    ``{"train_index": ..., "val_index": ..., "test_index": ...}`` (Planetoid public split)."""

    graph: Graph
    splits: dict = field(default_factory=dict)
    source: str = ""
    info: dict = field(default_factory=dict)


@runtime_checkable
class GraphReader(Protocol):
    """One reader family. Capability fields say what the format can carry."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    provides_features: ClassVar[bool]
    provides_labels: ClassVar[bool]
    provides_splits: ClassVar[bool]

    def read(self, path: Path, **options) -> ReadResult: ...


# --------------------------------------------------------------------------------------------------
# edge lists
# --------------------------------------------------------------------------------------------------
class EdgeListReader:
    """Text edge lists. Options (all keyword):

    - ``directed`` (False): treat rows as arcs; otherwise ``u v`` and ``v u`` are one edge.
    - ``weighted`` ("auto"): use a third column as the weight; "auto" = when every row has 3 fields.
    - ``index_base`` ("auto"): 0 or 1; "auto" = 1 when the smallest id is >= 1, else 0 (SEAL files mix
      both; pass it explicitly when you know it).
    - ``num_nodes`` (None): node count; default ``max id + 1`` after rebasing.
    - ``self_loops`` (True): keep ``u u`` rows.
    - ``duplicates`` ("first"): which weight a repeated edge keeps (see :meth:`Graph.from_edges`).
    - ``delimiter`` (None): None splits on whitespace, commas and semicolons; ``"sniff"`` guesses one
      character from the first lines (:func:`sniff_delimiter`); any other string is used as given.
    - ``header`` (None): None skips a first line whose first two fields are not numbers; True always
      skips the first non-comment line; False skips nothing (a non-numeric line is an error).
    """

    name = "edgelist"
    suffixes = (".txt", ".csv", ".tsv", ".edges", ".el", ".txt.gz", ".csv.gz", ".tsv.gz", ".edges.gz")
    provides_features = False
    provides_labels = False
    provides_splits = False

    def read(self, path: Path, *, directed: bool = False, weighted="auto", index_base="auto", num_nodes=None,
             self_loops: bool = True, duplicates: str = "first", delimiter: str | None = None,
             header: bool | None = None) -> ReadResult:
        path = Path(path)
        text = _read_text(path)
        if delimiter == "sniff":
            delimiter = sniff_delimiter(text)
        u, v, w = parse_edge_text(text, str(path), weighted=weighted, delimiter=delimiter, header=header)
        n, u, v, base = _rebase(u, v, index_base, num_nodes, str(path))
        g = Graph.from_edges(n, u, v, w, directed=directed, weighted=w is not None, duplicates=duplicates,
                             self_loops=self_loops)
        return ReadResult(graph=g, source=str(path), info={"rows": int(u.shape[0]), "index_base": base,
                                                          "delimiter": delimiter})


SNIFF_DELIMITERS = ("\t", ",", ";", "|", " ")


def sniff_delimiter(text: str, lines: int = 50) -> str | None:
    """The field separator of edge-list text, guessed from its first ``lines`` data lines (comments and
    blank lines skipped): the first of tab, comma, semicolon, pipe that splits every sampled line into
    2 or 3 fields; None (split on any whitespace) when none does."""
    sample = []
    for line in text.splitlines():
        t = line.strip()
        if t and t[0] not in "#%":
            sample.append(t)
            if len(sample) >= lines:
                break
    if not sample:
        return None
    for d in SNIFF_DELIMITERS[:-1]:
        if all(len(t.split(d)) in (2, 3) for t in sample):
            return d
    return None


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"file {path} does not exist") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise InvalidArgument(f"{path}: not a valid gzip file ({e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path}: not UTF-8 text (byte {e.start})") from None


def parse_edge_text(text: str, source: str = "<text>", *, weighted="auto", delimiter: str | None = None,
                    header: bool | None = None):
    """Parse edge-list text into ``(u int64, v int64, w float64 | None)``. Raises InvalidArgument naming
    ``source`` and the 1-based line of the first malformed row. Ids are not yet rebased. ``header``: see
    :class:`EdgeListReader`."""
    lines = text.splitlines()  # handles \n, \r\n and \r
    rows: list[list[str]] = []
    line_no: list[int] = []
    header_done = False
    for i, line in enumerate(lines, start=1):
        s = line.strip()
        if not s or s[0] in "#%":
            continue
        parts = s.split(delimiter) if delimiter else s.replace(",", " ").replace(";", " ").split()
        parts = [p.strip() for p in parts if p.strip() != ""]
        if not header_done:
            header_done = True
            if header is True:
                continue
            if header is None and len(parts) >= 2 and not _looks_numeric(parts[0]) and not _looks_numeric(parts[1]):
                continue  # a header row such as "source,target,weight"
        rows.append(parts)
        line_no.append(i)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), None
    widths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    bad = np.flatnonzero((widths < 2) | (widths > 3))
    if bad.size:
        j = int(bad[0])
        raise InvalidArgument(f"{source} line {line_no[j]}: expected 2 or 3 fields (u v [weight]), "
                              f"got {len(rows[j])}: {' '.join(rows[j])!r}")
    if weighted == "auto":
        use_w = bool(np.all(widths == 3))
    else:
        use_w = bool(weighted)
        if use_w and np.any(widths < 3):
            j = int(np.flatnonzero(widths < 3)[0])
            raise InvalidArgument(f"{source} line {line_no[j]}: weighted=True needs a third (weight) column")
    u = _parse_ids([r[0] for r in rows], line_no, source, "source id")
    v = _parse_ids([r[1] for r in rows], line_no, source, "target id")
    w = None
    if use_w:
        try:
            w = np.array([r[2] for r in rows], dtype=np.float64)
        except ValueError:
            for j, r in enumerate(rows):
                try:
                    float(r[2])
                except ValueError:
                    raise InvalidArgument(f"{source} line {line_no[j]}: weight {r[2]!r} is not a number") from None
        badw = np.flatnonzero(~np.isfinite(w) | (w < 0))
        if badw.size:
            j = int(badw[0])
            raise InvalidArgument(f"{source} line {line_no[j]}: weight {rows[j][2]!r} must be finite and >= 0")
    return u, v, w


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _parse_ids(tokens: list[str], line_no: list[int], source: str, what: str) -> np.ndarray:
    try:
        arr = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        arr = None
    if arr is None:
        for j, t in enumerate(tokens):
            try:
                x = float(t)
                if x != int(x):
                    raise ValueError
                int(x)
            except (ValueError, OverflowError):
                raise InvalidArgument(f"{source} line {line_no[j]}: {what} {t!r} is not an integer") from None
        arr = np.array([int(float(t)) for t in tokens], dtype=np.int64)
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        j = int(neg[0])
        raise InvalidArgument(f"{source} line {line_no[j]}: {what} {tokens[j]!r} is negative")
    return arr


def _rebase(u: np.ndarray, v: np.ndarray, index_base, num_nodes, source: str):
    if u.size == 0:
        n = 0 if num_nodes is None else int(num_nodes)
        return n, u, v, 0 if index_base == "auto" else int(index_base)
    lo = int(min(u.min(), v.min()))
    if index_base == "auto":
        base = 1 if lo >= 1 else 0
    elif index_base in (0, 1):
        base = int(index_base)
    else:
        raise InvalidArgument(f"index_base must be 0, 1 or 'auto', got {index_base!r}")
    if lo < base:
        raise InvalidArgument(f"{source}: node id {lo} is below index_base={base}")
    u, v = u - base, v - base
    hi = int(max(u.max(), v.max()))
    n = hi + 1 if num_nodes is None else int(num_nodes)
    if n <= hi:
        raise InvalidArgument(f"{source}: node id {hi + base} is outside num_nodes={n} (index_base={base})")
    return n, u, v, base


# --------------------------------------------------------------------------------------------------
# MATLAB .mat
# --------------------------------------------------------------------------------------------------
class MatReader:
    """MATLAB v5 ``.mat`` files. Options: ``key`` (adjacency variable; default the first of ``network``,
    ``net``, ``A``, ``adj``), ``label_key`` (default ``group`` when present), ``directed`` (None = detect
    from symmetry), ``self_loops`` (True), ``weighted`` (None = detect)."""

    name = "mat"
    suffixes = (".mat",)
    provides_features = False
    provides_labels = True
    provides_splits = False

    ADJ_KEYS = ("network", "net", "A", "adj")

    def read(self, path: Path, *, key: str | None = None, label_key: str | None = None, directed: bool | None = None,
             self_loops: bool = True, weighted: bool | None = None) -> ReadResult:
        from scipy.io import loadmat

        path = Path(path)
        if not path.exists():
            raise NotFound(f"file {path} does not exist")
        try:
            mat = loadmat(str(path))
        except Exception as e:  # scipy raises several types for corrupt files
            raise InvalidArgument(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None
        names = [k for k in mat if not k.startswith("__")]
        if key is None:
            key = next((k for k in self.ADJ_KEYS if k in mat), None)
            if key is None:
                raise InvalidArgument(f"{path}: no adjacency variable among {list(self.ADJ_KEYS)}; variables: {names}")
        elif key not in mat:
            raise InvalidArgument(f"{path}: no variable {key!r}; variables: {names}")
        A = mat[key]
        if not (sp.issparse(A) or isinstance(A, np.ndarray)) or np.ndim(A) != 2 or A.shape[0] != A.shape[1]:
            raise InvalidArgument(f"{path}: variable {key!r} must be a square matrix, got {getattr(A, 'shape', type(A))}")
        if label_key is None and "group" in mat:
            label_key = "group"
        labels = None
        if label_key is not None:
            if label_key not in mat:
                raise InvalidArgument(f"{path}: no label variable {label_key!r}; variables: {names}")
            Y = sp.csr_matrix(mat[label_key])
            if Y.shape[0] != A.shape[0]:
                raise InvalidArgument(f"{path}: {label_key!r} has {Y.shape[0]} rows but the graph has {A.shape[0]} nodes")
            labels = (Y != 0).astype(np.int8)
        g = Graph.from_scipy(A, directed=directed, weighted=weighted, self_loops=self_loops, labels=labels)
        return ReadResult(graph=g, source=str(path), info={"key": key, "label_key": label_key})


# --------------------------------------------------------------------------------------------------
# Planetoid
# --------------------------------------------------------------------------------------------------
class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, scipy CSR matrices, lists and defaultdicts.

    Any other global (functions, classes, ``os.system`` ...) raises ``pickle.UnpicklingError``.
    Python-2 module paths are mapped to today's (``scipy.sparse.csr.csr_matrix`` -> ``scipy.sparse.csr_matrix``).
    """

    @staticmethod
    def _allowed() -> dict:
        import codecs
        import collections
        import copyreg

        try:
            from numpy._core.multiarray import _reconstruct, scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct, scalar  # type: ignore
        table = {
            ("collections", "defaultdict"): collections.defaultdict,
            ("__builtin__", "list"): list, ("builtins", "list"): list,
            ("__builtin__", "dict"): dict, ("builtins", "dict"): dict,
            ("__builtin__", "object"): object, ("builtins", "object"): object,
            ("copy_reg", "_reconstructor"): copyreg._reconstructor,
            ("copyreg", "_reconstructor"): copyreg._reconstructor,
            ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles written by Python 3 carry bytes
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy.core.multiarray", "scalar"): scalar,
            ("numpy._core.multiarray", "scalar"): scalar,
        }
        for mod in ("scipy.sparse.csr", "scipy.sparse._csr", "scipy.sparse"):
            table[(mod, "csr_matrix")] = sp.csr_matrix
        return table

    def find_class(self, module: str, name: str):
        obj = self._allowed().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")
        return obj


def safe_unpickle(path: Path):
    """Load a (Python 2 or 3) pickle with :class:`RestrictedUnpickler`; errors name the file."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise NotFound(f"file {path} does not exist") from None
    except pickle.UnpicklingError as e:
        raise InvalidArgument(f"{path}: refused to unpickle: {e}") from None
    except Exception as e:
        raise InvalidArgument(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


class PlanetoidReader:
    """Planetoid citation graphs (Cora, CiteSeer, PubMed) as PyG ``Planetoid`` builds them:
    undirected, self-loops and duplicates removed, features float32, labels int64 (-1 = no label).

    ``path``: the dataset folder (holding ``derived/`` and/or ``planetoid/``) or the ``planetoid/``
    folder itself. Options: ``dataset`` (e.g. "cora"; default: inferred from file names), ``prefer``
    ("npz" = the pickle-free derived file when present, or "pickle").
    """

    name = "planetoid"
    suffixes = ()
    provides_features = True
    provides_labels = True
    provides_splits = True

    PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph")

    def read(self, path: Path, *, dataset: str | None = None, prefer: str = "npz") -> ReadResult:
        path = Path(path)
        if prefer not in ("npz", "pickle"):
            raise InvalidArgument(f"prefer must be 'npz' or 'pickle', got {prefer!r}")
        if path.is_file() and path.suffix == ".npz":
            return self._read_npz(path)
        if not path.is_dir():
            raise NotFound(f"Planetoid folder {path} does not exist")
        pick_dir = path / "planetoid" if (path / "planetoid").is_dir() else path
        npz_dir = path / "derived"
        if dataset is None:
            found = sorted(pick_dir.glob("ind.*.graph")) or []
            if found:
                dataset = found[0].name.split(".")[1]
            else:
                npzs = sorted(npz_dir.glob("*_planetoid.npz")) if npz_dir.is_dir() else []
                if not npzs:
                    raise InvalidArgument(f"{path}: no ind.<name>.graph and no derived/<name>_planetoid.npz found")
                dataset = npzs[0].name[: -len("_planetoid.npz")]
        npz = npz_dir / f"{dataset}_planetoid.npz"
        if prefer == "npz" and npz.exists():
            return self._read_npz(npz)
        return self._read_pickles(pick_dir, dataset)

    def _read_npz(self, f: Path) -> ReadResult:
        try:
            z = np.load(f, allow_pickle=False)
        except Exception as e:
            raise InvalidArgument(f"{f}: not a readable pickle-free .npz ({type(e).__name__}: {e})") from None
        need = ["edge_index", "x_data", "x_indices", "x_indptr", "x_shape", "y"]
        missing = [k for k in need if k not in z.files]
        if missing:
            raise InvalidArgument(f"{f}: missing arrays {missing}")
        n = int(z["x_shape"][0])
        X = sp.csr_matrix((z["x_data"], z["x_indices"], z["x_indptr"]), shape=tuple(int(s) for s in z["x_shape"]))
        ei = z["edge_index"]
        g = Graph.from_edges(n, ei[0], ei[1], directed=False, self_loops=False, features=X, labels=z["y"])
        splits = {k: z[k].astype(np.int64) for k in ("train_index", "val_index", "test_index") if k in z.files}
        if "feature_mask" in z.files:
            splits["feature_mask"] = z["feature_mask"]
        return ReadResult(graph=g, splits=splits, source=str(f), info={"format": "npz"})

    def _read_pickles(self, d: Path, ds: str) -> ReadResult:
        obj = {p: safe_unpickle(d / f"ind.{ds}.{p}") for p in self.PARTS}
        for p in ("x", "tx", "allx"):
            if not sp.issparse(obj[p]) and not isinstance(obj[p], np.ndarray):
                raise InvalidArgument(f"{d / f'ind.{ds}.{p}'}: expected a matrix, got {type(obj[p]).__name__}")
            obj[p] = sp.csr_matrix(obj[p])
            obj[p].check_format(full_check=True)
        for p in ("y", "ty", "ally"):
            if not isinstance(obj[p], np.ndarray) or obj[p].ndim != 2:
                raise InvalidArgument(f"{d / f'ind.{ds}.{p}'}: expected a 2-D one-hot array")
        if not isinstance(obj["graph"], dict):
            raise InvalidArgument(f"{d / f'ind.{ds}.graph'}: expected a dict of adjacency lists")
        test_index_file = d / f"ind.{ds}.test.index"
        try:
            test_idx = np.array([int(s) for s in test_index_file.read_text().split()], dtype=np.int64)
        except FileNotFoundError:
            raise NotFound(f"file {test_index_file} does not exist") from None
        except ValueError:
            raise InvalidArgument(f"{test_index_file}: expected one integer node id per line") from None
        allx, ally, tx, ty = obj["allx"], obj["ally"], obj["tx"], obj["ty"]
        if tx.shape[0] != test_idx.shape[0] or ty.shape[0] != test_idx.shape[0]:
            raise InvalidArgument(f"{d}: tx/ty have {tx.shape[0]}/{ty.shape[0]} rows but test.index has {test_idx.shape[0]}")
        n_graph = max(int(max(obj["graph"].keys(), default=-1)) + 1,
                      max((max(v) + 1 for v in obj["graph"].values() if len(v)), default=0))
        n = max(allx.shape[0] + int(test_idx.max()) - int(test_idx.min()) + 1, n_graph, allx.shape[0] + tx.shape[0])
        f = allx.shape[1]
        # features / labels: rows 0..len(allx)-1 from allx, test rows at their test.index positions
        X = sp.lil_matrix((n, f), dtype=np.float32)
        X[: allx.shape[0]] = allx
        X[test_idx] = tx
        X = X.tocsr()
        y = np.full(n, -1, dtype=np.int64)
        lab_all = np.where(ally.sum(1) > 0, ally.argmax(1), -1)
        y[: ally.shape[0]] = lab_all
        lab_t = np.where(ty.sum(1) > 0, ty.argmax(1), -1)
        y[test_idx] = lab_t
        src, dst = [], []
        for u, nbrs in obj["graph"].items():
            for v in nbrs:
                src.append(int(u))
                dst.append(int(v))
        g = Graph.from_edges(n, np.array(src, np.int64), np.array(dst, np.int64), directed=False, self_loops=False,
                             features=X, labels=y)
        n_train = obj["y"].shape[0]
        splits = {"train_index": np.arange(n_train, dtype=np.int64),
                  "val_index": np.arange(n_train, n_train + 500, dtype=np.int64),
                  "test_index": np.sort(test_idx)}
        fm = np.zeros(n, bool)
        fm[: allx.shape[0]] = True
        fm[test_idx] = True
        splits["feature_mask"] = fm
        return ReadResult(graph=g, splits=splits, source=str(d), info={"format": "pickle", "dataset": ds})


# --------------------------------------------------------------------------------------------------
# OGB link prediction
# --------------------------------------------------------------------------------------------------
class OGBLinkReader:
    """OGB link-prediction folder (as released, e.g. ``ogbl-ddi``). The graph is the TRAIN graph
    (``raw/edge.csv.gz``, undirected); ``splits`` holds ``valid`` / ``test`` with ``edge`` and
    ``edge_neg`` int64 ``[P, 2]``. Option: ``split`` (split kind folder, default the only one present)."""

    name = "ogbl"
    suffixes = ()
    provides_features = False
    provides_labels = False
    provides_splits = True

    def read(self, path: Path, *, split: str | None = None, directed: bool = False) -> ReadResult:
        path = Path(path)
        edge_file = path / "raw" / "edge.csv.gz"
        if not edge_file.exists():
            edge_file = path / "raw" / "edge.csv"
        if not edge_file.exists():
            raise NotFound(f"{path}: no raw/edge.csv.gz (is this an OGB link-prediction folder?)")
        u, v, _ = parse_edge_text(_read_text(edge_file), str(edge_file), weighted=False)
        n = None
        nn_file = path / "raw" / "num-node-list.csv.gz"
        if nn_file.exists():
            try:
                n = int(_read_text(nn_file).split()[0])
            except (ValueError, IndexError):
                raise InvalidArgument(f"{nn_file}: expected the node count as its first value") from None
        n, u, v, _ = _rebase(u, v, 0, n, str(edge_file))
        g = Graph.from_edges(n, u, v, directed=directed, self_loops=True)
        splits = self._splits(path, split, n)
        return ReadResult(graph=g, splits=splits, source=str(path), info={"train_rows": int(u.shape[0])})

    def _splits(self, path: Path, split: str | None, n: int) -> dict:
        derived = path / "derived" / "valid_test_edges.npz"
        out: dict = {}
        if derived.exists():
            with np.load(derived, allow_pickle=False) as z:
                for part in ("valid", "test"):
                    out[part] = {k: z[f"{part}_{k}"].astype(np.int64) for k in ("edge", "edge_neg")
                                 if f"{part}_{k}" in z.files}
        else:
            sdir = path / "split"
            kinds = sorted(p.name for p in sdir.iterdir() if p.is_dir()) if sdir.is_dir() else []
            if not kinds:
                return {}
            kind = split or kinds[0]
            if kind not in kinds:
                raise InvalidArgument(f"{path}: split {kind!r} not found; available: {kinds}")
            for part in ("valid", "test"):
                f = sdir / kind / f"{part}.pt"
                if f.exists():
                    out[part] = load_torch_arrays(f)
        for part, d in out.items():
            for k, arr in d.items():
                arr = np.asarray(arr)
                if arr.ndim != 2 or arr.shape[1] != 2 or (arr.size and (arr.min() < 0 or arr.max() >= n)):
                    raise InvalidArgument(f"{path}: split {part}/{k} must be node pairs [P, 2] in [0, {n})")
                d[k] = arr.astype(np.int64)
        return out


def load_torch_arrays(path: Path) -> dict:
    """A ``torch.save``-d dict of numpy / torch arrays, loaded with ``weights_only=True`` and only the
    numpy globals needed for plain arrays allowed (no arbitrary code)."""
    import torch

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore
    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.int64)), type(np.dtype(np.float32)),
               type(np.dtype(np.float64)), type(np.dtype(np.int32))]
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NotFound(f"file {path} does not exist") from None
    except Exception as e:
        raise InvalidArgument(f"{path}: refused or failed to load ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{path}: expected a dict of arrays, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            v = v.numpy()
        if not isinstance(v, np.ndarray):
            raise InvalidArgument(f"{path}: entry {k!r} is {type(v).__name__}, expected an array")
        out[str(k)] = v
    return out


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------
READERS: Registry[GraphReader] = Registry("graph reader")
for _reader in (EdgeListReader(), MatReader(), PlanetoidReader(), OGBLinkReader()):
    READERS.register(_reader.name, _reader)


def get_reader(name: str) -> GraphReader:
    """The reader registered as ``name``; an unknown name lists the valid ones."""
    return READERS.get(name)


def register_reader(reader: GraphReader) -> None:
    if not isinstance(reader, GraphReader):
        raise InvalidArgument(f"{reader!r} does not implement the GraphReader protocol")
    READERS.unregister(reader.name)  # a reader registered again replaces the old one
    READERS.register(reader.name, reader)


def detect_format(path: Path) -> str:
    """Guess the reader for ``path`` from its suffix or folder layout."""
    path = Path(path)
    if path.is_dir():
        if (path / "raw" / "edge.csv.gz").exists() or (path / "raw" / "edge.csv").exists():
            return "ogbl"
        if list(path.glob("ind.*.graph")) or (path / "planetoid").is_dir() or list(path.glob("derived/*_planetoid.npz")):
            return "planetoid"
        raise InvalidArgument(f"{path}: cannot tell the graph format of this folder; pass format= one of {READERS.choices()}")
    name = path.name.lower()
    if name.endswith("_planetoid.npz"):
        return "planetoid"
    for r in READERS.values():
        if any(name.endswith(s) for s in r.suffixes):
            return r.name
    raise InvalidArgument(f"{path}: unknown file type; pass format= one of {READERS.choices()}")


def read_graph(path, format: str | None = None, **options) -> ReadResult:
    """Read ``path`` with the reader ``format`` (default: :func:`detect_format`)."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path} does not exist")
    fmt = format or detect_format(path)
    return get_reader(fmt).read(path, **options)


__all__ = ["READERS", "EdgeListReader", "GraphReader", "MatReader", "OGBLinkReader", "PlanetoidReader", "ReadResult",
           "RestrictedUnpickler", "detect_format", "get_reader", "load_torch_arrays", "parse_edge_text", "read_graph",
           "register_reader", "safe_unpickle", "sniff_delimiter"]

