"""Fixtures shared by the server tests."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
"""The local PostgreSQL server (trust auth, database ``test``)."""


@pytest.fixture()
def pg_schema() -> Iterator[str]:
    """A fresh schema per test, dropped afterwards; skip when PostgreSQL is unreachable."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error:
        pytest.skip("PostgreSQL is not reachable at " + PG_URL)
    schema = f"dpicl_test_{secrets.token_hex(6)}"
    try:
        yield schema
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()
