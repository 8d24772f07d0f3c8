"""Command line of the offline builders: ``python -m index_builder build | ground-truth``.

    python -m index_builder build --input base.fvecs --collection sift --index hnsw --shards 2 \\
        [--ray [ADDRESS]] (--data-dir ./data | --push 127.0.0.1:50051) [--replace]
    python -m index_builder ground-truth --base base.fvecs --queries query.fvecs --out gt.npy --k 100

``retrieval build`` is the same command (:func:`build_command`). Progress bars (rate, ETA) go to
stderr; the build's statistics are printed as JSON on stdout.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

from retrieval.errors import RetrievalError

app = typer.Typer(help="Offline builders: vector collections from files, exact ground truth.",
                  no_args_is_help=True, add_completion=False)


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _client_options(cli_ctx: typer.Context, api_key_file: Optional[Path], ca_file: Optional[Path]) -> dict:
    opts = {}
    conn = cli_ctx.find_root().obj  # `retrieval --api-key-file F build ...`: the root command's options
    if isinstance(conn, dict):
        opts.update({k: v for k, v in conn.items() if v is not None})
    if api_key_file is not None:
        opts["api_key_file"] = api_key_file
    if ca_file is not None:
        opts["root_certificates"] = ca_file
    return opts


def build_command(
    cli_ctx: typer.Context,
    input: Path = typer.Option(..., "--input", "-i", help="a file (.npy .fvecs .bvecs .ivecs .hdf5 .parquet) or a "
                               "folder of files of one format"),
    collection: str = typer.Option(..., "--collection", "-c", help="name of the collection to build"),
    format: str = typer.Option("auto", "--format", help="npy, fvecs, bvecs, ivecs, hdf5, parquet or auto "
                               "(from the extension)"),
    dimension: Optional[int] = typer.Option(None, "--dimension", "-d", help="expected dimension (default: the "
                                            "file's)"),
    metric: Optional[str] = typer.Option(None, "--metric", help="l2, ip or cosine (default: the HDF5 file's "
                                         "distance, else l2)"),
    index: str = typer.Option("hnsw", "--index", help='hnsw, exact, or a JSON spec like '
                              '\'{"type":"faiss","factory":"IVF256,PQ16"}\''),
    shards: int = typer.Option(1, "--shards", help="number of shards (ids routed as the server routes them)"),
    ray: Optional[str] = typer.Option(None, "--ray", help="build the shards as Ray tasks; give a cluster "
                                      "address, or --ray alone for a local Ray instance"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="install into this data folder (no server "
                                            "running on it)"),
    push: Optional[str] = typer.Option(None, "--push", help="import into the running server at HOST:PORT"),
    replace: bool = typer.Option(False, "--replace", help="replace an existing collection of that name"),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="build folder (resumable state); default "
                                            "DATA_DIR/builds/NAME, or ./builds/NAME with --push (must be "
                                            "readable by the server, inside its allowed folders)"),
    block_size: int = typer.Option(65536, "--block-size", help="rows read per block"),
    threads: int = typer.Option(0, "--threads", help="index threads per shard (0: all cores; 1 per Ray task)"),
    id_start: int = typer.Option(0, "--id-start", help="first id for files without ids (row r gets START + r)"),
    train_sample: int = typer.Option(0, "--train-sample", help="training sample per shard (0: 4 x what the "
                                     "index needs)"),
    seed: int = typer.Option(0, "--seed", help="seed of the training sample"),
    checkpoint_every: float = typer.Option(300.0, "--checkpoint-every", help="seconds between checkpoints "
                                           "inside a shard"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="HDF5: the dataset to read (default train)"),
    vector_column: Optional[str] = typer.Option(None, "--vector-column", help="Parquet: the vector column"),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Parquet: the id column (default 'id' when "
                                            "present; '' for generated ids)"),
    payload_columns: Optional[str] = typer.Option(None, "--payload-columns", help="Parquet: comma-separated "
                                                  "payload columns (default: all others; '' for none)"),
    keep_work: bool = typer.Option(False, "--keep-work", help="keep the build folder after installing"),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", envvar="RETRIEVAL_API_KEY_FILE",
                                                help="--push: file holding the server's API key"),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", envvar="RETRIEVAL_CA_FILE",
                                           help="--push: PEM CA of the server's certificate"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Build a vector collection from files, offline, and install it into a data folder or a running server."""
    from index_builder.build import BuildSpec, build, remove_scratch, scratch_dir
    from retrieval.jobs import LocalJobContext

    logging.basicConfig(level=logging.INFO if not quiet else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts: dict = {}
    if dataset is not None:
        opts["dataset"] = dataset
    if vector_column is not None:
        opts["vector_column"] = vector_column
    if id_column is not None:
        opts["id_column"] = id_column or None
    if payload_columns is not None:
        opts["payload_columns"] = [c for c in payload_columns.split(",") if c]
    spec = BuildSpec(input=str(input), collection=collection, format=format, dimension=dimension, metric=metric,
                     index=index, shards=shards, block_size=block_size, id_start=id_start,
                     train_sample=train_sample, seed=seed, reader_options=opts)
    try:
        from retrieval.storage.names import validate_name

        validate_name(collection, "collection name")
        tmp = scratch_dir(collection, data_dir, work_dir)  # inside the work folder, not /tmp
        ctx = LocalJobContext(tmp, job_id=f"build {collection}", show_progress=not quiet)
        try:
            out = build(ctx, spec, data_dir=data_dir, push=push, work_dir=work_dir, replace=replace, threads=threads,
                        checkpoint_s=checkpoint_every, use_ray=ray is not None,
                        ray_address=None if ray in (None, "local") else ray, keep_work=keep_work,
                        client_options=_client_options(cli_ctx, api_key_file, ca_file))
        finally:
            ctx.close()
            remove_scratch(tmp)
    except RetrievalError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.secho("interrupted; run the same command again to resume", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130)
    typer.echo(json.dumps(out, indent=1, default=str))


def ground_truth_command(
    base: Path = typer.Option(..., "--base", help="base vectors (any input format; HDF5: 'train')"),
    queries: Path = typer.Option(..., "--queries", help="query vectors (HDF5: 'test'; may be the base file)"),
    out: Path = typer.Option(..., "--out", help="output: .npy (ids; distances beside it) or .hdf5"),
    k: int = typer.Option(100, "--k", help="neighbours per query"),
    metric: str = typer.Option("l2", "--metric", help="l2, ip or cosine"),
    base_format: Optional[str] = typer.Option(None, "--base-format"),
    queries_format: Optional[str] = typer.Option(None, "--queries-format"),
    block_size: int = typer.Option(65536, "--block-size", help="base rows per block"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda when present)"),
    include_train: bool = typer.Option(False, "--include-train", help="HDF5 output: copy the base as 'train'"),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="checkpoint folder (default OUT.work)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Exact k-NN of the queries in the base, streamed in blocks (GPU when present), resumable."""
    from index_builder.ground_truth import ground_truth_job
    from retrieval.jobs import LocalJobContext

    wd = work_dir or out.with_name(out.name + ".work")
    ctx = LocalJobContext(wd, job_id="ground truth", show_progress=not quiet)
    try:
        res = ground_truth_job(ctx, base=str(base), queries=str(queries), out=str(out), k=k, metric=metric,
                               base_format=base_format, queries_format=queries_format, block_size=block_size,
                               device=device, include_train=include_train)
    except RetrievalError as e:
        _fail(e)
    finally:
        ctx.close()
    shutil.rmtree(wd, ignore_errors=True)
    typer.echo(json.dumps(res, indent=1))


app.command("build")(build_command)
app.command("ground-truth")(ground_truth_command)


def main(argv: list[str] | None = None) -> None:
    from retrieval.cli import argv_with_ray_default

    args = argv_with_ray_default(sys.argv[1:] if argv is None else argv)
    app(args=args, prog_name="python -m index_builder")
