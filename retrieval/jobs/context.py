"""The context a job body runs in. See :mod:`retrieval.jobs`."""

from __future__ import annotations

import threading
from pathlib import Path

from retrieval.errors import Cancelled


class JobContext:
    """Progress, cancellation and a work folder for one job.

    Thread-safety: ``progress`` and ``check_cancelled`` may be called from any thread; a job body
    runs in one worker thread.
    """

    def __init__(self, job_id: str, work_dir: Path) -> None:
        self.job_id = job_id
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._cancel = threading.Event()
        self.done = 0.0
        self.total: float | None = None
        self.message = ""

    # --- reporting -----------------------------------------------------------------------------
    def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Report ``done`` units out of ``total`` (``None``: unknown). ``message`` names the phase."""
        self.done = float(done)
        if total is not None:
            self.total = float(total)
        if message:
            self.message = message
        self._on_progress()

    def _on_progress(self) -> None:  # overridden by the server's job manager and LocalJobContext
        pass

    # --- cancellation --------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`retrieval.errors.Cancelled` if the job was cancelled."""
        if self._cancel.is_set():
            raise Cancelled(f"job {self.job_id} was cancelled")


class LocalJobContext(JobContext):
    """Runs a job body outside the server, showing a tqdm progress bar (rate and ETA)."""

    def __init__(self, work_dir: Path, job_id: str = "local", show_progress: bool = True) -> None:
        super().__init__(job_id, work_dir)
        self._bar = None
        self._show = show_progress
        self._phase = None

    def _on_progress(self) -> None:
        if not self._show:
            return
        from tqdm.auto import tqdm

        if self._bar is None or self._phase != self.message:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=self.total, desc=self.message or self.job_id, dynamic_ncols=True)
            self._phase = self.message
        if self.total is not None and self._bar.total != self.total:
            self._bar.total = self.total
        self._bar.n = self.done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
