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

Connection options (before the command, or from the environment): ``--api-key-file`` /
``$RETRIEVAL_API_KEY_FILE`` or ``$RETRIEVAL_API_KEY`` (never a key on the command line), ``--ca-file``
(the server's CA; implies TLS), ``--tls``, ``--client-cert`` / ``--client-key`` (mutual TLS).
"""

from __future__ import annotations

import json
import sys
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


@app.callback()
def main_options(
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", envvar="RETRIEVAL_API_KEY_FILE",
                                                help="file holding the API key (or set $RETRIEVAL_API_KEY)"),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", envvar="RETRIEVAL_CA_FILE",
                                           help="PEM CA of the server's certificate (implies --tls)"),
    tls: bool = typer.Option(False, "--tls", envvar="RETRIEVAL_TLS", help="connect over TLS (system CAs)"),
    client_cert: Optional[Path] = typer.Option(None, "--client-cert", envvar="RETRIEVAL_CLIENT_CERT",
                                               help="PEM client certificate (mutual TLS)"),
    client_key: Optional[Path] = typer.Option(None, "--client-key", envvar="RETRIEVAL_CLIENT_KEY",
                                              help="PEM client private key (mutual TLS)"),
) -> None:
    """A gRPC retrieval service: vector search, cross-encoder search, graphs, drafts."""
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
                                 metrics_port=metrics_port, metrics_host=metrics_host, ray_address=ray)
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
            with urllib.request.urlopen(metrics_url, timeout=c.timeout) as r:
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


from index_builder.cli import argv_with_ray_default, build_command  # noqa: E402

app.command("build", help="Build a vector collection from files, offline (same as `python -m index_builder "
            "build`), into a data folder (--data-dir) or a running server (--push).")(build_command)


def main() -> None:
    app(args=argv_with_ray_default(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
