"""The ``build_index`` job kind: an offline build run by the server, from files the server can read.

    client.start_job("build_index", input="/srv/imports/base.fvecs", collection="sift", index="hnsw",
                     shards=2, replace=False)

The job validates its parameters when it is started (a bad spec, an unknown format, an input outside
the folders clients may name, ``security.client_file_dirs`` (default ``<data_dir>/imports``), or an
existing collection without ``replace`` is refused at once), then runs :func:`index_builder.build.build_folder`
in its work folder ``<data_dir>/jobs/<id>/build`` with progress in points, and imports the result
with :meth:`retrieval.vectors.collection.CollectionManager.import_folder` (the folder is moved, not
copied). The input is read through :mod:`retrieval.server.sandbox` at start (the check) and again by
the build, shard tasks included: every file is opened once, without following a symlink, and its real
path checked against the allowed folders (recomputed from the settings when the job runs, so a resumed
job obeys the current ones); symlinks in a folder input and hard-linked files are refused. A file
replaced by a link after the start makes the job fail with PermissionDenied, reading nothing. It is
resumable: a server restarted during the build resumes it from its last finished
shard / checkpoint. Cancelling stops it between blocks. When the server runs on Ray (``--ray``), the
shard builds are Ray tasks.

Parameters (JSON): ``input`` (required), ``collection`` (required), ``format`` ("auto"), ``dimension``,
``metric``, ``index`` (a name or a spec object, as in Create), ``shards`` (1), ``block_size``,
``id_start``, ``train_sample``, ``seed``, ``reader_options`` (``dataset`` / ``vector_column`` /
``id_column`` / ``payload_columns``), ``replace`` (false), ``threads`` (0: all cores),
``checkpoint_s`` (300).

Result: the build's statistics (points, seconds, time per phase and per shard) and ``collection``, the
description of the imported collection (points, indexed, state).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path

from index_builder.build import BuildSpec, build_folder, parse_index_spec, resolve
from retrieval.errors import AlreadyExists, InvalidArgument, NotFound
from retrieval.indexes import registry
from retrieval.jobs.manager import JobKind

logger = logging.getLogger(__name__)

KIND = "build_index"
_SPEC_FIELDS = {f.name for f in dataclasses.fields(BuildSpec)}
_EXTRA = {"replace", "threads", "checkpoint_s"}
_READER_OPTIONS = {"dataset", "require", "vector_column", "id_column", "payload_columns"}


def build_index_kind(collections, settings, data_dir: Path) -> JobKind:
    """The job kind, bound to the server's collection manager and settings."""
    from retrieval.server.auth import allowed_client_dirs, resolve_client_file
    from retrieval.storage.names import validate_name

    def confine(params: dict) -> None:
        """Make the readers open the input through the sandbox (``reader_options.allowed_dirs``), with the
        folders the settings allow now; a client's own ``allowed_dirs`` is overwritten."""
        opts = params.get("reader_options") or {}
        if not isinstance(opts, dict):
            raise InvalidArgument(f"reader_options must be an object, got {type(opts).__name__}")
        unknown = sorted(set(opts) - _READER_OPTIONS - {"allowed_dirs"})
        if unknown:
            raise InvalidArgument(f"unknown reader_options {unknown}; valid: {', '.join(sorted(_READER_OPTIONS))}")
        params["reader_options"] = {**opts, "allowed_dirs": [str(d) for d in allowed_client_dirs(settings, data_dir)]}

    def validate(params: dict) -> dict:
        unknown = sorted(set(params) - _SPEC_FIELDS - _EXTRA)
        if unknown:
            raise InvalidArgument(f"unknown build_index parameters {unknown}; valid: "
                                  f"{', '.join(sorted(_SPEC_FIELDS | _EXTRA))}")
        for key in ("input", "collection"):
            if not params.get(key):
                raise InvalidArgument(f"build_index needs {key!r}")
        validate_name(params["collection"], "collection name")
        path = resolve_client_file(str(params["input"]), settings, data_dir, "input file")
        if not path.exists():
            raise NotFound(f"input file {str(path)!r} does not exist on the server")
        params["input"] = str(path)
        confine(params)
        params["index"] = registry.spec_to_dict(parse_index_spec(params.get("index", "hnsw")))
        params["replace"] = bool(params.get("replace", False))
        try:
            spec = BuildSpec(**{k: v for k, v in params.items() if k in _SPEC_FIELDS})
        except TypeError as e:
            raise InvalidArgument(f"bad build_index parameters: {e}") from None
        resolve(spec)  # opens the input: a wrong format, dimension or spec fails the start, not the job
        if not params["replace"]:
            try:
                collections.get(spec.collection)
            except NotFound:
                pass
            else:
                raise AlreadyExists(f"collection {spec.collection!r} already exists; pass replace=true to replace it")
        return params

    def body(ctx, **params) -> dict:
        replace = bool(params.pop("replace", False))
        threads = int(params.pop("threads", 0))
        checkpoint_s = float(params.pop("checkpoint_s", 300.0))
        confine(params)
        spec = BuildSpec(**params)
        ray = sys.modules.get("ray")
        use_ray = bool(ray is not None and ray.is_initialized())  # the server runs on Ray (--ray)
        work = Path(ctx.work_dir) / "build"
        stats = build_folder(ctx, spec, work, threads=threads, checkpoint_s=checkpoint_s, use_ray=use_ray)
        ctx.check_cancelled()
        ctx.progress(0, None, "importing")
        col = ctx.run_coroutine(collections.import_folder(work / "collection", spec.collection, replace, move=True))
        info = ctx.run_coroutine(col.describe())
        shutil.rmtree(work, ignore_errors=True)
        stats["collection"] = {k: info[k] for k in ("name", "points", "indexed", "pending", "state", "shards")}
        return stats

    return JobKind(KIND, body=body, validate=validate, resumable=True,
                   description="build a vector collection offline from files the server can read and import it")
