"""Long-running work (index builds, cross-encoder indexing, FastRP, NCN training, datastore builds).

A job body is a plain function ``fn(ctx: JobContext, **params) -> dict`` that reports progress through
``ctx.progress``, calls ``ctx.check_cancelled()`` between units of work, and keeps resumable state under
``ctx.work_dir``. The same body runs under the server's job manager (gRPC Jobs service) or locally with
:class:`LocalJobContext` (tqdm progress bar), e.g. from a CLI or a benchmark.
"""

from retrieval.jobs.context import JobContext, LocalJobContext

__all__ = ["JobContext", "LocalJobContext"]
