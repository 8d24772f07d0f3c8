"""Run a server in a child process (for tests, benchmarks and scripts).

    with ServerProcess(data_dir) as srv:          # starts `python -m retrieval serve --port 0 ...`
        client = Client(srv.address)
    srv.kill()                                     # SIGKILL (crash tests); srv.start() again on the same folder
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_READY = re.compile(r"retrieval: serving on (\S+)")
_HTTP = re.compile(r"retrieval: HTTP API and dashboard on (\S+)")  # printed before the "serving on" line


class ServerProcess:
    def __init__(self, data_dir: Path, args: list[str] | None = None, env: dict | None = None,
                 host: str = "127.0.0.1", log_path: Path | None = None, prefix: list[str] | None = None) -> None:
        """``prefix``: a command the server runs under (e.g. ``["unshare", "-Urm", "sh", "-c", '... "$@"', "-"]``)."""
        self.data_dir = Path(data_dir)
        self.args = list(args or [])
        self.prefix = list(prefix or [])
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("OMP_NUM_THREADS", "2")
        self.host = host
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}.server.log"
        self._killed = False
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.port: int | None = None
        self.http_url: str | None = None  # e.g. "http://127.0.0.1:8080" when the server serves HTTP (http_port)

    def start(self, timeout: float = 120.0, port: int | None = None) -> str:
        """Start and wait for the "serving on" line; returns host:port. Reuses the last port if any."""
        port = port if port is not None else (self.port or 0)
        cmd = [*self.prefix, sys.executable, "-m", "retrieval", "serve", "--host", self.host, "--port", str(port),
               "--data-dir", str(self.data_dir), *self.args]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self._killed = False
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=self.env)
        found: list[str] = []
        http: list[str] = []
        done = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace")
                log.write(raw)
                log.flush()
                h = _HTTP.search(line)
                if h and not found:
                    http.append(h.group(1).rstrip("/"))
                m = _READY.search(line)
                if m and not found:
                    found.append(m.group(1))
                    done.set()
            done.set()

        threading.Thread(target=read, daemon=True).start()
        t_end = time.monotonic() + timeout
        while not done.wait(0.05):
            if time.monotonic() > t_end:
                self.kill()
                raise TimeoutError(f"server did not start within {timeout} s; log: {self.log_path}")
        if not found:
            code = self.proc.wait()
            raise RuntimeError(f"server exited with code {code} before serving; log:\n{self.log_tail()}")
        self.address = found[0]
        self.http_url = http[0] if http else None
        self.port = int(self.address.rsplit(":", 1)[1])
        return self.address

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self._killed = True

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for a graceful exit; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return -9
        if self.proc.returncode != 0 and not self._killed:
            # it died on its own: say so where a test run shows it, with the end of its log
            print(f"server {self.address} had exited with code {self.proc.returncode}; log {self.log_path}:\n"
                  f"{self.log_tail()}", file=sys.stderr)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
