"""Start real ``dpicl serve`` processes on loopback ports, for end-to-end tests and benchmarks.

Invariants: a :class:`Server` runs ``python -m proxy.cli serve`` (or ``entry``, a module that
wraps that CLI) from the repository root with ``HF_HUB_OFFLINE=1``, on ``127.0.0.1`` and a port nobody held when it was chosen; ``start``
returns only once ``/health`` answers 200 (or raises with the tail of the server's log), and
``stop`` always reaps the process (terminate, then kill after 20 s).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["ROOT", "Server", "create_tenant", "dpicl", "free_port"]

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: the working directory of every ``dpicl`` subprocess."""


def free_port() -> int:
    """A loopback TCP port that was free when this returned."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dpicl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``dpicl ARGS`` (as ``python -m proxy.cli``) from the repository root; with ``check``,
    raise with the tail of stderr when it exits non-zero."""
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"dpicl {' '.join(args)} failed: {r.stderr[-2000:]}")
    return r


def create_tenant(db: str, name: str, epsilon: float, delta: float = 1e-6) -> str:
    """Create a tenant in ledger ``db``; return its API key (the command's last line)."""
    r = dpicl(
        "tenant", "create", name, "--epsilon", str(epsilon), "--delta", str(delta), "--db", db
    )
    return r.stdout.strip().splitlines()[-1]


@dataclass
class Server:
    """A ``dpicl serve`` subprocess on a free loopback port, its output in ``log_path``."""

    db: str
    log_path: Path
    metrics_key: str = "metrics-secret"
    log_level: str = "info"
    engine: str = "embedded"
    serving: str = "auto"
    """``--serving``: the chat/completions backend (auto, batching, step-loop)."""
    threads: int | None = None
    """``--threads`` (the embedded engine's torch threads; None: all cores)."""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    entry: str = "proxy.cli"
    """The module run with ``python -m`` (a test may wrap the CLI to register an engine)."""
    extra_args: tuple[str, ...] = ()
    """More ``serve`` options."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment variables for the server process."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The command line ``start`` runs."""
        return [
            sys.executable,
            "-m",
            self.entry,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db",
            self.db,
            "--metrics-key",
            self.metrics_key,
            "--log-level",
            self.log_level,
            "--engine",
            self.engine,
            *(["--serving", self.serving] if self.serving != "auto" else []),
            *(["--threads", str(self.threads)] if self.threads else []),
            *self.extra_args,
        ]

    def start(self, timeout: float = 240, poll: float = 0.25) -> Server:
        """Start the server and wait (polling ``/health`` every ``poll`` s) until it answers."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", **self.env)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command(), cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.log_tail())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(poll)
        self.stop()
        raise RuntimeError("server did not start in time: " + self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the server's output ("" if unreadable)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics`` (with the metrics key)."""
        r = httpx.get(
            self.url + "/metrics",
            headers={"Authorization": f"Bearer {self.metrics_key}"},
            timeout=10,
        )
        r.raise_for_status()
        return r.text

    def rss_bytes(self) -> int:
        """The server process's resident memory now (0 once it has exited)."""
        if self.proc is None:
            return 0
        try:
            with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self) -> None:
        """Terminate the server (kill it after 20 s) and close its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if getattr(self, "_log", None):
            self._log.close()
