"""The ``retrieval`` command line.

    retrieval serve [--config retrieval.yaml] [--host 127.0.0.1] [--port 50051] [--data-dir ./data]
    retrieval collections list|describe NAME|create NAME --dimension D ...|drop NAME [--address HOST:PORT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from retrieval.errors import RetrievalError

app = typer.Typer(help="A gRPC retrieval service: vector search, cross-encoder search, graphs, drafts.",
                  no_args_is_help=True, add_completion=False)
collections_app = typer.Typer(help="Manage vector collections on a running server.", no_args_is_help=True)
app.add_typer(collections_app, name="collections")

ADDRESS = typer.Option("127.0.0.1:50051", "--address", "-a", envvar="RETRIEVAL_ADDRESS",
                       help="server address host:port")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML settings file"),
    host: Optional[str] = typer.Option(None, help="address to listen on (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default 50051; 0 picks a free one)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where collections are stored (default ./data)"),
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING, ERROR"),
    access_log: Optional[bool] = typer.Option(None, "--access-log/--no-access-log", help="log every request"),
    durability: Optional[str] = typer.Option(None, help="FULL (survives power loss) or NORMAL (survives kill -9)"),
) -> None:
    """Start the server (runs until SIGTERM / Ctrl-C)."""
    from pydantic import ValidationError

    from retrieval.config import load_settings
    from retrieval.server.app import run

    try:
        settings = load_settings(config, host=host, port=port, data_dir=data_dir, log_level=log_level,
                                 access_log=access_log, durability=durability)
    except (ValidationError, FileNotFoundError) as e:
        _fail(e)
    try:
        run(settings)
    except RetrievalError as e:
        _fail(e)


def _client(address: str):
    from retrieval.client import Client

    return Client(address, timeout=30)


def _print(obj) -> None:
    def default(o):
        from retrieval.indexes import registry

        try:
            return registry.spec_to_dict(o)
        except Exception:
            return str(o)

    typer.echo(json.dumps(obj, indent=2, default=default))


@collections_app.command("list")
def collections_list(address: str = ADDRESS) -> None:
    """List collections with their sizes."""
    try:
        with _client(address) as c:
            cols = c.list_collections()
    except RetrievalError as e:
        _fail(e)
    if not cols:
        typer.echo("no collections")
    for col in cols:
        typer.echo(f"{col['name']}\tdim={col['dimension']}\tmetric={col['metric']}\tindex={col['index'].kind}\t"
                   f"points={col['points']}\tpending={col['pending']}\tstate={col['state']}")


@collections_app.command("describe")
def collections_describe(name: str, address: str = ADDRESS) -> None:
    """Everything the server knows about a collection, as JSON."""
    try:
        with _client(address) as c:
            _print(c.describe_collection(name))
    except RetrievalError as e:
        _fail(e)


@collections_app.command("create")
def collections_create(
    name: str,
    dimension: int = typer.Option(..., "--dimension", "-d"),
    metric: str = typer.Option("l2", help="l2, ip or cosine"),
    index: str = typer.Option("hnsw", help='hnsw, exact, or a JSON spec like \'{"type":"faiss","factory":"IVF256,PQ16"}\''),
    shards: int = typer.Option(1),
    address: str = ADDRESS,
) -> None:
    """Create a collection."""
    spec = json.loads(index) if index.strip().startswith("{") else index
    try:
        with _client(address) as c:
            _print(c.create_collection(name, dimension, metric, spec, shards))
    except RetrievalError as e:
        _fail(e)


@collections_app.command("drop")
def collections_drop(name: str, yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
                     address: str = ADDRESS) -> None:
    """Drop a collection and all its points."""
    if not yes and not typer.confirm(f"drop collection {name!r} and all its points?"):
        raise typer.Exit(1)
    try:
        with _client(address) as c:
            c.drop_collection(name)
    except RetrievalError as e:
        _fail(e)
    typer.echo(f"dropped {name}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
