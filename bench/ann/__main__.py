"""``python -m bench.ann``: run the ANN benchmark and write JSON, Markdown and a PNG plot.

Examples::

    python -m bench.ann --dataset bigann-10k --algorithms hnswlib,faiss-hnsw,exact-numpy
    python -m bench.ann --config bench/ann/configs/real.yaml --dataset glove-50-10k
    python -m bench.ann --hdf5 ~/data/sift-128-euclidean.hdf5 --algorithms hnswlib --runs 1
    python -m bench.ann --dataset gmm-1m-128 --algorithms hnswlib,faiss-ivf-flat --runs 1
    python -m bench.ann --list

See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError

DEFAULT_ALGORITHMS = (
    "hnswlib,faiss-hnsw,faiss-ivf-flat,faiss-ivfpq,exact-numpy,exact-torch,"
    "service-hnsw,service-faiss-hnsw,service-ivf-flat,service-ivfpq,service-exact"
)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "ann"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ann", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="registered dataset (see --list); default bigann-10k")
    p.add_argument("--hdf5", metavar="PATH", help="an ann-benchmarks HDF5 file instead of --dataset")
    p.add_argument("--metric", choices=("l2", "ip", "cosine"), help="metric for an HDF5 file without one")
    p.add_argument("--algorithms", help=f"comma-separated names (default: the config's, else {DEFAULT_ALGORITHMS})")
    p.add_argument("--k", type=int, help="neighbours per query (default 10)")
    p.add_argument("--config", metavar="YAML", help="sweep configuration (see bench/ann/config.py)")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--name", help="file stem of the outputs (default: the dataset name)")
    p.add_argument("--runs", type=int, help="timed passes per setting, best kept (default 3)")
    p.add_argument("--batch-size", type=int, help="queries per batch call, 0 = all (default 0)")
    p.add_argument("--threads", type=int, help="threads for BLAS / faiss / hnswlib / torch (default 1)")
    p.add_argument("--queries", type=int, help="queries of a synthetic set (default 1000)")
    p.add_argument("--seed", type=int, help="seed of a synthetic set (default 0)")
    p.add_argument("--max-n", type=int, help="use only the first N base vectors (ground truth recomputed)")
    p.add_argument("--max-queries", type=int, help="use only the first N queries")
    p.add_argument("--epsilon", type=float, help="recall distance tolerance (default 1e-3)")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing result file of the same dataset and k: its rows for other "
                        "algorithms are kept, rows for the algorithms of this run are replaced")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list algorithms and datasets, then exit")
    p.add_argument("--render", metavar="JSON", help="only redraw the Markdown and PNG of an earlier result file")
    p.add_argument("-v", "--verbose", action="store_true", help="log each setting's result")
    return p


def _pick(cli: Any, cfg: dict[str, Any], key: str, default: Any) -> Any:
    if cli is not None:
        return cli
    return cfg.get(key, default)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bench.ann import adapters, config, datasets, machine, report, runner

    if args.render:
        import json

        src = Path(args.render)
        paths = report.write_all(json.loads(src.read_text()), src.parent, src.stem)
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
        return 0
    if args.list:
        print("algorithms:", ", ".join(adapters.names()))
        print("datasets:  ", ", ".join(datasets.names()), "| --hdf5 PATH")
        return 0
    try:
        cfg = config.load_yaml(args.config) if args.config else {}
        threads = int(_pick(args.threads, cfg, "threads", 1))
        machine.set_threads(threads)
        settings = runner.RunSettings(
            k=int(_pick(args.k, cfg, "k", 10)),
            runs=int(_pick(args.runs, cfg, "runs", 3)),
            batch_size=int(_pick(args.batch_size, cfg, "batch_size", 0)),
            threads=threads,
            epsilon=float(_pick(args.epsilon, cfg, "epsilon", 1e-3)),
            progress=not args.no_progress,
        )
        names = _pick(args.algorithms, cfg, "algorithms", None)
        if names is None:
            names = DEFAULT_ALGORITHMS
        if isinstance(names, dict):
            names = list(names)
        elif isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        sweeps = config.sweeps(names, cfg.get("algorithms") if isinstance(cfg.get("algorithms"), dict) else None)

        t0 = time.perf_counter()
        hdf5 = _pick(args.hdf5, cfg, "hdf5", None)
        if hdf5:
            ds = datasets.load_hdf5(hdf5, metric=_pick(args.metric, cfg, "metric", None))
        else:
            ds = datasets.load(_pick(args.dataset, cfg, "dataset", "bigann-10k"),
                               queries=int(_pick(args.queries, cfg, "queries", 1000)),
                               seed=int(_pick(args.seed, cfg, "seed", 0)))
        ds = ds.subset(_pick(args.max_n, cfg, "max_n", None), _pick(args.max_queries, cfg, "max_queries", None))
        load_s = time.perf_counter() - t0
        if not args.no_progress:
            print(f"{ds.name}: n={ds.n:,} d={ds.d} nq={ds.nq:,} metric={ds.metric} (loaded in {load_s:.1f} s)",
                  file=sys.stderr)

        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        results = runner.run(ds, sweeps, settings)
        doc = {
            "schema": 1,
            "command": "python -m bench.ann " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "started": started,
            "dataset": ds.info(),
            "settings": {"k": settings.k, "runs": settings.runs, "batch_size": settings.batch_size,
                         "threads": settings.threads, "epsilon": settings.epsilon, "warmup": settings.warmup},
            "sweeps": [{"algorithm": w.name, "build": w.build, "query": w.query} for w in sweeps],
            "machine": machine.machine_info(),
            "versions": machine.versions(),
            "dataset_load_s": load_s,
            "results": results,
        }
        for r in results:
            r["run_started"] = started
        out = Path(_pick(args.out, cfg, "out", DEFAULT_OUT))
        stem = args.name or ds.name
        if args.append:
            doc = report.merge_previous(doc, out / f"{stem}.json", names)
        paths = report.write_all(doc, out, stem)
    except RetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in results if "error" in r]
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if failed:
        print(f"{len(failed)} build setting(s) failed; see the Failures section", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
