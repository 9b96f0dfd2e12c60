"""The evaluation's resumable cell cache, safe to share between processes on one machine.

``DIR/cache.json`` maps a cell's key to ``{"cell": ..., "result": ...}``. Invariants:

- a finished cell is stored once and never recomputed or overwritten: the first result
  written for a key wins, whichever process wrote it;
- every write takes an exclusive ``flock`` on ``DIR/cache.json.lock``, re-reads the file,
  merges and replaces it atomically (``os.replace``), so processes sharing ``DIR`` never lose
  each other's cells and a crash mid-write leaves the previous file intact;
- before computing a cell a process *claims* it in ``DIR/cache.json.claims`` (under the same
  lock). A claim is respected by the other processes while its owner is alive (same host,
  ``os.kill(pid, 0)``) and younger than :data:`CLAIM_TTL_SECONDS`; so several processes
  started on one ``DIR`` split the grid between them instead of computing a cell twice, and the
  claims of a crashed or killed process are simply ignored.

Only cell definitions and scores are stored (accuracies, demonstration texts that are the
mechanism's released output, timings), nothing from the private pool beyond what a released
demonstration already holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CLAIM_TTL_SECONDS", "Cache", "cell_key"]

CLAIM_TTL_SECONDS = 6 * 3600.0
"""A claim older than this is ignored even if its owner looks alive (a cell takes minutes; this
guards against a reused pid or a claim written from another host)."""


def cell_key(cell: dict[str, Any]) -> str:
    """The cell's cache key: SHA-256 of its canonical JSON (every parameter that determines
    its result), truncated to 24 hex digits."""
    return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:24]


class Cache:
    """A process's view of ``DIR/cache.json``; see the module docstring for the invariants."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._claims_path = self.path.with_name(self.path.name + ".claims")
        self.data: dict[str, Any] = _read_json(self.path)

    def __len__(self) -> int:
        return len(self.data)

    def get(self, cell: dict[str, Any]) -> dict[str, Any] | None:
        """The cached result of ``cell`` as of the last read (see :meth:`refresh`)."""
        hit = self.data.get(cell_key(cell))
        return None if hit is None else hit["result"]

    def refresh(self) -> None:
        """Merge what other processes have written since this view was read."""
        with self.locked():
            self._merge_disk()

    def refresh_locked(self) -> None:
        """:meth:`refresh` for a caller already inside :meth:`locked`."""
        self._merge_disk()

    def put(self, cell: dict[str, Any], result: dict[str, Any]) -> None:
        """Store ``cell``'s result (unless another process stored one first) and drop its
        claim."""
        key = cell_key(cell)
        with self.locked():
            self._merge_disk()
            self.data.setdefault(key, {"cell": cell, "result": result})
            _write_json(self.path, self.data)
            self._drop_claim(key)

    def claim(self, cell: dict[str, Any]) -> bool:
        """True when this process should compute ``cell``: it is not cached and no live
        process holds a claim on it. The claim is then recorded until :meth:`put` or
        :meth:`release`."""
        key = cell_key(cell)
        with self.locked():
            self._merge_disk()
            if key in self.data:
                return False
            claims = _read_json(self._claims_path)
            held = claims.get(key)
            if held is not None and not _is_own(held) and _is_live(held):
                return False
            claims[key] = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            _write_json(self._claims_path, claims)
            return True

    def release(self, cell: dict[str, Any]) -> None:
        """Drop this process's claim on ``cell`` without a result (the cell failed)."""
        with self.locked():
            self._drop_claim(cell_key(cell))

    def merge_from(self, others: Iterable[Path]) -> int:
        """Import the cells of other caches (``cache.json`` files or the folders holding them)
        that this one lacks; existing cells are kept. Returns how many were added."""
        added = 0
        with self.locked():
            self._merge_disk()
            for other in others:
                path = Path(other)
                path = path / "cache.json" if path.is_dir() else path
                if not path.is_file():
                    raise FileNotFoundError(f"no evaluation cache at {path}")
                for key, entry in _read_json(path).items():
                    if key not in self.data:
                        self.data[key] = entry
                        added += 1
            _write_json(self.path, self.data)
        return added

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache's exclusive lock (not re-entrant: do not call the locking methods
        inside it; use :meth:`refresh_locked`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- internals ------------------------------------------------------------------------------
    def _merge_disk(self) -> None:
        for key, entry in _read_json(self.path).items():
            self.data.setdefault(key, entry)

    def _drop_claim(self, key: str) -> None:
        claims = _read_json(self._claims_path)
        if key in claims and _is_own(claims[key]):
            del claims[key]
            _write_json(self._claims_path, claims)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an evaluation cache (expected a JSON object)")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic replace; the caller holds the lock, so one temporary name suffices."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _is_own(claim: dict[str, Any]) -> bool:
    return claim.get("pid") == os.getpid() and claim.get("host") == socket.gethostname()


def _is_live(claim: dict[str, Any]) -> bool:
    if time.time() - float(claim.get("since", 0.0)) > CLAIM_TTL_SECONDS:
        return False
    if claim.get("host") != socket.gethostname():
        return True  # cannot check another host's process; the TTL bounds it
    try:
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except (KeyError, TypeError, ValueError):
        return False
    return True
