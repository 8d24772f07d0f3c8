"""The shared core under the four engines: what every engine needs, written once.

- :mod:`retrieval.core.registry`: :class:`~retrieval.core.registry.Registry`, every "thing by name"
  (index backends, scorers, dual encoders, input readers, job kinds, draft sources, graph readers,
  benchmark adapters); one error for an unknown name (INVALID_ARGUMENT, listing the valid names) and
  one for a name registered twice.
- :mod:`retrieval.core.faults`: what counts as a full disk, for every store.
- Atomic files are :mod:`retrieval.storage.atomic`, devices :mod:`retrieval.device`, errors
  :mod:`retrieval.errors`, request limits :class:`retrieval.config.LimitsSettings`.

Nothing in here imports an engine.
"""
