"""What the graph store keeps beside a graph's versions: its node embeddings (FastRP) and its trained link
models, each in a folder under the graph (:class:`StoredOutputs`, a mixin of
:class:`retrieval.graph.store.GraphStore`, whose locks and atomic writes they use)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np

from retrieval.errors import InvalidArgument, NotFound
from retrieval.graph.names import check_name
from retrieval.storage import atomic


class StoredOutputs:
    """Methods of :class:`GraphStore` (see the module docstring); mixed into it, not used alone."""

    # ---- artifacts: embeddings and models -----------------------------------------------------
    def embeddings_dir(self, name: str) -> Path:
        p = self.path(name) / "embeddings"
        if not self.exists(name):
            raise NotFound(f"graph {name!r} does not exist (known graphs: {self.list()})")
        p.mkdir(exist_ok=True)
        return p

    def write_embedding_file(self, name: str, emb_name: str, emb: np.ndarray) -> str:
        """Write embeddings ``[n, d]`` to a new file (not yet in use); returns its file name.
        :meth:`commit_embeddings` makes it the current one."""
        check_name(emb_name, "embedding name")
        g = self.load(name)
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != g.n:
            raise InvalidArgument(f"embeddings must have shape ({g.n}, d), got {emb.shape}")
        fname = f"{emb_name}.{uuid.uuid4().hex[:12]}.npy"
        atomic.save_npy(self.embeddings_dir(name) / fname, emb)
        return fname

    def commit_embeddings(self, name: str, emb_name: str, fname: str, info: dict) -> dict:
        """Point embedding ``emb_name`` at ``fname`` (atomic: the JSON is the commit point) and delete
        the file it pointed at before. ``info`` is stored with it (e.g. the graph version, a collection)."""
        check_name(emb_name, "embedding name")
        with self._lock(name):
            d = self.embeddings_dir(name)
            arr = np.load(d / fname, mmap_mode="r", allow_pickle=False)
            old = None
            try:
                old = json.loads((d / f"{emb_name}.json").read_text()).get("file")
            except FileNotFoundError:
                pass
            meta = dict(info, name=emb_name, file=fname, n=int(arr.shape[0]), dim=int(arr.shape[1]),
                        written=time.time())
            del arr
            atomic.write_json(d / f"{emb_name}.json", meta, indent=1, sort_keys=True)
            if old and old != fname and (d / old).exists():
                (d / old).unlink()
            return meta

    def put_embeddings(self, name: str, emb_name: str, emb: np.ndarray, info: dict) -> dict:
        """Store node embeddings ``[n, d]`` float32 (e.g. with ``info['graph_version']``), replacing
        earlier ones of that name atomically."""
        with self._lock(name):
            return self.commit_embeddings(name, emb_name, self.write_embedding_file(name, emb_name, emb), info)

    def embedding_info(self, name: str, emb_name: str) -> dict:
        check_name(emb_name, "embedding name")
        try:
            return json.loads((self.path(name) / "embeddings" / f"{emb_name}.json").read_text())
        except FileNotFoundError:
            if not self.exists(name):
                raise NotFound(f"graph {name!r} does not exist (known graphs: {self.list()})") from None
            raise NotFound(f"graph {name!r} has no embeddings {emb_name!r} (known: {self.list_embeddings(name)})") from None

    def load_embeddings(self, name: str, emb_name: str, mmap: bool = False) -> tuple[np.ndarray, dict]:
        meta = self.embedding_info(name, emb_name)
        arr = np.load(self.path(name) / "embeddings" / meta.get("file", f"{emb_name}.npy"), allow_pickle=False,
                      mmap_mode="r" if mmap else None)
        return arr, meta

    def list_embeddings(self, name: str) -> list[str]:
        d = self.path(name) / "embeddings"
        return sorted(p.stem for p in d.glob("*.json")) if d.exists() else []

    def models_dir(self, name: str, model_name: str) -> Path:
        check_name(model_name, "model name")
        if not self.exists(name):
            raise NotFound(f"graph {name!r} does not exist (known graphs: {self.list()})")
        p = self.path(name) / "models" / model_name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def list_models(self, name: str) -> list[str]:
        d = self.path(name) / "models"
        return sorted(p.name for p in d.iterdir() if (p / "model.json").exists()) if d.exists() else []
