"""Plugins: packages that plug job kinds into the server and commands into the ``retrieval`` CLI.

``retrieval`` imports no plugin by name, so dependencies run one way (a plugin depends on
``retrieval``, never the reverse). A plugin is a module named by an entry point of the group
``retrieval.plugins`` in its package's metadata::

    [project.entry-points."retrieval.plugins"]
    index_builder = "index_builder.plugin"

and may define either or both of::

    def job_kinds(ctx: retrieval.server.services.ServerContext) -> Iterable[retrieval.jobs.JobKind]: ...
    def add_commands(app: typer.Typer) -> None: ...

The server registers the job kinds of every plugin at start (``build_index`` comes from
``index_builder``); the CLI adds the commands (``retrieval build``, ``retrieval ground-truth``). A plugin
that fails to import is logged and skipped: the server still serves every engine.
"""

from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points
from types import ModuleType

logger = logging.getLogger(__name__)

GROUP = "retrieval.plugins"


@functools.cache
def plugins() -> tuple[ModuleType, ...]:
    """The plugin modules of the installed packages, sorted by entry point name, each imported once."""
    out = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            mod = importlib.import_module(ep.value.partition(":")[0])
        except Exception as e:  # a broken plugin must not take the server or the CLI down
            logger.warning("plugin %s (%s) could not be imported, skipped: %s: %s", ep.name, ep.value,
                           type(e).__name__, e)
            continue
        out.append(mod)
    return tuple(out)


def job_kinds(ctx) -> list:
    """Every job kind the plugins contribute for this server."""
    kinds = []
    for mod in plugins():
        fn = getattr(mod, "job_kinds", None)
        if fn is not None:
            kinds.extend(fn(ctx))
    return kinds


def add_commands(app) -> None:
    for mod in plugins():
        fn = getattr(mod, "add_commands", None)
        if fn is not None:
            fn(app)
