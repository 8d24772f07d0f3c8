"""Corpus datastore: a suffix array over the token ids of a corpus, memory-mapped, and its draft source.

Reference: Z. He, Z. Zhong, T. Cai, J. D. Lee, D. He, "REST: Retrieval-Based Speculative Decoding",
NAACL 2024. REST finds the longest suffix of the context that occurs in the datastore (a suffix array),
takes the continuations of its occurrences, counts them into a trie and keeps the most frequent
prefixes as a draft tree. Here the suffix array is built by prefix doubling (:mod:`kernels`), the
continuation rows of a sorted SA range come out lexicographically sorted so the trie counts are a
run-length pass, and when a suffix occurs more than ``max_matches`` times we take an evenly spaced
(stratified) sample of the sorted range and weight it back (REST caps the number of occurrences too).
Departures: the trie's nodes are scored as acceptance probabilities and merged with other sources
(:mod:`merge`) instead of REST's top-frequency selection.

On disk (``<root>/<name>/``): ``tokens.npy`` (documents joined and ended by the separator id
``sep = vocab_size``; uint16 when ``vocab_size < 65535`` else int32), ``sa.npy`` (int32, int64 past
2**31 tokens), ``offsets.npy`` (int64, ``vocab_size + 2``: the SA range of each first token) and
``manifest.json`` (name, vocab size, the tokenizer's vocabulary fingerprint, counts). Arrays are opened with
``np.load(mmap_mode="r")`` so a large datastore opens instantly and pages in on demand.

Building is a job body (:func:`build_datastore_job`): phase 1 tokenizes documents in chunks saved under
the job's work folder (a restarted job resumes after the last finished chunk), phase 2 sorts the
suffixes (progress per doubling round), phase 3 writes the folder atomically (temp folder, rename).

Thread-safety: an opened :class:`CorpusDatastore` is read-only and safe to share. The catalog holds a
lock around its cache; ``drop`` of a datastore in use by a session leaves that session's mapping valid
until it is closed (POSIX unlink semantics).
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from retrieval.drafting.base import Candidates, SourceCaps, TRIE_N_FEAT, continuation_candidates, register_source
from retrieval.drafting.kernels import (bucket_offsets, build_suffix_array, gather_continuations, gather_continuations_t,
                                        longest_suffix_match, sa_range)
from retrieval.drafting.tokenizer import Tokenizer
from retrieval.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from retrieval.storage import atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
INPUT_FORMATS = ("auto", "text", "lines", "jsonl", "json", "ids", "npy")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(f"datastore name {name!r} is not valid; expected 1-64 characters from "
                              "letters, digits, '_', '.', '-', starting with a letter or digit")
    return name


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when the separator (``vocab_size``) fits, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65535 else np.dtype(np.int32)


# --- reading inputs ------------------------------------------------------------------------------------

def _detect(path: Path) -> str:
    name = path.name.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".ids", "ids"), (".npy", "npy"), (".txt", "text")):
        if name.endswith(ext):
            return fmt
    return "text"


def _read_input(p: Path, allowed_dirs: list[str] | None, what: str = "input file") -> bytes:
    """The bytes of an input file; with ``allowed_dirs`` (a server job) it is opened once through
    :mod:`retrieval.server.sandbox` (no symlink followed, the opened file's real path inside the allowed
    folders, no hard links) and read from that descriptor, so a file swapped after the check is refused."""
    if allowed_dirs is None:
        if not p.is_file():
            raise NotFound(f"{what} {str(p)!r} does not exist")
        return p.read_bytes()
    from retrieval.server import sandbox

    with sandbox.open_file(p, allowed_dirs, what) as f:
        return f.read()


def _text(data: bytes, p: Path) -> str:
    """UTF-8 text with universal newlines (as ``Path.read_text``)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"input file {str(p)!r} is not UTF-8 text: {e}") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _confined_tokenizer(path: str, allowed_dirs: list[str], work_dir: Path) -> Path:
    """A server job's tokenizer file, read once through the sandbox and copied into the job's work folder
    (same file name), so the tokenizer libraries (which open names) read exactly what was checked."""
    p = Path(path)
    data = _read_input(p, allowed_dirs, "tokenizer file")
    copy = Path(work_dir) / "tokenizer" / p.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(data)  # a scratch copy in the job's own folder: no atomic write needed
    return copy


def iter_documents(inputs: list[str | Path], input_format: str = "auto",
                   text_fields: tuple[str, ...] = ("text",),
                   allowed_dirs: list[str] | None = None) -> Iterator[str | np.ndarray]:
    """Yield documents (``str``, or an int array for id formats) from the input files, in order.

    Formats: ``text`` (a file is one document), ``lines`` (each non-empty line is one), ``jsonl`` /
    ``json`` (one object per line / a JSON array of objects; the ``text_fields`` present are joined by a
    newline), ``ids`` (each line is one document of whitespace-separated ids), ``npy`` (a 1-D int array
    per file). ``auto`` picks by file suffix. ``allowed_dirs``: read each file through the sandbox
    (:func:`_read_input`), for files a client named.
    """
    if input_format not in INPUT_FORMATS:
        raise InvalidArgument(f"input_format={input_format!r} is not known; valid: {', '.join(INPUT_FORMATS)}")
    if not inputs:
        raise InvalidArgument("inputs is empty; give at least one file to build a datastore from")
    for p in map(Path, inputs):
        data = _read_input(p, allowed_dirs)
        fmt = _detect(p) if input_format == "auto" else input_format
        if fmt == "text":
            yield _text(data, p)
        elif fmt == "lines":
            for line in _text(data, p).splitlines():
                if line.strip():
                    yield line
        elif fmt in ("jsonl", "json"):
            try:
                if fmt == "jsonl":
                    objs = [json.loads(x) for x in _text(data, p).splitlines() if x.strip()]
                else:
                    objs = json.loads(_text(data, p))
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"input file {str(p)!r} is not valid {fmt}: {e}") from e
            if not isinstance(objs, list):
                raise InvalidArgument(f"input file {str(p)!r}: expected a JSON array of objects")
            for o in objs:
                if isinstance(o, str):
                    yield o
                    continue
                parts = [str(o[f]) for f in text_fields if isinstance(o, dict) and f in o]
                if parts:
                    yield "\n".join(parts)
        elif fmt == "ids":
            for ln, line in enumerate(_text(data, p).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    yield np.array([int(x) for x in line.split()], dtype=np.int64)
                except ValueError as e:
                    raise InvalidArgument(f"{str(p)!r} line {ln}: expected whitespace-separated token ids") from e
        elif fmt == "npy":
            try:
                a = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise InvalidArgument(f"{str(p)!r} cannot be read as .npy: {e}") from e
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise InvalidArgument(f"{str(p)!r}: expected a 1-D integer array of token ids, got "
                                      f"{a.dtype} with shape {a.shape}")
            yield a.astype(np.int64)


# --- the build job -------------------------------------------------------------------------------------

def build_datastore_job(ctx, *, root: str | Path, name: str, inputs: list[str], input_format: str = "auto",
                        tokenizer: str | None = None, vocab_size: int | None = None,
                        text_fields: tuple[str, ...] | list[str] = ("text",), chunk_docs: int = 512,
                        overwrite: bool = False, allowed_dirs: list[str] | None = None,
                        tokenizer_fingerprint: str | None = None) -> dict:
    """Job body: build datastore ``name`` under ``root`` from ``inputs``.

    ``allowed_dirs`` (set by the server, never by a client): the inputs and the tokenizer are files a
    client named; each is opened once through :mod:`retrieval.server.sandbox` and read from that open file.

    Text formats need ``tokenizer`` (a ``.model`` or ``.json`` path); id formats need ``vocab_size`` (or a
    tokenizer, whose vocabulary size is used). ``tokenizer_fingerprint``: the vocabulary fingerprint of the
    tokenizer that made id inputs (:func:`retrieval.drafting.tokenizer.tokenizer_fingerprint`), recorded so
    sessions naming another tokenizer are refused; with ``tokenizer`` it must equal that tokenizer's.
    Returns the manifest plus timings: ``tokenize_s``,
    ``sort_s``, ``tokens_per_s`` (corpus tokens over the whole build time).
    """
    check_name(name)
    root = Path(root)
    final = root / name
    if final.exists() and not overwrite:
        raise AlreadyExists(f"datastore {name!r} already exists in {str(root)!r}; drop it first or pass overwrite")
    if tokenizer and allowed_dirs is not None:
        tokenizer = str(_confined_tokenizer(tokenizer, allowed_dirs, Path(ctx.work_dir)))
    tok = Tokenizer(tokenizer) if tokenizer else None
    if tokenizer_fingerprint:
        from retrieval.drafting.tokenizer import check_fingerprint

        check_fingerprint(tokenizer_fingerprint)
        if tok is not None and tok.vocab_fingerprint != tokenizer_fingerprint:
            raise InvalidArgument(f"tokenizer_fingerprint={tokenizer_fingerprint} disagrees with the tokenizer file's "
                                  f"{tok.vocab_fingerprint}")
    if tok is not None:
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise InvalidArgument(f"vocab_size={vocab_size} disagrees with the tokenizer's {tok.vocab_size}")
        vocab_size = tok.vocab_size
    if vocab_size is None or not 1 <= int(vocab_size) < 2**31 - 1:
        raise InvalidArgument(f"vocab_size={vocab_size!r}: give a tokenizer or a vocab_size in [1, 2**31 - 2]")
    vocab_size = int(vocab_size)
    if chunk_docs < 1:
        raise InvalidArgument(f"chunk_docs={chunk_docs} must be >= 1")
    dtype = token_dtype(vocab_size)
    sep = vocab_size
    t0 = time.perf_counter()

    # phase 1: documents -> token chunks (resumable)
    docs = list(iter_documents(inputs, input_format, tuple(text_fields), allowed_dirs))
    if not docs:
        raise InvalidArgument("the inputs contain no documents")
    n_chunks = (len(docs) + chunk_docs - 1) // chunk_docs
    chunk_dir = Path(ctx.work_dir) / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    ctx.progress(0, len(docs), "tokenize")
    for ci in range(n_chunks):
        ctx.check_cancelled()
        path = chunk_dir / f"chunk_{ci:06d}.npy"
        if path.exists():
            ctx.progress(min((ci + 1) * chunk_docs, len(docs)), len(docs), "tokenize")
            continue
        part = docs[ci * chunk_docs:(ci + 1) * chunk_docs]
        texts = [d for d in part if isinstance(d, str)]
        if texts and tok is None:
            raise InvalidArgument("text inputs need a tokenizer (a SentencePiece .model or a tokenizers .json)")
        enc = iter(tok.encode_batch(texts)) if texts else iter(())
        pieces = []
        for d in part:
            ids = np.asarray(next(enc) if isinstance(d, str) else d, dtype=np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                bad = ids[(ids < 0) | (ids >= vocab_size)][0]
                raise InvalidArgument(f"token id {int(bad)} in the inputs is outside the vocabulary [0, {vocab_size})")
            pieces.append(ids.astype(dtype))
            pieces.append(np.array([sep], dtype=dtype))
        atomic.save_npy(path, np.concatenate(pieces))
        ctx.progress(min((ci + 1) * chunk_docs, len(docs)), len(docs), "tokenize")
    tokens = np.concatenate([np.load(chunk_dir / f"chunk_{ci:06d}.npy") for ci in range(n_chunks)])
    t_tok = time.perf_counter() - t0

    # phase 2: suffix sort
    ctx.check_cancelled()
    t1 = time.perf_counter()
    sa = build_suffix_array(tokens, progress=lambda r, R: ctx.progress(r, R, "suffix sort"),
                            check=ctx.check_cancelled)
    off = bucket_offsets(tokens, sa, vocab_size + 1)
    t_sort = time.perf_counter() - t1

    # phase 3: write atomically
    n_tokens = int(len(tokens) - len(docs))
    manifest = {
        "format_version": FORMAT_VERSION, "name": name, "vocab_size": vocab_size, "sep": sep,
        "token_dtype": str(dtype), "n_tokens": n_tokens, "n_docs": len(docs), "n_positions": int(len(tokens)),
        "tokenizer": tok.describe() if tok is not None else (
            {"kind": "declared", "vocab_size": vocab_size, "vocab_fingerprint": tokenizer_fingerprint}
            if tokenizer_fingerprint else None),
        "inputs": [Path(p).name for p in inputs], "created_at": time.time(),
    }
    root.mkdir(parents=True, exist_ok=True)
    tmpdir = root / f".{name}.tmp-{ctx.job_id}"
    if tmpdir.exists():
        shutil.rmtree(tmpdir)
    tmpdir.mkdir()
    np.save(tmpdir / "tokens.npy", tokens)
    np.save(tmpdir / "sa.npy", sa)
    np.save(tmpdir / "offsets.npy", off)
    (tmpdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    atomic.replace_dir(tmpdir, final)  # the old folder is renamed aside first: a crash loses neither
    total = time.perf_counter() - t0
    ctx.progress(1, 1, "done")
    logger.info("built datastore %s: %d tokens, %d docs in %.2fs", name, n_tokens, len(docs), total)
    return {**manifest, "path": str(final), "tokenize_s": t_tok, "sort_s": t_sort, "total_s": total,
            "tokens_per_s": n_tokens / max(total, 1e-9)}


# --- opening and searching -----------------------------------------------------------------------------

class CorpusDatastore:
    """An opened datastore (memory-mapped unless ``mmap=False``). Read-only, thread-safe."""

    def __init__(self, path: str | Path, mmap: bool = True) -> None:
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise NotFound(f"no datastore at {str(path)!r} (manifest.json missing)")
        self.path = path
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise FailedPrecondition(f"datastore {str(path)!r} has format {self.manifest.get('format_version')}, "
                                     f"this code reads {FORMAT_VERSION}")
        mode = "r" if mmap else None
        # plain ndarray views of the maps: indexing a np.memmap subclass is slower
        self.tokens = np.load(path / "tokens.npy", mmap_mode=mode).view(np.ndarray)
        self.sa = np.load(path / "sa.npy", mmap_mode=mode).view(np.ndarray)
        self.offsets = np.load(path / "offsets.npy", mmap_mode=mode).view(np.ndarray)
        self.name = self.manifest["name"]
        self.vocab_size = int(self.manifest["vocab_size"])
        self.sep = int(self.manifest["sep"])
        if len(self.sa) != len(self.tokens) or len(self.offsets) != self.vocab_size + 2:
            raise FailedPrecondition(f"datastore {str(path)!r} is inconsistent (array lengths do not match)")

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def fingerprint(self) -> str | None:
        """The vocabulary fingerprint of the tokenizer it was built with (None: built from ids without one,
        or by an older version that recorded only the tokenizer file's sha256)."""
        t = self.manifest.get("tokenizer")
        return (t.get("vocab_fingerprint") or None) if t else None

    def nbytes(self) -> int:
        """Bytes of the arrays (mapped, so resident only when touched)."""
        return int(self.tokens.nbytes + self.sa.nbytes + self.offsets.nbytes)

    def count(self, pattern) -> int:
        """Occurrences of ``pattern`` (a token id sequence) in the corpus."""
        lo, hi = sa_range(self.tokens, self.sa, self.offsets, pattern)
        return hi - lo

    def longest_match(self, ctx, max_len: int = 16, min_len: int = 1) -> tuple[int, int, int]:
        return longest_suffix_match(self.tokens, self.sa, self.offsets, ctx, max_len, min_len)

    def continuations(self, lo: int, hi: int, m: int, depth: int, max_matches: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of continuations of ``sa[lo:hi]`` after ``m`` matched tokens, and their weights.

        At most ``max_matches`` rows: an evenly spaced sample of the (sorted) range, each weighted
        ``(hi - lo) / rows``. Rows stay lexicographically sorted.
        """
        starts = sample_range(self.sa, lo, hi, max_matches) + m
        rows = gather_continuations(self.tokens, starts, depth, self.sep)
        return rows, np.full(len(starts), (hi - lo) / len(starts))


def sample_range(sa, lo: int, hi: int, max_matches: int) -> np.ndarray:
    """``sa[lo:hi]`` as int64 when it holds at most ``max_matches`` entries, else an evenly spaced sample
    of ``max_matches`` of them (a sorted range stays sorted)."""
    total = hi - lo
    if total <= max_matches:
        return sa[lo:hi].astype(np.int64)
    return sa[lo + (np.arange(max_matches, dtype=np.int64) * total) // max_matches].astype(np.int64)


def suffix_candidates(name: str, tokens, sa, off, sep, ctx, max_depth: int, max_match_len: int,
                      min_match_len: int, max_matches: int, levels: int, alpha: float) -> list[Candidates]:
    """Shared by the corpus and history sources: longest-suffix tries for ``levels`` match lengths."""
    out: list[Candidates] = []
    m, lo, hi = longest_suffix_match(tokens, sa, off, ctx, max_match_len, min_match_len)
    while m >= min_match_len and m > 0 and len(out) < levels:
        total = hi - lo
        starts = sample_range(sa, lo, hi, max_matches)
        k = len(starts)
        starts += m
        # the rows of a sorted SA range come out sorted; every row weighs total / k
        c = continuation_candidates(name, gather_continuations_t(tokens, starts, max_depth, sep), np.float64(total / k),
                                    True, float(total), m, alpha)
        if c is not None:
            out.append(c)
        m -= 1
        if m >= min_match_len and m > 0 and len(out) < levels:
            lo, hi = sa_range(tokens, sa, off, ctx[len(ctx) - m:])
    return out


@register_source("corpus")
class CorpusSource:
    """REST-style source over a :class:`CorpusDatastore`.

    Params: ``datastore`` (an opened datastore or a folder path), ``max_match_len`` (longest suffix tried,
    16), ``min_match_len`` (1), ``max_matches`` (occurrences sampled per lookup, 256), ``levels`` (match
    lengths used: the longest and ``levels - 1`` shorter ones, default 2: the next shorter suffix adds
    continuations the longest match lacks, +0.03 MAT on both halves of the dev data, issue 19).
    """

    name = "corpus"
    n_feat = TRIE_N_FEAT

    def __init__(self, datastore: CorpusDatastore | str | Path, max_match_len: int = 16, min_match_len: int = 1,
                 max_matches: int = 256, levels: int = 2, alpha: float = 1.0) -> None:
        self.ds = datastore if isinstance(datastore, CorpusDatastore) else CorpusDatastore(datastore)
        if not 1 <= min_match_len <= max_match_len <= 256:
            raise InvalidArgument(f"need 1 <= min_match_len <= max_match_len <= 256, got {min_match_len}, {max_match_len}")
        if max_matches < 1 or levels < 1:
            raise InvalidArgument(f"max_matches={max_matches} and levels={levels} must be >= 1")
        self.max_match_len, self.min_match_len = int(max_match_len), int(min_match_len)
        self.max_matches, self.levels, self.alpha = int(max_matches), int(levels), float(alpha)
        self.caps = SourceCaps(shared=True, learns_online=False, uses_model_topk=False, vocab_size=self.ds.vocab_size)

    def propose(self, ctx: np.ndarray, max_depth: int, max_nodes: int) -> list[Candidates]:
        ds = self.ds
        return suffix_candidates(self.name, ds.tokens, ds.sa, ds.offsets, ds.sep, ctx, max_depth,
                                 self.max_match_len, self.min_match_len, self.max_matches, self.levels, self.alpha)

    def observe(self, ctx, accepted, topk) -> None:
        return None

    def end_session(self, prompt_len, ctx) -> None:
        return None

    def nbytes(self) -> int:
        return self.ds.nbytes()


class DatastoreCatalog:
    """The datastores under one root folder: list, describe, open (cached), drop, build.

    Thread-safety: all methods may be called from any thread.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, tuple[tuple[int, int], CorpusDatastore]] = {}
        self._lock = threading.Lock()
        atomic.recover_all(self.root)  # finish or undo replacements and drops a crash interrupted
        for p in self.root.glob(".*.tmp-*"):  # build folders of jobs that died (a rerun starts its own)
            shutil.rmtree(p, ignore_errors=True)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file())

    def _path(self, name: str) -> Path:
        check_name(name)
        p = self.root / name
        if not (p / "manifest.json").is_file():
            raise NotFound(f"datastore {name!r} does not exist; existing: {', '.join(self.names()) or '(none)'}")
        return p

    def describe(self, name: str) -> dict:
        p = self._path(name)
        m = json.loads((p / "manifest.json").read_text())
        m["bytes_on_disk"] = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        return m

    def open(self, name: str) -> CorpusDatastore:
        """The opened datastore (cached; reopened when the folder was rebuilt since)."""
        p = self._path(name)
        stamp = (p / "manifest.json").stat()
        key = (stamp.st_ino, stamp.st_mtime_ns)
        with self._lock:
            hit = self._open.get(name)
            if hit is None or hit[0] != key:
                hit = (key, CorpusDatastore(p))
                self._open[name] = hit
            return hit[1]

    def drop(self, name: str) -> None:
        p = self._path(name)
        with self._lock:
            self._open.pop(name, None)
            atomic.remove_dir(p)

    def build(self, name: str, inputs: list[str], *, ctx=None, **params) -> dict:
        """Run :func:`build_datastore_job` here (a :class:`LocalJobContext` without a bar by default)."""
        if ctx is None:
            import tempfile

            from retrieval.jobs import LocalJobContext

            with tempfile.TemporaryDirectory() as wd:
                return build_datastore_job(LocalJobContext(Path(wd), show_progress=False), root=self.root,
                                           name=name, inputs=inputs, **params)
        return build_datastore_job(ctx, root=self.root, name=name, inputs=inputs, **params)
