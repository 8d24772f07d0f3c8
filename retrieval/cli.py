"""The ``retrieval`` command line.

    retrieval serve [--config retrieval.yaml] [--host 127.0.0.1] [--port 50051] [--data-dir ./data]
                    [--api-keys-file F] [--tls-cert F --tls-key F [--tls-client-ca F]] [--metrics-port P]
    retrieval [CONNECTION OPTIONS] status [--address HOST:PORT] [--metrics-url URL] [--json]
    retrieval [CONNECTION OPTIONS] collections list|describe NAME|create NAME --dimension D ...|drop NAME
    retrieval [CONNECTION OPTIONS] collections repair NAME [--index SPEC]   (a quarantined / unavailable one)
    retrieval [CONNECTION OPTIONS] collections index create|drop|list COLLECTION [KEY --type TYPE]
    retrieval build --input F --collection NAME [--index SPEC] [--shards N] [--ray [ADDRESS]]
                    (--data-dir DIR | --push HOST:PORT)        (see index_builder.cli)
    retrieval serve ... --ray ADDRESS                           (shards as Ray actors)
    retrieval --version
    retrieval [CONNECTION OPTIONS] points upsert NAME --vectors x.npy [--ids ids.npy | --start-id N]
                                   [--payloads p.jsonl]
    retrieval [CONNECTION OPTIONS] points get NAME ID... | count NAME [--filter JSON]
    retrieval [CONNECTION OPTIONS] points delete NAME (--ids 1,2 | --filter JSON)
    retrieval [CONNECTION OPTIONS] points scroll NAME [--limit N] [--filter JSON]          (JSON lines)
    retrieval [CONNECTION OPTIONS] search NAME (--vector 0.1,0.2,... | --vectors q.npy) [-k 10] [--ef N] [--filter JSON]
    retrieval [CONNECTION OPTIONS] jobs list|get ID|watch ID|cancel ID|kinds
    retrieval [CONNECTION OPTIONS] graphs list|describe|drop|create NAME
    retrieval [CONNECTION OPTIONS] graphs import NAME EDGES.csv [--delimiter D] [--header/--no-header] [--on-server]
    retrieval [CONNECTION OPTIONS] graphs fastrp|train NAME | similar|predict NAME NODE... [-k]
    retrieval [CONNECTION OPTIONS] graphs embeddings NAME OUT.npy [--embedding E] [--nodes 0,5,7]
    retrieval [CONNECTION OPTIONS] ce list|describe|drop|search ...      drafts list|describe|drop ...
    retrieval ground-truth --base xb.npy --queries xq.npy --out gt.npy --k 100   (see index_builder.cli)

Every client command takes ``--json`` where it prints a table; errors are one ``error: ...`` line on
stderr and exit status 1.

Connection options (before the command, or from the environment): ``--api-key-file`` /
``$RETRIEVAL_API_KEY_FILE`` or ``$RETRIEVAL_API_KEY`` (never a key on the command line), ``--ca-file``
(the server's CA; implies TLS), ``--tls``, ``--client-cert`` / ``--client-key`` (mutual TLS).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from retrieval.errors import InvalidArgument, RetrievalError

app = typer.Typer(help="A gRPC retrieval service: vector search, cross-encoder search, graphs, drafts.",
                  no_args_is_help=True, add_completion=False)
collections_app = typer.Typer(help="Manage vector collections on a running server.", no_args_is_help=True)
app.add_typer(collections_app, name="collections")

ADDRESS = typer.Option("127.0.0.1:50051", "--address", "-a", envvar="RETRIEVAL_ADDRESS",
                       help="server address host:port")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


#: Connection settings shared by the client commands (set by the main callback).
_CONN: dict = {}


def package_version() -> str:
    """The installed distribution's version (``retrieval-service``), or "unknown" when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retrieval-service")
    except PackageNotFoundError:
        return "unknown"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"retrieval {package_version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", envvar="RETRIEVAL_API_KEY_FILE",
                                                help="file holding the API key (or set $RETRIEVAL_API_KEY)"),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", envvar="RETRIEVAL_CA_FILE",
                                           help="PEM CA of the server's certificate (implies --tls)"),
    tls: bool = typer.Option(False, "--tls", envvar="RETRIEVAL_TLS", help="connect over TLS (system CAs)"),
    client_cert: Optional[Path] = typer.Option(None, "--client-cert", envvar="RETRIEVAL_CLIENT_CERT",
                                               help="PEM client certificate (mutual TLS)"),
    client_key: Optional[Path] = typer.Option(None, "--client-key", envvar="RETRIEVAL_CLIENT_KEY",
                                              help="PEM client private key (mutual TLS)"),
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="print the installed version and exit"),
) -> None:
    """A gRPC retrieval service: vector search, cross-encoder search, graphs, drafts."""
    ctx.obj = _CONN  # commands of plugins (retrieval build --push) connect with these options
    _CONN.update(api_key_file=api_key_file, root_certificates=ca_file, tls=tls or None,
                 client_cert=client_cert, client_key=client_key)


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML settings file"),
    host: Optional[str] = typer.Option(None, help="address to listen on (default 127.0.0.1; IPv6 "
                                       "literals as ::1 or [::1])"),
    port: Optional[int] = typer.Option(None, help="port (default 50051; 0 picks a free one)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where collections are stored (default ./data)"),
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING, ERROR"),
    access_log: Optional[bool] = typer.Option(None, "--access-log/--no-access-log", help="log every request"),
    durability: Optional[str] = typer.Option(None, help="FULL (survives power loss) or NORMAL (survives kill -9)"),
    log_format: Optional[str] = typer.Option(None, help="text or json (one JSON object per line)"),
    api_keys_file: Optional[Path] = typer.Option(None, "--api-keys-file",
                                                 help="file of API keys, one per line (or $RETRIEVAL_API_KEYS)"),
    read_only_keys_file: Optional[Path] = typer.Option(None, "--read-only-keys-file",
                                                       help="file of read-only API keys, one per line"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate chain (enables TLS)"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert"),
    tls_client_ca: Optional[Path] = typer.Option(None, "--tls-client-ca",
                                                 help="PEM CA: require client certificates it signed (mTLS)"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="serve Prometheus metrics on this port"),
    metrics_host: Optional[str] = typer.Option(None, "--metrics-host", help="address of the metrics endpoint "
                                               "(default 127.0.0.1)"),
    http_port: Optional[int] = typer.Option(None, "--http-port", help="serve the HTTP/JSON API and the web "
                                            "dashboard on this port (0 picks a free one; docs/http.md)"),
    ray: Optional[str] = typer.Option(None, "--ray", help="place collection shards as actors on the Ray cluster "
                                      "at this address ('local': start a local Ray instance)"),
) -> None:
    """Start the server (runs until SIGTERM / Ctrl-C). API keys come from files or the environment only."""
    import faulthandler

    from pydantic import ValidationError

    faulthandler.enable()  # a crash in native code (faiss, hnswlib, SQLite) leaves the Python stacks in the log

    from retrieval.config import load_settings
    from retrieval.server.app import run

    security = {k: v for k, v in dict(api_keys_file=api_keys_file, read_only_keys_file=read_only_keys_file,
                                      tls_cert_file=tls_cert, tls_key_file=tls_key,
                                      tls_client_ca_file=tls_client_ca).items() if v is not None}
    try:
        settings = load_settings(config, host=host, port=port, data_dir=data_dir, log_level=log_level,
                                 access_log=access_log, durability=durability, log_format=log_format,
                                 metrics_port=metrics_port, metrics_host=metrics_host, ray_address=ray,
                                 http_port=http_port)
        if security:
            settings = settings.model_copy(update={"security": settings.security.model_copy(update=security)})
    except (ValidationError, FileNotFoundError) as e:
        _fail(e)
    try:
        run(settings)
    except RetrievalError as e:
        _fail(e)


def _client(address: str, timeout: float = 30):
    from retrieval.client import Client

    return Client(address, timeout=timeout, **_CONN)


def _print(obj) -> None:
    def default(o):
        from retrieval.indexes import registry

        try:
            return registry.spec_to_dict(o)
        except Exception:
            return str(o)

    typer.echo(json.dumps(obj, indent=2, default=default))


def _histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Quantile from cumulative Prometheus buckets [(upper bound, count)], linear within a bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    target = q * buckets[-1][1]
    lo, prev = 0.0, 0.0
    for ub, cnt in buckets:
        if cnt >= target:
            if ub == float("inf"):
                return lo
            return lo + (ub - lo) * ((target - prev) / (cnt - prev) if cnt > prev else 1.0)
        lo, prev = ub, cnt
    return lo


def parse_metrics(text: str) -> dict:
    """Key figures from a Prometheus text page of this server: per RPC requests, errors, p50 / p99
    latency (seconds, since the server started), and backpressure rejections / in-flight gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    rpcs: dict[str, dict] = {}
    buckets: dict[str, list] = {}
    out: dict = {"rpcs": rpcs, "rejected": {}, "inflight": {}}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            lab = smp.labels
            key = f"{lab.get('service', '')}/{lab.get('method', '')}"
            if smp.name == "retrieval_requests_total":
                r = rpcs.setdefault(key, {"requests": 0, "errors": 0})
                r["requests"] += int(smp.value)
            elif smp.name == "retrieval_request_errors_total":
                r = rpcs.setdefault(key, {"requests": 0, "errors": 0})
                r["errors"] += int(smp.value)
            elif smp.name == "retrieval_request_duration_seconds_bucket":
                buckets.setdefault(key, []).append((float(lab["le"]), smp.value))
            elif smp.name == "retrieval_rejected_total":
                out["rejected"][lab.get("reason", "")] = int(smp.value)
            elif smp.name == "retrieval_inflight":
                out["inflight"][lab.get("kind", "")] = smp.value
    for key, b in buckets.items():
        r = rpcs.setdefault(key, {"requests": 0, "errors": 0})
        r["p50_ms"] = None if (v := _histogram_quantile(b, 0.5)) is None else round(v * 1e3, 3)
        r["p99_ms"] = None if (v := _histogram_quantile(b, 0.99)) is None else round(v * 1e3, 3)
    return out


def server_status(c, metrics_url: str | None = None) -> dict:
    """Health of every service, collections, jobs and (from ``metrics_url``) key metrics."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    out: dict = {"address": c.address}
    health = health_pb2_grpc.HealthStub(c._channel)
    try:
        out["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=c.timeout).status)
    except grpc.RpcError as e:
        out["health"] = f"unreachable ({e.code().name}: {e.details()})"
        return out
    services: dict[str, str] = {}
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(c._channel)
        reply = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=c.timeout)))
        names = [s.name for s in reply.list_services_response.service]
    except grpc.RpcError as e:
        names = []
        out["services_error"] = f"{e.code().name}: {e.details()}"
    for name in sorted(n for n in names if not n.startswith("grpc.")):
        try:
            st = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=c.timeout).status
            services[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(st)
        except grpc.RpcError as e:
            services[name] = e.code().name
    out["services"] = services
    try:
        out["collections"] = [{k: col[k] for k in ("name", "dimension", "metric", "shards", "points", "indexed",
                                                   "pending", "memory_bytes", "state", "reason")}
                              | {"index": col["index"].kind if col["index"] is not None else "?"}
                              for col in c.list_collections()]
    except RetrievalError as e:
        out["collections_error"] = str(e)
    try:
        jobs = c.list_jobs()
        by_state: dict[str, int] = {}
        for j in jobs:
            by_state[j["state"]] = by_state.get(j["state"], 0) + 1
        out["jobs"] = {"by_state": by_state, "active": [
            {k: j[k] for k in ("id", "kind", "state", "done", "total", "message")}
            for j in jobs if j["state"] in ("queued", "running")]}
    except RetrievalError as e:
        out["jobs_error"] = str(e)
    if metrics_url:
        import urllib.request

        try:
            ctx = None
            if metrics_url.startswith("https:"):  # the same CA as the gRPC connection (--ca-file)
                import ssl

                ca = _CONN.get("root_certificates")
                ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
            with urllib.request.urlopen(metrics_url, timeout=c.timeout, context=ctx) as r:
                out["metrics"] = parse_metrics(r.read().decode())
        except OSError as e:
            out["metrics_error"] = f"cannot read {metrics_url}: {e}"
    return out


def _print_status(st: dict) -> None:
    typer.echo(f"server {st['address']}: {st['health']}")
    for name, h in st.get("services", {}).items():
        typer.echo(f"  {name:<32} {h}")
    if "services_error" in st:
        typer.echo(f"  (service list unavailable: {st['services_error']})")
    if "collections" in st:
        cols = st["collections"]
        typer.echo(f"collections: {len(cols)}")
        if cols:
            typer.echo(f"  {'name':<24} {'dim':>5} {'metric':<6} {'index':<6} {'points':>10} {'pending':>8} "
                       f"{'memory':>10} state")
            for col in cols:
                typer.echo(f"  {col['name']:<24} {col['dimension']:>5} {col['metric']:<6} {col['index']:<6} "
                           f"{col['points']:>10} {col['pending']:>8} {col['memory_bytes'] / 2**20:>8.1f}Mi "
                           f"{col['state']}")
                if col.get("reason"):
                    typer.echo(f"    {col['state']}: {col['reason']}")
    elif "collections_error" in st:
        typer.echo(f"collections: {st['collections_error']}")
    if "jobs" in st:
        js = st["jobs"]
        summary = ", ".join(f"{n} {s}" for s, n in sorted(js["by_state"].items())) or "none"
        typer.echo(f"jobs: {summary}")
        for j in js["active"]:
            prog = f"{j['done']:.0f}/{j['total']:.0f}" if j["total"] else f"{j['done']:.0f}"
            typer.echo(f"  {j['id']} {j['kind']} {j['state']} {prog} {j['message']}")
    if "metrics" in st:
        m = st["metrics"]
        typer.echo("requests (since start):")
        typer.echo(f"  {'rpc':<56} {'calls':>9} {'errors':>7} {'p50 ms':>9} {'p99 ms':>9}")
        for key, r in sorted(m["rpcs"].items(), key=lambda kv: -kv[1]["requests"]):
            if not r["requests"]:
                continue
            typer.echo(f"  {key:<56} {r['requests']:>9} {r['errors']:>7} {r.get('p50_ms') or 0:>9.3f} "
                       f"{r.get('p99_ms') or 0:>9.3f}")
        if m["rejected"]:
            typer.echo("  rejected (backpressure): " + ", ".join(f"{k} {v}" for k, v in m["rejected"].items()))
        if m["inflight"]:
            typer.echo("  in flight: " + ", ".join(f"{k} {v:.0f}" for k, v in m["inflight"].items()))
    elif "metrics_error" in st:
        typer.echo(f"metrics: {st['metrics_error']}")


@app.command()
def status(
    address: str = ADDRESS,
    metrics_url: Optional[str] = typer.Option(None, "--metrics-url", envvar="RETRIEVAL_METRICS_URL",
                                              help="the server's metrics endpoint, e.g. http://127.0.0.1:9464/metrics"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Summary of a running server: health per service, collections, jobs and key metrics."""
    try:
        with _client(address, timeout=10) as c:
            st = server_status(c, metrics_url)
    except RetrievalError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
    else:
        _print_status(st)
    if st["health"] != "SERVING":
        raise typer.Exit(2)


@collections_app.command("list")
def collections_list(
    show_all: bool = typer.Option(False, "--all", help="also the server's internal collections (the FastRP "
                                  "collections of graphs, g-<graph>-<embedding>-<token>)"),
    address: str = ADDRESS,
) -> None:
    """List collections with their sizes."""
    try:
        with _client(address) as c:
            cols = c.list_collections(include_internal=show_all)
    except RetrievalError as e:
        _fail(e)
    if not cols:
        typer.echo("no collections")
    for col in cols:
        kind = col["index"].kind if col["index"] is not None else "?"
        line = (f"{col['name']}\tdim={col['dimension']}\tmetric={col['metric']}\tindex={kind}\t"
                f"points={col['points']}\tpending={col['pending']}\tstate={col['state']}")
        if col.get("reason"):
            line += f"\treason={col['reason']}"
        typer.echo(line)


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
    try:
        spec = json.loads(index) if index.strip().startswith("{") else index
    except json.JSONDecodeError as e:
        _fail(InvalidArgument(f"--index {index!r} is not valid JSON: {e}"))
    try:
        with _client(address) as c:
            _print(c.create_collection(name, dimension, metric, spec, shards))
    except RetrievalError as e:
        _fail(e)


@collections_app.command("repair")
def collections_repair(
    name: str,
    index: Optional[str] = typer.Option(None, help="a corrected index spec (as for create): the index is rebuilt "
                                        "from the stored points with it"),
    address: str = ADDRESS,
) -> None:
    """Open a quarantined or unavailable collection again (see its state and reason in describe)."""
    spec = None
    if index is not None:
        try:
            spec = json.loads(index) if index.strip().startswith("{") else index
        except json.JSONDecodeError as e:
            _fail(InvalidArgument(f"--index {index!r} is not valid JSON: {e}"))
    try:
        with _client(address, timeout=600) as c:
            _print(c.repair_collection(name, spec))
    except RetrievalError as e:
        _fail(e)


@collections_app.command("drop")
def collections_drop(name: str, yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
                     address: str = ADDRESS) -> None:
    """Drop a collection and all its points (a quarantined or unavailable one too)."""
    if not yes and not typer.confirm(f"drop collection {name!r} and all its points?"):
        raise typer.Exit(1)
    try:
        with _client(address) as c:
            c.drop_collection(name)
    except RetrievalError as e:
        _fail(e)
    typer.echo(f"dropped {name}")


index_app = typer.Typer(help="Payload indexes of a collection (filters on indexed keys skip the JSON scan).",
                        no_args_is_help=True)
collections_app.add_typer(index_app, name="index")


@index_app.command("create")
def index_create(collection: str, key: str,
                 type: str = typer.Option(..., "--type", "-t", help="keyword, integer, float, bool or datetime"),
                 address: str = ADDRESS) -> None:
    """Index payload KEY of COLLECTION (built from the stored points)."""
    try:
        with _client(address, timeout=600) as c:
            _print(c.create_payload_index(collection, key, type))
    except RetrievalError as e:
        _fail(e)


@index_app.command("drop")
def index_drop(collection: str, key: str, address: str = ADDRESS) -> None:
    """Drop the payload index on KEY."""
    try:
        with _client(address) as c:
            c.drop_payload_index(collection, key)
    except RetrievalError as e:
        _fail(e)
    typer.echo(f"dropped payload index {key} of {collection}")


@index_app.command("list")
def index_list(collection: str, address: str = ADDRESS) -> None:
    """Payload indexes of COLLECTION, one per line: key, type, indexed points."""
    try:
        with _client(address) as c:
            idx = c.list_payload_indexes(collection)
    except RetrievalError as e:
        _fail(e)
    if not idx:
        typer.echo("no payload indexes")
    for e in idx:
        typer.echo(f"{e['key']}\ttype={e['type']}\tpoints={e['points']}")


# --- shared helpers of the engine commands ----------------------------------------------------------
JSON_OUT = typer.Option(False, "--json", help="print JSON instead of a table")


class _BadInput(InvalidArgument):
    """A command-line argument or input file the CLI cannot use (reported like a server error)."""


@contextmanager
def _errors():
    """Turn server errors, unreadable input files and bad arguments into one ``error: ...`` line, exit 1;
    Ctrl-C into exit 130."""
    try:
        yield
    except RetrievalError as e:
        _fail(e)
    except OSError as e:
        _fail(e)
    except (ValueError, OverflowError) as e:  # a raw check of numpy / protobuf: still one line, no traceback
        _fail(e)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130)


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    try:
        from retrieval.indexes import registry

        return registry.spec_to_dict(o)
    except Exception:  # noqa: BLE001 - anything else prints as its str()
        return str(o)


def _dumps(obj, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=_jsonable)


def _table(rows: list[dict], cols: list[str], empty: str = "none") -> None:
    """Rows as an aligned text table (floats with 6 significant digits, dicts as compact JSON)."""
    if not rows:
        typer.echo(empty)
        return

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, (dict, list)):
            return json.dumps(v, separators=(",", ":"), default=_jsonable)
        return str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _json_option(value: str | None, flag: str, like: str = "") -> dict | None:
    """A ``--flag '{...}'`` option: a JSON object, or None when not given; else a one-line error
    (``like``: an example shown when the value is JSON but not an object)."""
    if value is None:
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        raise _BadInput(f"{flag} {value!r} is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise _BadInput(f"{flag} must be a JSON object{f' like {like}' if like else ''}, got {value!r}")
    return out


def _parse_filter(text: str | None) -> dict | None:
    """``--filter`` JSON (``{"must": [{"key": "color", "equals": "red"}]}``) -> dict, or a one-line error."""
    return _json_option(text, "--filter", like="'{\"must\": [...]}'")


def _load_npy(path: Path, what: str):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise _BadInput(f"{what} file {str(path)!r} does not exist") from None
    except (ValueError, OSError, EOFError) as e:
        raise _BadInput(f"{what} file {str(path)!r} is not a readable .npy array: {e}") from None


def _load_vectors(path: Path, what: str):
    import numpy as np

    x = _load_npy(path, what)
    if x.dtype.kind not in "fiu":
        raise _BadInput(f"{what} file {str(path)!r} holds {x.dtype} values; expected numbers")
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise _BadInput(f"{what} file {str(path)!r} has shape {x.shape}; expected (n, d)")
    return np.ascontiguousarray(x, np.float32)


def _parse_ids(values, what: str) -> list[int]:
    """Ids from arguments: integers, comma-separated lists of them, or one ``.npy`` file."""
    out: list[int] = []
    for v in values:
        v = str(v).strip()
        if v.endswith(".npy"):
            a = _load_npy(Path(v), what)
            if a.dtype.kind not in "iu" or a.ndim > 1:
                raise _BadInput(f"{what} file {v!r} must be a 1-D integer array, got {a.dtype} shape {a.shape}")
            out.extend(int(i) for i in a.ravel())
            continue
        for part in filter(None, (p.strip() for p in v.split(","))):
            try:
                i = int(part)
            except ValueError:
                raise _BadInput(f"{what}: {part!r} is not an integer id") from None
            if i < 0:
                raise _BadInput(f"{what}: ids are non-negative integers, got {i}")
            out.append(i)
    return out


def _read_payloads(path: Path) -> list:
    """A JSONL file: one JSON object (or ``null``) per line, blank lines skipped."""
    out: list = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise _BadInput(f"payloads file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise _BadInput(f"payloads file {str(path)!r} is not UTF-8 text: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError as e:
            raise _BadInput(f"payloads file {str(path)!r} line {n} is not valid JSON: {e}") from None
        if p is not None and not isinstance(p, dict):
            raise _BadInput(f"payloads file {str(path)!r} line {n}: expected a JSON object or null, "
                            f"got {type(p).__name__}")
        out.append(p)
    return out


def _bar(**kw):
    from tqdm import tqdm

    kw["disable"] = True if kw.get("disable") else None  # None: no bar when stderr is not a terminal
    return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)


# --- points -----------------------------------------------------------------------------------------
points_app = typer.Typer(help="Write, read, count, delete and scroll the points of a collection.",
                         no_args_is_help=True)
app.add_typer(points_app, name="points")


@points_app.command("upsert")
def points_upsert(
    name: str,
    vectors: Path = typer.Option(..., "--vectors", "-v", help=".npy float array (n, d)"),
    ids: Optional[Path] = typer.Option(None, "--ids", help=".npy integer array (n,) of ids"),
    start_id: Optional[int] = typer.Option(None, "--start-id", help="ids START, START+1, ... (default 0) when "
                                           "there is no --ids"),
    payloads: Optional[Path] = typer.Option(None, "--payloads", "-p", help="JSONL file: one JSON object (or null) "
                                            "per point, in row order"),
    batch_size: int = typer.Option(10_000, "--batch-size", help="points per message of the upload stream"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Insert or replace points from files; durable when it returns.

    Example: retrieval points upsert docs --vectors xb.npy --start-id 0 --payloads meta.jsonl
    """
    import numpy as np

    with _errors():
        if ids is not None and start_id is not None:
            raise _BadInput("give --ids or --start-id, not both")
        if batch_size < 1:
            raise _BadInput(f"--batch-size must be >= 1, got {batch_size}")
        xb = _load_vectors(vectors, "--vectors")
        n = len(xb)
        if ids is not None:
            id_arr = np.asarray(_parse_ids([str(ids)], "--ids"), np.uint64)
            if len(id_arr) != n:
                raise _BadInput(f"--ids has {len(id_arr)} ids but --vectors has {n} rows")
        else:
            s = start_id or 0
            if s < 0:
                raise _BadInput(f"--start-id must be >= 0, got {s}")
            id_arr = np.arange(s, s + n, dtype=np.uint64)
        pls = _read_payloads(payloads) if payloads is not None else None
        if pls is not None and len(pls) != n:
            raise _BadInput(f"--payloads has {len(pls)} lines but --vectors has {n} rows")
        bar = _bar(total=n, unit="pt", desc=f"upsert {name}", disable=quiet)

        def batches():
            for s0 in range(0, n, batch_size):
                b = (id_arr[s0:s0 + batch_size], xb[s0:s0 + batch_size])
                if pls is not None:
                    b = b + (pls[s0:s0 + batch_size],)
                yield b
                bar.update(len(b[0]))

        try:
            with _client(address) as c:
                count = c.upsert_stream(name, batches(), timeout=max(600.0, n / 1000))
        finally:
            bar.close()
    if as_json:
        typer.echo(_dumps({"collection": name, "upserted": count}))
    else:
        typer.echo(f"upserted {count} points into {name}")


def _point_rows(pts, with_vectors: bool) -> list[dict]:
    rows = []
    for i, pid in enumerate(pts.ids.tolist()):
        r: dict = {"id": int(pid)}
        if pts.payloads is not None:
            r["payload"] = pts.payloads[i]
        if with_vectors and pts.vectors is not None and len(pts.vectors):
            r["vector"] = pts.vectors[i].tolist()
        rows.append(r)
    return rows


@points_app.command("get")
def points_get(
    name: str,
    ids: list[str] = typer.Argument(..., help="ids (several, or comma-separated, or an ids .npy file)"),
    vectors: bool = typer.Option(False, "--vectors", help="include the vectors"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Points by id (ids that do not exist are left out).

    Example: retrieval points get docs 1 2 3 --vectors --json
    """
    with _errors():
        want = _parse_ids(ids, "ids")
        with _client(address) as c:
            pts = c.get(name, want, with_vectors=vectors, with_payloads=True)
    rows = _point_rows(pts, vectors)
    if as_json:
        typer.echo(_dumps(rows))
    else:
        for r in rows:
            if "vector" in r:
                v = r["vector"]
                r["vector"] = "[" + ", ".join(f"{x:.4g}" for x in v[:4]) + (", ...]" if len(v) > 4 else "]")
        _table(rows, ["id", "payload"] + (["vector"] if vectors else []), empty="no such points")


@points_app.command("count")
def points_count(
    name: str,
    filter: Optional[str] = typer.Option(None, "--filter", "-f", help='JSON filter, e.g. '
                                         '\'{"must": [{"key": "color", "equals": "red"}]}\''),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Number of points (matching --filter).

    Example: retrieval points count docs --filter '{"must": [{"key": "lang", "equals": "en"}]}'
    """
    with _errors():
        f = _parse_filter(filter)
        with _client(address) as c:
            n = c.count(name, f)
    typer.echo(_dumps({"collection": name, "count": n}) if as_json else str(n))


@points_app.command("delete")
def points_delete(
    name: str,
    ids: Optional[list[str]] = typer.Option(None, "--ids", help="ids to delete: '1,2,3' (repeatable) or an ids "
                                            ".npy file"),
    filter: Optional[str] = typer.Option(None, "--filter", "-f", help="delete the points matching this JSON filter"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Delete points by id or by filter (exactly one of them).

    Example: retrieval points delete docs --ids 1,2,3   |   retrieval points delete docs --filter '{...}'
    """
    with _errors():
        if (ids is None) == (filter is None):
            raise _BadInput("give exactly one of --ids or --filter")
        f = _parse_filter(filter)
        id_list = _parse_ids(ids, "--ids") if ids is not None else None
        with _client(address) as c:
            n = c.delete(name, ids=id_list, filter=f)
    typer.echo(_dumps({"collection": name, "deleted": n}) if as_json else f"deleted {n} points from {name}")


@points_app.command("scroll")
def points_scroll(
    name: str,
    limit: int = typer.Option(100, "--limit", "-n", help="at most this many points (0: all)"),
    start_id: Optional[int] = typer.Option(None, "--start-id", help="first id (default: the smallest)"),
    filter: Optional[str] = typer.Option(None, "--filter", "-f", help="only points matching this JSON filter"),
    vectors: bool = typer.Option(False, "--vectors", help="include the vectors"),
    page_size: int = typer.Option(1000, "--page-size", help="points per call"),
    address: str = ADDRESS,
) -> None:
    """Points in id order as JSON lines ``{"id", "payload"[, "vector"]}``.

    Example: retrieval points scroll docs --limit 0 > all.jsonl
    """
    with _errors():
        if limit < 0 or page_size < 1:
            raise _BadInput(f"--limit must be >= 0 and --page-size >= 1, got {limit} and {page_size}")
        f = _parse_filter(filter)
        left = limit or None
        with _client(address) as c:
            nxt = start_id
            while left is None or left > 0:
                pts = c.scroll(name, filter=f, start_id=nxt, limit=min(page_size, left or page_size),
                               with_vectors=vectors, with_payloads=True)
                for r in _point_rows(pts, vectors):
                    typer.echo(json.dumps(r, separators=(",", ":"), default=_jsonable))
                if left is not None:
                    left -= len(pts.ids)
                if pts.next_id is None or not len(pts.ids):
                    break
                nxt = pts.next_id


# --- search -----------------------------------------------------------------------------------------
def _parse_vector(text: str):
    import numpy as np

    try:
        v = [float(x) for x in text.replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise _BadInput(f"--vector must be comma-separated numbers like '0.1,0.2,0.3', got {text!r}") from None
    if not v:
        raise _BadInput("--vector is empty")
    return np.asarray(v, np.float32).reshape(1, -1)


@app.command("search")
def search_command(
    name: str,
    vector: Optional[str] = typer.Option(None, "--vector", help="one query: comma-separated numbers"),
    vectors: Optional[Path] = typer.Option(None, "--vectors", help=".npy query array (nq, d)"),
    k: int = typer.Option(10, "-k", "--k", help="neighbours per query"),
    ef: int = typer.Option(0, "--ef", help="HNSW search breadth (0: the collection's default)"),
    nprobe: int = typer.Option(0, "--nprobe", help="IVF lists probed (0: the collection's default)"),
    exact: bool = typer.Option(False, "--exact", help="brute force instead of the index"),
    filter: Optional[str] = typer.Option(None, "--filter", "-f", help="JSON filter on payloads"),
    payloads: bool = typer.Option(False, "--payloads", help="show the hits' payloads"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """k nearest neighbours of one or more query vectors: a table query/rank/id/distance(/payload), or JSON
    ``[{"query", "ids", "distances"[, "payloads"]}]``.

    Examples: retrieval search docs --vector 0.1,0.2,0.3,0.4 -k 5 --payloads
              retrieval search docs --vectors xq.npy -k 10 --filter '{"must": [{"key": "lang", "equals": "en"}]}' --json
    """
    with _errors():
        if (vector is None) == (vectors is None):
            raise _BadInput("give exactly one of --vector or --vectors")
        xq = _parse_vector(vector) if vector is not None else _load_vectors(vectors, "--vectors")
        f = _parse_filter(filter)
        results = []
        with _client(address) as c:
            for qi, q in enumerate(xq):
                h = c.search(name, q, k=k, ef=ef, nprobe=nprobe, exact=exact, filter=f, with_payloads=payloads)
                r = {"query": qi, "ids": h.ids.tolist(), "distances": h.distances.tolist()}
                if payloads:
                    r["payloads"] = h.payloads
                results.append(r)
    if as_json:
        typer.echo(_dumps(results))
        return
    rows = [{"query": r["query"], "rank": j + 1, "id": i, "distance": float(d),
             **({"payload": r["payloads"][j]} if payloads else {})}
            for r in results for j, (i, d) in enumerate(zip(r["ids"], r["distances"]))]
    cols = ["query", "rank", "id", "distance"] + (["payload"] if payloads else [])
    if len(results) == 1:
        cols.remove("query")
    _table(rows, cols, empty="no hits")


# --- jobs -------------------------------------------------------------------------------------------
jobs_app = typer.Typer(help="Long-running server jobs: list, inspect, watch (progress bar), cancel.",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

_JOB_FINAL = ("succeeded", "failed", "cancelled")


def _job_row(j: dict) -> dict:
    done, total = j.get("done") or 0, j.get("total")
    prog = f"{done:.0f}/{total:.0f}" if total else f"{done:.0f}"
    return {"id": j["id"], "kind": j["kind"], "state": j["state"], "progress": prog,
            "message": j.get("error") or j.get("message") or ""}


@jobs_app.command("list")
def jobs_list(
    kind: str = typer.Option("", "--kind", help="only jobs of this kind (see `retrieval jobs kinds`)"),
    state: str = typer.Option("", "--state", help="queued, running, succeeded, failed or cancelled"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """The server's jobs (one per line: id, kind, state, progress, message)."""
    with _errors(), _client(address) as c:
        jobs = c.list_jobs(kind, state)
    if as_json:
        typer.echo(_dumps(jobs))
    else:
        _table([_job_row(j) for j in jobs], ["id", "kind", "state", "progress", "message"], empty="no jobs")


@jobs_app.command("get")
def jobs_get(job_id: str, address: str = ADDRESS) -> None:
    """A job's record (state, progress, params, result, error) as JSON."""
    with _errors(), _client(address) as c:
        typer.echo(_dumps(c.get_job(job_id)))


@jobs_app.command("kinds")
def jobs_kinds(as_json: bool = JSON_OUT, address: str = ADDRESS) -> None:
    """The kinds of job this server runs."""
    with _errors(), _client(address) as c:
        kinds = c.job_kinds()
    if as_json:
        typer.echo(_dumps(kinds))
    else:
        _table(kinds, ["name", "resumable", "description"], empty="no job kinds")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, as_json: bool = JSON_OUT, address: str = ADDRESS) -> None:
    """Ask the server to cancel a job (it stops at its next checkpoint)."""
    with _errors(), _client(address) as c:
        j = c.cancel_job(job_id)
    if as_json:
        typer.echo(_dumps(j))
    else:
        typer.echo(f"{j['id']} {j['state']}" + ("" if j["state"] in _JOB_FINAL else
                                                " (cancel requested; `retrieval jobs watch ID` follows it)"))


def _watch(c, job_id: str, quiet: bool = False) -> dict:
    """Follow a job on the Jobs.Watch stream with a progress bar until it ends; its final record."""
    bar = _bar(desc=job_id, unit="", disable=quiet, total=None)
    last = None
    try:
        for j in c.watch_job(job_id, timeout=None):
            last = j
            if j.get("total"):
                bar.total = float(j["total"])
            bar.n = float(j.get("done") or 0)
            bar.set_description_str(f"{j['kind']} {j['state']}", refresh=False)
            if j.get("message"):
                bar.set_postfix_str(j["message"][:60], refresh=False)
            bar.refresh()
        while last is None or last["state"] not in _JOB_FINAL:  # a watch may end on a stale record
            last = c.get_job(job_id)
            if last["state"] not in _JOB_FINAL:
                time.sleep(0.1)
    except KeyboardInterrupt:
        bar.close()
        typer.secho(f"stopped watching; job {job_id} goes on (cancel it with `retrieval jobs cancel {job_id}`)",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130)
    finally:
        bar.close()
    return last


def _job_outcome(j: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(_dumps(j))
    else:
        from retrieval.cli_jobs import summary_lines

        typer.echo("\n".join(summary_lines(j)))
    if j["state"] != "succeeded":
        typer.secho(f"error: job {j['id']} {j['state']}" + (f": {j['error']}" if j.get("error") else ""),
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@jobs_app.command("watch")
def jobs_watch(job_id: str, quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
               as_json: bool = JSON_OUT, address: str = ADDRESS) -> None:
    """Draw a job's progress until it ends; exit 1 when it failed or was cancelled.

    Example: retrieval jobs watch 3f2a...   (Ctrl-C stops watching, not the job)
    """
    with _errors(), _client(address) as c:
        j = _watch(c, job_id, quiet)
    _job_outcome(j, as_json)


# --- graphs -----------------------------------------------------------------------------------------
graphs_app = typer.Typer(help="Graphs: create, import edge lists, FastRP similarity, link prediction.",
                         no_args_is_help=True)
app.add_typer(graphs_app, name="graphs")


def _graph_row(g: dict) -> dict:
    return {"name": g.get("name"), "nodes": g.get("n"), "edges": g.get("m"), "directed": g.get("directed"),
            "weighted": g.get("weighted"), "features": g.get("feature_dim") or 0,
            "embeddings": ",".join(g.get("embeddings") or []) or "-", "models": ",".join(g.get("models") or []) or "-"}


@graphs_app.command("list")
def graphs_list(as_json: bool = JSON_OUT, address: str = ADDRESS) -> None:
    """Graphs on the server: nodes, edges, embeddings and link models."""
    with _errors(), _client(address) as c:
        gs = c.list_graphs()
    if as_json:
        typer.echo(_dumps(gs))
    else:
        _table([_graph_row(g) for g in gs], ["name", "nodes", "edges", "directed", "weighted", "features",
                                             "embeddings", "models"], empty="no graphs")


@graphs_app.command("describe")
def graphs_describe(name: str, address: str = ADDRESS) -> None:
    """Everything the server knows about a graph, as JSON."""
    with _errors(), _client(address) as c:
        typer.echo(_dumps(c.describe_graph(name)))


@graphs_app.command("create")
def graphs_create(
    name: str,
    nodes: int = typer.Option(0, "--nodes", "-n", help="number of (isolated) nodes to start with"),
    directed: bool = typer.Option(False, "--directed", help="directed edges (default: undirected)"),
    weighted: bool = typer.Option(False, "--weighted", help="edges carry weights"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Create an empty graph.

    Example: retrieval graphs create cora --nodes 2708
    """
    with _errors(), _client(address) as c:
        g = c.create_graph(name, nodes, directed=directed, weighted=weighted)
    typer.echo(_dumps(g) if as_json else f"created graph {name} ({g.get('n')} nodes)")


def _drop(what: str, yes: bool, address: str, call, name: str) -> None:
    """Ask (unless ``yes``), run ``call(client)``, say what was dropped: the drop commands' one shape."""
    if not yes and not typer.confirm(f"drop {what}?"):
        raise typer.Exit(1)
    with _errors(), _client(address) as c:
        call(c)
    typer.echo(f"dropped {name}")


@graphs_app.command("drop")
def graphs_drop(name: str, yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
                address: str = ADDRESS) -> None:
    """Drop a graph with its embeddings and models."""
    _drop(f"graph {name!r}", yes, address, lambda c: c.drop_graph(name), name)


def read_edge_list(path: Path, delimiter: str | None = None, header: bool | None = None,
                   weighted: bool = False, format: str = "auto"):
    """An edge file -> ``(src, dst, weights or None)``: int64 ``(m,)`` node ids as written in the file
    (not rebased), float weights (third column, only when ``weighted``).

    Text edge lists (``.csv .tsv .txt .edges``, gzipped too) are parsed by
    :func:`retrieval.graph.readers.parse_edge_text`: ``delimiter`` None splits on whitespace, commas and
    semicolons; ``header`` None skips a first line whose first two fields are not numbers, True always
    skips the first line, False refuses a non-numeric one; ``#`` / ``%`` lines are comments. Other
    formats (``format`` or the suffix: ``mat``, ...) are read with :func:`retrieval.graph.readers.read_graph`
    and give each edge once. Raises :class:`InvalidArgument` naming the file and line."""
    import numpy as np

    from retrieval.graph import readers

    if not path.exists():
        raise _BadInput(f"edges file {str(path)!r} does not exist")
    fmt = readers.detect_format(path) if format == "auto" else format
    if fmt != "edgelist":
        g = readers.read_graph(path, fmt).graph
        src, dst, w = g.edges()
        return src.astype(np.int64), dst.astype(np.int64), (w if weighted else None)
    lines = readers._read_text(path).splitlines()
    for n, line in enumerate(lines):
        t = line.strip()
        if not t or t[0] in "#%":
            continue
        if header:
            lines[n] = ""  # keeps the line numbers of the errors
        elif header is False:
            parts = t.split(delimiter) if delimiter else t.replace(",", " ").replace(";", " ").split()
            if not all(p.strip().lstrip("+-").isdigit() for p in parts[:2]):
                raise _BadInput(f"edges file {str(path)!r} line {n + 1}: --no-header, but {t!r} is not "
                                "'src dst [weight]' with integer node ids")
        break
    src, dst, w = readers.parse_edge_text("\n".join(lines), f"edges file {str(path)!r}", weighted=bool(weighted),
                                          delimiter=delimiter)
    return src, dst, w


@graphs_app.command("import")
def graphs_import(
    name: str,
    edges_file: Path = typer.Argument(..., help="edge list: 'src dst [weight]' per line, CSV / TSV / spaces "
                                      "(gzipped too), or a MATLAB .mat adjacency"),
    delimiter: Optional[str] = typer.Option(None, "--delimiter", help="field separator (default: whitespace, "
                                            r"commas and semicolons; '\t' for tab)"),
    format: str = typer.Option("auto", "--format", help="edgelist (text), mat, ... (default: from the suffix)"),
    header: Optional[bool] = typer.Option(None, "--header/--no-header", help="the first line is a header "
                                          "(default: detected)"),
    directed: bool = typer.Option(False, "--directed", help="when the graph is created here: directed"),
    weighted: bool = typer.Option(False, "--weighted", help="when the graph is created here: read weights from the "
                                  "third column"),
    duplicates: str = typer.Option("", "--duplicates", help="what the server does with repeated edges "
                                   "(server default when empty)"),
    batch_size: int = typer.Option(100_000, "--batch-size", help="edges per append call (each stored atomically)"),
    on_server: bool = typer.Option(False, "--on-server", help="PATH is on the server (inside its allowed folders): "
                                   "the server reads it as a job (import_graph); also .mat with labels and "
                                   "Planetoid / OGB folders"),
    self_loops: str = typer.Option("", "--self-loops", help="drop | keep | reject (default: drop on undirected "
                                   "graphs, keep on directed ones)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Append the edges of a CSV / TSV edge list to graph NAME (created with enough nodes when it does not
    exist; grown with nodes when the file names higher ids).

    Example: retrieval graphs import karate karate.tsv --no-header
    Example: retrieval graphs import cora /data/cora --on-server   (features and labels too)
    """
    from retrieval.errors import NotFound

    if on_server:
        with _errors():
            if delimiter is not None:
                delimiter = {"\\t": "\t", "tab": "\t", "space": " "}.get(delimiter, delimiter)
            with _client(address) as c:
                j = c.import_graph(name, str(edges_file), format=format, delimiter=delimiter, header=header,
                                   directed=directed or None, weighted=weighted or None,
                                   self_loops=self_loops or None, duplicates=duplicates or None, detach=True)
                j = _watch(c, j["id"], quiet)
        _job_outcome(j, as_json)
        return
    with _errors():
        if batch_size < 1:
            raise _BadInput(f"--batch-size must be >= 1, got {batch_size}")
        if delimiter is not None:
            delimiter = {"\\t": "\t", "tab": "\t", "space": " "}.get(delimiter, delimiter)
        with _client(address) as c:
            try:
                info = c.describe_graph(name)
                created = False
            except NotFound:
                info, created = None, True
            is_weighted = bool(info["weighted"]) if info is not None else weighted
            src, dst, w = read_edge_list(edges_file, delimiter, header, is_weighted, format)
            need = int(max(src.max(initial=-1), dst.max(initial=-1))) + 1
            if info is None:
                info = c.create_graph(name, need, directed=directed, weighted=weighted)
            elif need > info["n"]:
                info = c.add_nodes(name, need - info["n"])
            m = len(src)
            res = {"received": 0, "added": 0}
            bar = _bar(total=m, unit="edge", desc=f"import {name}", disable=quiet)
            try:
                for s0 in range(0, max(m, 1), batch_size):
                    r = c.append_edges(name, src[s0:s0 + batch_size], dst[s0:s0 + batch_size],
                                       None if w is None else w[s0:s0 + batch_size], duplicates=duplicates,
                                       self_loops=self_loops)
                    res["received"] += r["received"]
                    res["added"] += r["added"]
                    bar.update(min(batch_size, m - s0))
            finally:
                bar.close()
            info = c.describe_graph(name)
    out = {"graph": name, "created": created, **res, "nodes": info["n"], "edges": info["m"]}
    if as_json:
        typer.echo(_dumps(out))
    else:
        typer.echo(f"{'created' if created else 'appended to'} graph {name}: {res['added']} of {res['received']} "
                   f"edges added; now {info['n']} nodes, {info['m']} edges")


@graphs_app.command("embeddings")
def graphs_embeddings(
    name: str,
    out: Path = typer.Argument(..., help="where to write the float32 [rows, d] array (.npy)"),
    embedding: str = typer.Option("fastrp", "--embedding", help="which embedding (see `graphs fastrp`)"),
    nodes: Optional[list[str]] = typer.Option(None, "--nodes", help="only these nodes, in this order: '0,5,7' "
                                              "or a .npy file (default: every node)"),
    address: str = ADDRESS,
) -> None:
    """Download stored node embeddings into a .npy file.

    Example: retrieval graphs fastrp karate --dim 32 && retrieval graphs embeddings karate karate.npy
    """
    import numpy as np

    with _errors():
        qs = _parse_ids(nodes, "--nodes") if nodes else None
        with _client(address) as c:
            X = c.get_embeddings(name, embedding, qs)
        try:
            np.save(out, X, allow_pickle=False)
        except OSError as e:
            raise _BadInput(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    typer.echo(f"wrote {X.shape[0]} x {X.shape[1]} float32 embeddings to {out}")


def _key_json_pairs(items: list[str], flag: str) -> dict:
    """``["a=1", "b=[2,3]"]`` -> ``{"a": 1, "b": [2, 3]}``; a value that is not JSON is taken as a string."""
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise _BadInput(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out[key.strip()] = value
    return out


@graphs_app.command("fastrp")
def graphs_fastrp(
    name: str,
    dim: int = typer.Option(128, "--dim", help="embedding dimension"),
    embedding: str = typer.Option("fastrp", "--embedding", help="name of the embedding"),
    use_features: bool = typer.Option(False, "--use-features", help="mix in the node features"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    tune: bool = typer.Option(False, "--tune", help="choose iteration weights, beta and propagation first, on the "
                              "graph's labels (else on held-out edges); the result shows the chosen params"),
    tune_option: Optional[list[str]] = typer.Option(
        None, "--tune-option", help="a tuner option as KEY=JSON, repeatable, e.g. --tune-option time_limit=10 "
        "--tune-option 'dims=[64,128]' (keys: dims, betas, max_power, time_limit, max_labeled, folds, val_pairs, "
        "dim_margin, search_dim, confirm, blas_threads); implies --tune"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Compute FastRP node embeddings (a job, watched to the end) for `graphs similar`."""
    params = {} if seed is None else {"seed": seed}
    with _errors():
        tune_options = _key_json_pairs(tune_option, "--tune-option") if tune_option else None
        if tune_options is not None:
            params.update(tune=True, tune_options=tune_options)
        elif tune:
            params["tune"] = True
    with _errors(), _client(address) as c:
        j = c.run_fastrp(name, dim, embedding=embedding, use_features=use_features, wait=False, **params)
        j = _watch(c, j["id"], quiet)
    _job_outcome(j, as_json)


@graphs_app.command("train")
def graphs_train(
    name: str,
    model: str = typer.Option("ncn", "--model", help="name of the stored link model"),
    preset: str = typer.Option("", "--preset", help="hyper-parameter preset: auto (default: chosen by the graph's "
                               "features, size and density, with early stopping), cora, citeseer, pubmed, ddi, gcn"),
    config: Optional[str] = typer.Option(None, "--config", help='JSON overrides, e.g. '
                                         '\'{"input": "learnable", "epochs": 20}\' (graphs without node features '
                                         "need input learnable or fastrp)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("", "--device", help="cpu, cuda, ... (server default)"),
    evaluate: str = typer.Option("", "--evaluate", help="holdout (default: 70/10/20 split, held-out edges masked "
                                 "when the model serves) or none (train on every edge, no metrics)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Train a link-prediction model (a job, watched to the end) for `graphs predict`."""
    with _errors():
        cfg = _json_option(config, "--config")
        with _client(address) as c:
            j = c.train_link_model(name, model=model, preset=preset, config=cfg, seed=seed, device=device,
                                   evaluate=evaluate, wait=False)
            j = _watch(c, j["id"], quiet)
    _job_outcome(j, as_json)


def _hits_out(nodes: list[int], hits, score: str, as_json: bool, plural: str | None = None) -> None:
    plural = plural or score + "s"
    res = [{"node": u, "ids": ids.tolist(), plural: s.tolist()} for u, (ids, s) in zip(nodes, hits)]
    if as_json:
        typer.echo(_dumps(res))
        return
    rows = [{"node": r["node"], "rank": j + 1, "id": i, score: float(d)}
            for r in res for j, (i, d) in enumerate(zip(r["ids"], r[plural]))]
    _table(rows, ["node", "rank", "id", score], empty="no hits")


@graphs_app.command("similar")
def graphs_similar(
    name: str,
    nodes: list[str] = typer.Argument(..., help="query node ids"),
    k: int = typer.Option(10, "-k", "--k"),
    embedding: str = typer.Option("fastrp", "--embedding", help="which embedding (see `graphs fastrp`)"),
    ef: int = typer.Option(0, "--ef"),
    exact: bool = typer.Option(False, "--exact", help="brute force instead of the index"),
    include_self: bool = typer.Option(False, "--include-self"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Nearest nodes by embedding (distance 1 - cosine).

    Example: retrieval graphs fastrp karate --dim 32 && retrieval graphs similar karate 0 5 -k 5
    """
    with _errors():
        qs = _parse_ids(nodes, "nodes")
        with _client(address) as c:
            hits = c.similar_nodes(name, qs, k=k, embedding=embedding, ef=ef, exact=exact, include_self=include_self)
    _hits_out(qs, hits, "distance", as_json)


@graphs_app.command("predict")
def graphs_predict(
    name: str,
    nodes: list[str] = typer.Argument(..., help="node ids to predict new neighbours for"),
    k: int = typer.Option(10, "-k", "--k"),
    model: str = typer.Option("ncn", "--model", help="which link model (see `graphs train`)"),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="only these nodes: '1,2,3' or a .npy file"),
    embedding: str = typer.Option("", "--embedding", help="candidates: nearest nodes in this embedding"),
    num_candidates: int = typer.Option(0, "--num-candidates", help="with --embedding: how many"),
    include_neighbors: bool = typer.Option(False, "--include-neighbors", help="existing neighbours may be returned"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Top-k predicted new neighbours per node with their link probabilities.

    Example: retrieval graphs train karate --config '{"epochs": 5}' && retrieval graphs predict karate 0 -k 5
    """
    with _errors():
        qs = _parse_ids(nodes, "nodes")
        cand = _parse_ids([candidates], "--candidates") if candidates is not None else None
        with _client(address) as c:
            hits = c.predict_links(name, qs, k=k, model=model, candidates=cand, embedding=embedding,
                                   num_candidates=num_candidates, include_neighbors=include_neighbors)
    _hits_out(qs, hits, "probability", as_json, "probabilities")


# --- cross-encoder indexes --------------------------------------------------------------------------
ce_app = typer.Typer(help="Cross-encoder k-NN indexes: build, list, describe, drop, search.", no_args_is_help=True)
app.add_typer(ce_app, name="ce")


def _read_items(path: Path) -> list[dict]:
    """Cross-encoder items from a local file: JSON Lines (one ``{"id", "text", "payload"?}`` per line) or
    one JSON array of them."""
    text = _read_text(path, "--items")
    try:
        if text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise _BadInput(f"--items {str(path)!r} is not JSON Lines or a JSON array of items: {e}") from None
    if not items or not all(isinstance(i, dict) for i in items):
        raise _BadInput(f"--items {str(path)!r} must hold objects {{\"id\", \"text\", \"payload\"?}}, one per line")
    return items


def _read_text(path: Path, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _BadInput(f"{flag} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _BadInput(f"{flag} {str(path)!r} cannot be read as UTF-8 text: {e}") from None


@ce_app.command("build")
def ce_build(
    name: str,
    items: Optional[Path] = typer.Option(None, "--items", help="local JSON Lines file of {\"id\", \"text\", "
                                         "\"payload\"?} (sent with the request)"),
    items_path: Optional[str] = typer.Option(None, "--items-path", help="the same file on the server (inside its "
                                             "allowed folders), for large corpora"),
    anchors: Path = typer.Option(..., "--anchor-queries", help="text file, one anchor query per line (the rows "
                                 "of the score matrix; a sample of real queries is best)"),
    scorer: str = typer.Option("minilm-joint", "--scorer", help="scorer name, or a JSON spec such as "
                               '\'{"name": "hf", "model_dir": "/models/ce", "device": "cpu"}\''),
    params: Optional[str] = typer.Option(None, "--params", help='build parameters as JSON, e.g. \'{"k_i": 100}\''),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Build a cross-encoder index (a job, watched to the end) for `ce search`.

    Example: retrieval ce build faq --items faq.jsonl --anchor-queries queries.txt --params '{"k_i": 50}'
    """
    with _errors():
        if (items is None) == (items_path is None):
            raise _BadInput("give exactly one of --items FILE (local) and --items-path PATH (on the server)")
        spec = _json_option(scorer, "--scorer") if scorer.lstrip().startswith("{") else {"name": scorer}
        queries = [q for q in _read_text(anchors, "--anchor-queries").splitlines() if q.strip()]
        rows = _read_items(items) if items is not None else None
        with _client(address) as c:
            j = c.build_ce_index(name, spec, items=rows, items_path=items_path, anchor_queries=queries,
                                 params=_json_option(params, "--params"), wait=False)
            j = _watch(c, j["id"], quiet)
    _job_outcome(j, as_json)


@ce_app.command("list")
def ce_list(as_json: bool = JSON_OUT, address: str = ADDRESS) -> None:
    """Cross-encoder indexes on the server."""
    with _errors(), _client(address) as c:
        idx = c.list_ce_indexes()
    if as_json:
        typer.echo(_dumps(idx))
    else:
        _table([{"name": i["name"], "items": i["n_items"], "k_q": i["k_q"], "k_i": i["k_i"],
                 "scorer": (i.get("scorer") or {}).get("name"), "modes": ",".join(i.get("modes") or [])}
                for i in idx], ["name", "items", "k_q", "k_i", "scorer", "modes"], empty="no cross-encoder indexes")


@ce_app.command("describe")
def ce_describe(name: str, address: str = ADDRESS) -> None:
    """Everything the server knows about a cross-encoder index, as JSON."""
    with _errors(), _client(address) as c:
        typer.echo(_dumps(c.describe_ce_index(name)))


@ce_app.command("drop")
def ce_drop(name: str, yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
            address: str = ADDRESS) -> None:
    """Drop a cross-encoder index."""
    _drop(f"cross-encoder index {name!r}", yes, address, lambda c: c.drop_ce_index(name), name)


@ce_app.command("search")
def ce_search(
    name: str,
    queries: list[str] = typer.Argument(..., help="query texts"),
    k: int = typer.Option(10, "-k", "--k"),
    mode: str = typer.Option("", "--mode", help="search mode (see `ce describe`: modes); server default"),
    budget: Optional[int] = typer.Option(None, "--budget", help="cross-encoder calls per query (server default)"),
    payloads: bool = typer.Option(False, "--payloads", help="show the items' payloads"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Top-k items per query text by exact cross-encoder score, within a budget of scorer calls.

    Example: retrieval ce search faq "how do I reset my password" -k 5 --budget 100
    """
    with _errors(), _client(address) as c:
        res = c.ce_search_batch(name, list(queries), k=k, mode=mode, budget=budget, with_payloads=payloads)
    if as_json:
        typer.echo(_dumps([{"query": q, **r} for q, r in zip(queries, res)]))
        return
    rows = []
    for q, r in zip(queries, res):
        for j, (i, s) in enumerate(zip(r["ids"].tolist(), r["scores"].tolist())):
            row = {"query": q, "rank": j + 1, "id": i, "score": float(s)}
            if payloads:
                row["payload"] = (r.get("payloads") or [None] * (j + 1))[j]
            rows.append(row)
    _table(rows, ["query", "rank", "id", "score"] + (["payload"] if payloads else []), empty="no hits")


# --- draft datastores -------------------------------------------------------------------------------
drafts_app = typer.Typer(help="Draft datastores (speculative decoding): build, list, describe, drop.",
                         no_args_is_help=True)
app.add_typer(drafts_app, name="drafts")


@drafts_app.command("build")
def drafts_build(
    name: str,
    inputs: list[str] = typer.Argument(..., help="files on the server (inside its allowed folders): text "
                                       "(.txt, .jsonl, .json) with --tokenizer, or token ids (.ids, .npy)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer file on the server (.model or "
                                            "tokenizer.json) for text inputs"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="for token-id inputs"),
    input_format: str = typer.Option("auto", "--format", help="auto (by suffix), text, lines, jsonl, json, ids, npy"),
    text_fields: Optional[str] = typer.Option(None, "--text-fields", help="jsonl/json: comma-separated fields "
                                              "holding the text"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a datastore of that name"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = JSON_OUT,
    address: str = ADDRESS,
) -> None:
    """Build a draft datastore (a job, watched to the end) that draft sessions look continuations up in.

    Example: retrieval drafts build chat /srv/imports/outputs.jsonl --tokenizer /srv/imports/tokenizer.model
    """
    with _errors(), _client(address) as c:
        fields = [f.strip() for f in text_fields.split(",") if f.strip()] if text_fields else None
        j = c.build_datastore(name, list(inputs), tokenizer=tokenizer, vocab_size=vocab_size,
                              input_format=input_format, text_fields=fields, overwrite=overwrite, wait=False)
        j = _watch(c, j["id"], quiet)
    _job_outcome(j, as_json)


@drafts_app.command("list")
def drafts_list(as_json: bool = JSON_OUT, address: str = ADDRESS) -> None:
    """Draft datastores on the server."""
    with _errors(), _client(address) as c:
        ds = c.list_datastores()
    if as_json:
        typer.echo(_dumps(ds))
    else:
        _table([{"name": d["name"], "tokens": d["n_tokens"], "docs": d["n_docs"], "vocab": d["vocab_size"],
                 "tokenizer": (d.get("tokenizer_fingerprint") or "-")[:25],  # what sessions must name
                 "MiB": round(d["bytes_on_disk"] / 2**20, 2)} for d in ds],
               ["name", "tokens", "docs", "vocab", "tokenizer", "MiB"], empty="no datastores")


@drafts_app.command("describe")
def drafts_describe(name: str, address: str = ADDRESS) -> None:
    """Everything the server knows about a datastore (its manifest), as JSON."""
    with _errors(), _client(address) as c:
        typer.echo(_dumps(c.describe_datastore(name)))


@drafts_app.command("drop")
def drafts_drop(name: str, yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
                address: str = ADDRESS) -> None:
    """Drop a draft datastore."""
    _drop(f"datastore {name!r}", yes, address, lambda c: c.drop_datastore(name), name)



from retrieval import plugins  # noqa: E402

plugins.add_commands(app)  # `retrieval build` and `retrieval ground-truth` (index_builder)


def argv_with_ray_default(argv: list[str]) -> list[str]:
    """``--ray`` given without an address means a local Ray instance: ``--ray`` -> ``--ray=local``."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--ray=local"
    return out


def main() -> None:
    app(args=argv_with_ray_default(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
