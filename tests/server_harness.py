"""Start real `dpicl serve` processes on loopback ports for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dpicl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
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
    r = dpicl(
        "tenant", "create", name, "--epsilon", str(epsilon), "--delta", str(delta), "--db", db
    )
    return r.stdout.strip().splitlines()[-1]


@dataclass
class Server:
    db: str
    log_path: Path
    metrics_key: str = "metrics-secret"
    log_level: str = "info"
    engine: str = "embedded"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> Server:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "serve",
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
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError("server did not start in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()
