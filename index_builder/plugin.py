"""``index_builder`` as a plugin of ``retrieval`` (see :mod:`retrieval.plugins`): the job kind
``build_index`` for the server and the commands ``retrieval build`` / ``retrieval ground-truth``."""

from __future__ import annotations


def job_kinds(ctx) -> list:
    from index_builder.jobs import build_index_kind  # offline builds as a job: `build_index`

    return [build_index_kind(ctx.collections, ctx.settings, ctx.data_dir)]


def add_commands(app) -> None:
    from index_builder.cli import build_command, ground_truth_command

    app.command("build", help="Build a vector collection from files, offline (same as `python -m index_builder "
                "build`), into a data folder (--data-dir) or a running server (--push).")(build_command)
    app.command("ground-truth", help="Exact k-NN of queries in a base, offline (same as `python -m index_builder "
                "ground-truth`), resumable. Example: retrieval ground-truth --base xb.npy --queries xq.npy --out "
                "gt.npy --k 100")(ground_truth_command)
