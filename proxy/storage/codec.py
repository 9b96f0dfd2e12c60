"""Encodings shared by the repositories: canonical JSON (what ledger hashes cover), parsing
stored JSON (a corrupt value is a :class:`StorageError`, never a crash or a silent default),
fresh ids and API-key hashes."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from ..db import StorageError

__all__ = ["canonical", "hash_key", "loads", "new_id"]


def canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces, ASCII, no NaN/inf): what the hash covers."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def loads(text: str | None, what: str) -> Any:
    """Parse stored JSON; None stays None; StorageError naming the column if corrupt."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise StorageError(f"corrupt stored JSON ({what})") from None


def hash_key(plaintext: str) -> str:
    """SHA-256 of an API key: the only form in which a key is stored."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def new_id(prefix: str) -> str:
    """A fresh random id ``{prefix}_{24 hex digits}``."""
    return f"{prefix}_{secrets.token_hex(12)}"
