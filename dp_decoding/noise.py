"""Randomness for the mechanisms: from OS entropy unless a test fixes a seed.

A fresh ``numpy.random.Generator`` seeded from ``secrets`` (the OS CSPRNG) is made per job;
the seed is never logged, returned or sent to an engine.
"""

from __future__ import annotations

import secrets

import numpy as np


def os_entropy_rng() -> np.random.Generator:
    return np.random.Generator(np.random.PCG64DXSM(secrets.randbits(256)))


def new_job_key() -> bytes:
    """A per-job secret for slot hashing (32 bytes from the OS CSPRNG)."""
    return secrets.token_bytes(32)
