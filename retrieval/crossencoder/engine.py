"""The server-side state of the CrossEncoder service: named indexes under one folder.

Layout under ``root`` (the server's ``<data_dir>/crossencoder``)::

    indexes/<name>/          an index folder (see :mod:`retrieval.crossencoder.index`) plus
    indexes/<name>/service.json   the scorer and dual-encoder specs it was built with (to reopen it)
    staging/<job-id>.jsonl   items sent inline with a BuildIndex call, until the job has read them
    tmp/view-*/              while a model loads: the checked view of a client's model folder

Files a client names (``items_path``, a scorer's or dual encoder's ``model_dir``) are read through
:mod:`retrieval.server.sandbox` when the engine is given ``allowed_dirs`` (the server does): the items
file is opened once and parsed from that descriptor, a model folder is loaded from a
:func:`~retrieval.server.sandbox.folder_view` of it, so a file or folder swapped for a symlink after
``Jobs.Start`` (or after the build, when the model is loaded again) is refused, never followed.

Indexes are opened lazily (loading a model takes seconds) and kept open; scorers and dual encoders
are shared between indexes with the same spec. Building is the job kind ``crossencoder_build``
(resumable: a build interrupted by a restart resumes from its last finished chunk).

Thread-safety: every public method may be called from any thread (the servicer runs them in the
executor); the maps of open indexes and models are guarded by a lock, index operations by the
index's own locking.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from retrieval.crossencoder.build import build_index, read_items_jsonl
from retrieval.crossencoder.convert import REMOTE_DUAL_ENCODERS, REMOTE_SCORERS
from retrieval.crossencoder.dual import DualEncoder, dual_encoder_from_spec
from retrieval.crossencoder.index import BuildParams, CrossEncoderIndex, read_meta
from retrieval.crossencoder.scorers import Scorer, scorer_from_spec
from retrieval.errors import AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument, NotFound
from retrieval.storage import atomic

logger = logging.getLogger(__name__)

JOB_KIND = "crossencoder_build"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

def _spec_key(spec: dict[str, Any] | None) -> str:
    return json.dumps(spec, sort_keys=True)


class CrossEncoderEngine:
    def __init__(self, root: Path, allowed_dirs: Callable[[], Sequence[Path]] | None = None) -> None:
        """``allowed_dirs``: the folders clients may name files in (asked each time a file is read, so
        a resumed job obeys the current settings); None reads named files as given (local use)."""
        self.root = Path(root)
        self._allowed = allowed_dirs
        (self.root / "indexes").mkdir(parents=True, exist_ok=True)
        (self.root / "staging").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root / "tmp", ignore_errors=True)  # views left by a killed server
        self._lock = threading.RLock()
        self._open: dict[str, CrossEncoderIndex] = {}
        self._scorers: dict[str, Scorer] = {}
        self._des: dict[str, DualEncoder] = {}
        self._building: set[str] = set()

    # --- models -------------------------------------------------------------------------------------
    def _load_model(self, make: Callable[[dict[str, Any]], Any], spec: dict[str, Any], what: str) -> Any:
        """``make(spec)``; a client's ``model_dir`` is loaded from a checked view of it (see the module
        docstring), and the model's informational path is set back to the folder the client named."""
        model_dir = spec.get("model_dir")
        if self._allowed is None or not model_dir:
            return make(dict(spec))
        from retrieval.server import sandbox

        with sandbox.folder_view(model_dir, self._allowed(), self.root / "tmp", f"{what} model directory") as view:
            model = make({**spec, "model_dir": str(view)})
        if isinstance(getattr(model, "_path", None), str):  # fingerprint().path: where the model came from
            model._path = str(model_dir)
        return model

    def scorer(self, spec: dict[str, Any]) -> Scorer:
        key = _spec_key(spec)
        with self._lock:
            if key not in self._scorers:
                self._scorers[key] = self._load_model(scorer_from_spec, spec, "scorer")
            return self._scorers[key]

    def dual_encoder(self, spec: dict[str, Any] | None) -> DualEncoder | None:
        if not spec:
            return None
        key = _spec_key(spec)
        with self._lock:
            if key not in self._des:
                self._des[key] = self._load_model(dual_encoder_from_spec, spec, "dual_encoder")
            return self._des[key]

    def check_client_files(self, params: dict[str, Any]) -> None:
        """Open the client's files of a build (items file, model folders) through the sandbox and read
        nothing: a link or hard link is refused when the job starts, not later. No-op without
        ``allowed_dirs``."""
        if self._allowed is None:
            return
        from retrieval.server import sandbox

        allowed = self._allowed()
        for key in ("scorer", "dual_encoder"):
            spec = params.get(key)
            if isinstance(spec, dict) and spec.get("model_dir"):
                sandbox.check_dir(spec["model_dir"], allowed, f"{key} model directory")
        if params.get("items_path") and not params.get("staged"):
            sandbox.open_file(params["items_path"], allowed, "items file").close()

    def _items(self, items_path: str, staged: bool) -> list[dict[str, Any]] | str:
        """The build's items: a client's file read once through the sandbox (what was checked is what
        is read); the engine's own staged file by name."""
        if staged or self._allowed is None:
            return items_path
        from retrieval.server import sandbox

        with sandbox.open_file(items_path, self._allowed(), "items file") as f:
            return read_items_jsonl(f, items_path)

    # --- names --------------------------------------------------------------------------------------
    @staticmethod
    def check_name(name: Any) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(f"index name must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,63}}, got {name!r}")
        return name

    def path(self, name: str) -> Path:
        return self.root / "indexes" / self.check_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / "meta.json").is_file()

    # --- build (a job) ------------------------------------------------------------------------------
    def validate_build(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check a build's params cheaply (no model is loaded) before the job is accepted."""
        name = self.check_name(params.get("name"))
        if self.exists(name):
            raise AlreadyExists(f"cross-encoder index {name!r} already exists; drop it first or pick another name")
        with self._lock:
            if name in self._building:
                raise AlreadyExists(f"cross-encoder index {name!r} is already being built")
        spec = params.get("scorer")
        if not isinstance(spec, dict) or spec.get("name") not in REMOTE_SCORERS:
            raise InvalidArgument(f"scorer must be a spec with name one of {', '.join(REMOTE_SCORERS)}, got {spec!r}")
        for s, what in ((spec, "scorer"), (params.get("dual_encoder"), "dual_encoder")):
            if s and s.get("model_dir") and not Path(s["model_dir"]).is_dir():
                raise NotFound(f"{what} model directory {s['model_dir']!r} does not exist on the server")
        de = params.get("dual_encoder")
        if de is not None and (not isinstance(de, dict) or de.get("name") not in REMOTE_DUAL_ENCODERS):
            raise InvalidArgument(f"dual_encoder must be a spec with name one of {', '.join(REMOTE_DUAL_ENCODERS)}, got {de!r}")
        bp = BuildParams.from_any(params.get("params") or {})
        if bp.anchor_method == "kmeans-de" and de is None:
            raise InvalidArgument("anchor_method 'kmeans-de' needs a dual_encoder")
        items_path = params.get("items_path")
        if not items_path or not Path(items_path).is_file():
            raise InvalidArgument(f"items_path {items_path!r} is not a file on the server; send items or a readable path")
        if not params.get("anchor_queries") and not (params.get("query_log") and params.get("k_q")):
            raise InvalidArgument("give anchor_queries, or a query_log and k_q to sample them from")
        self.check_client_files(params)
        with self._lock:
            self._building.add(name)
        return params

    def build_body(self, ctx, *, name: str, scorer: dict[str, Any], items_path: str,
                   dual_encoder: dict[str, Any] | None = None, anchor_queries: list[str] | None = None,
                   query_log: list[str] | None = None, k_q: int | None = None, query_seed: int = 0,
                   params: dict[str, Any] | None = None, staged: bool = False) -> dict[str, Any]:
        """Job body of ``crossencoder_build``: the index goes to ``indexes/<name>``."""
        out = self.path(name)
        try:
            items = self._items(items_path, staged)
            sc = self.scorer(scorer)
            de = self.dual_encoder(dual_encoder)
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_json(out / "service.json", {"scorer": scorer, "dual_encoder": dual_encoder}, indent=None)
            stats = build_index(ctx, index_dir=out, items=items, scorer=sc, anchor_queries=anchor_queries,
                                query_log=query_log, k_q=k_q, dual_encoder=de, params=params or {},
                                query_seed=query_seed)
            if staged:
                Path(items_path).unlink(missing_ok=True)
            return {"index": name, **stats}
        except Cancelled:
            raise  # keep the staged items: a job stopped by a server shutdown resumes from them
        except Exception:
            if staged:
                Path(items_path).unlink(missing_ok=True)
            raise
        finally:
            with self._lock:
                self._building.discard(name)

    def stage_items(self, job_hint: str, items: list[dict[str, Any]]) -> str:
        """Write inline items to a staging JSONL file the job reads; returns its path."""
        p = self.root / "staging" / f"{job_hint}.jsonl"
        atomic.write_with(p, lambda f: f.writelines((json.dumps(it, ensure_ascii=False) + "\n").encode()
                                                    for it in items))
        return str(p)

    # --- open indexes -------------------------------------------------------------------------------
    def get(self, name: str) -> CrossEncoderIndex:
        self.check_name(name)
        with self._lock:
            idx = self._open.get(name)
            if idx is not None:
                return idx
            if name in self._building:
                raise FailedPrecondition(f"cross-encoder index {name!r} is still being built")
            p = self.path(name)
            if not (p / "meta.json").is_file():
                raise NotFound(f"cross-encoder index {name!r} does not exist")
            spec = self.spec(name)
            idx = CrossEncoderIndex.load(p, self.scorer(spec["scorer"]), self.dual_encoder(spec.get("dual_encoder")))
            self._open[name] = idx
            return idx

    def spec(self, name: str) -> dict[str, Any]:
        p = self.path(name) / "service.json"
        if not p.is_file():
            raise FailedPrecondition(f"cross-encoder index {name!r} has no service.json (not built by this server)")
        return json.loads(p.read_text())

    def names(self) -> list[str]:
        return sorted(p.name for p in (self.root / "indexes").iterdir()
                      if not p.name.startswith(".") and (p / "meta.json").is_file())

    def describe(self, name: str) -> dict[str, Any]:
        return self.get(name).describe()

    def drop(self, name: str) -> None:
        with self._lock:
            if name in self._building:
                raise FailedPrecondition(f"cross-encoder index {name!r} is being built; cancel its job first")
            p = self.path(name)
            if not p.exists():
                raise NotFound(f"cross-encoder index {name!r} does not exist")
            self._open.pop(name, None)
            atomic.remove_dir(p)

    def close(self) -> None:
        with self._lock:
            self._open.clear()

    def read_meta(self, name: str) -> dict[str, Any]:
        return read_meta(self.path(name))
