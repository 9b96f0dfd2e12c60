"""The database schema: DDL, a ``schema_version`` table, and ordered migrations run at start-up.

How upgrades work
-----------------
:func:`upgrade` runs in ONE write transaction at every start-up (PostgreSQL: under the
transaction-scoped advisory lock of :meth:`proxy.db.Database.create_schema`; SQLite: under
``BEGIN IMMEDIATE``), so several processes starting at once apply each migration exactly once
and a failed migration leaves the database as it was:

1. create ``schema_version`` (one row per applied migration: version, description, time);
2. a database written before versioning (its ``tenants`` table exists but ``schema_version`` is
   empty) is *stamped*: version 1 (the release schema), and 2 as well if its ``datasets`` table
   already has ``records_without_user``;
3. every migration above the stored version runs, in order, and is recorded;
4. the start-up guards run (:data:`_GUARDS`): the ledger's append-only triggers are re-created
   if missing, and dataset rows that an older server wrote without ``records_without_user``
   get it (both idempotent, as before versioning).

A database whose version is above :data:`SCHEMA_VERSION` (written by a newer release) is
refused with :class:`StorageError`: fail closed rather than write through a schema we do not
know. The next issues add a table or column by appending a :class:`Migration`.

Why a small versioned-migrations table and not Alembic
------------------------------------------------------
Alembic needs SQLAlchemy, which the project does not use (:mod:`proxy.db` is a thin layer over
sqlite3 and psycopg); the schema must work in two dialects from one set of statements (the
``{REAL}``/``{BIGINT}``/``{SERIAL}`` placeholders); and the DDL must run in the same single
transaction, under the same advisory lock, as today's start-up. A table of applied versions and
a tuple of Python functions does all of that in a page, with nothing to install.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..db import Database, StorageError, Transaction
from . import summary
from .codec import loads
from .models import count_without_user

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "schema_version", "upgrade"]


@dataclass(frozen=True)
class Migration:
    """One schema step. ``apply`` runs inside the start-up transaction and must leave a
    database at ``version - 1`` at ``version``."""

    version: int
    description: str
    apply: Callable[[Transaction], None]


# ---------------------------------------------------------------------------------------------
# Migration 1: the schema of release abd6ed3 (the last release before versioning), verbatim.

_RELEASE_TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        epsilon {REAL} NOT NULL,
        delta {REAL} NOT NULL,
        rdp_order {REAL} NOT NULL,
        rdp_budget {REAL} NOT NULL,
        spent_at_order {REAL} NOT NULL,
        ledger_count {BIGINT} NOT NULL,
        ledger_head TEXT NOT NULL,
        created {REAL} NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        scope TEXT NOT NULL,
        name TEXT,
        epsilon_cap {REAL},
        rdp_order {REAL},
        rdp_budget {REAL},
        spent_at_order {REAL} NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created {REAL} NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id)",
    """CREATE TABLE IF NOT EXISTS datasets (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        name TEXT NOT NULL,
        records {BIGINT} NOT NULL,
        labels TEXT NOT NULL,
        data TEXT NOT NULL,
        created {REAL} NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS datasets_tenant ON datasets (tenant_id)",
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        name TEXT,
        dataset_id TEXT,
        key_id TEXT,
        status TEXT NOT NULL,
        plan TEXT NOT NULL,
        epsilon {REAL} NOT NULL,
        delta {REAL} NOT NULL,
        progress TEXT NOT NULL,
        demonstrations TEXT,
        error TEXT,
        created {REAL} NOT NULL,
        updated {REAL} NOT NULL,
        idempotency_key TEXT,
        cache_salt TEXT NOT NULL,
        UNIQUE (tenant_id, name),
        UNIQUE (tenant_id, idempotency_key)
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status)",
    """CREATE TABLE IF NOT EXISTS ledger (
        id {SERIAL},
        tenant_id TEXT NOT NULL,
        seq {BIGINT} NOT NULL,
        job_id TEXT,
        key_id TEXT,
        event TEXT NOT NULL,
        plan TEXT NOT NULL,
        epsilon {REAL} NOT NULL,
        delta {REAL} NOT NULL,
        rdp_order {REAL} NOT NULL,
        rdp_at_order {REAL} NOT NULL,
        versions TEXT NOT NULL,
        created {REAL} NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        UNIQUE (tenant_id, seq)
    )""",
)

_SQLITE_TRIGGERS: tuple[str, ...] = (
    """CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
       BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
       BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
)

_PG_TRIGGERS: tuple[str, ...] = (
    """CREATE OR REPLACE FUNCTION dpicl_ledger_append_only() RETURNS trigger AS $$
       BEGIN RAISE EXCEPTION 'the ledger is append-only'; END; $$ LANGUAGE plpgsql""",
    # Created only if missing: CREATE OR REPLACE TRIGGER would lock the ledger table at every
    # start-up of every replica.
    """DO $$ BEGIN
         IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'ledger_append_only'
                        AND tgrelid = 'ledger'::regclass) THEN
           CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
             FOR EACH ROW EXECUTE FUNCTION dpicl_ledger_append_only();
         END IF;
       END $$""",
)


def _ensure_triggers(tx: Transaction) -> None:
    """The ledger's append-only triggers (idempotent: created only if missing)."""
    for statement in _SQLITE_TRIGGERS if tx.dialect == "sqlite" else _PG_TRIGGERS:
        tx.execute(statement)


def _release_schema(tx: Transaction) -> None:
    for statement in _RELEASE_TABLES:
        tx.execute_ddl(statement)
    _ensure_triggers(tx)


# ---------------------------------------------------------------------------------------------
# Migration 2: datasets.records_without_user (user-level admission).


def _fill_records_without_user(tx: Transaction) -> None:
    """Fill ``records_without_user`` wherever it is NULL by counting the stored records without
    a ``user`` field: a read on the trusted side, at start-up, whose result is shown only to
    the tenant's admin keys and used to refuse user-level jobs."""
    rows = tx.execute("SELECT id, data FROM datasets WHERE records_without_user IS NULL").rows
    for row in rows:
        missing = count_without_user(loads(row["data"], "datasets.data"))
        tx.execute(
            "UPDATE datasets SET records_without_user = ? WHERE id = ?", (missing, row["id"])
        )


def _records_without_user(tx: Transaction) -> None:
    if not tx.has_column("datasets", "records_without_user"):
        tx.execute_ddl("ALTER TABLE datasets ADD COLUMN records_without_user {BIGINT}")
    _fill_records_without_user(tx)


# ---------------------------------------------------------------------------------------------
# Migration 3: the Batch API (files with their bytes, batches, one row per answered line).

_BATCH_TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS files (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes {BIGINT} NOT NULL,
        data {BLOB} NOT NULL,
        created {REAL} NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS files_tenant ON files (tenant_id, created)",
    """CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        key_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        input_file_id TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        status TEXT NOT NULL,
        metadata TEXT,
        errors TEXT,
        output_file_id TEXT,
        error_file_id TEXT,
        total {BIGINT} NOT NULL,
        completed {BIGINT} NOT NULL,
        failed {BIGINT} NOT NULL,
        created {REAL} NOT NULL,
        updated {REAL} NOT NULL,
        expires_at {REAL} NOT NULL,
        in_progress_at {REAL},
        finalizing_at {REAL},
        completed_at {REAL},
        failed_at {REAL},
        expired_at {REAL},
        cancelling_at {REAL},
        cancelled_at {REAL}
    )""",
    "CREATE INDEX IF NOT EXISTS batches_tenant ON batches (tenant_id, created)",
    "CREATE INDEX IF NOT EXISTS batches_status ON batches (status)",
    """CREATE TABLE IF NOT EXISTS batch_lines (
        batch_id TEXT NOT NULL REFERENCES batches(id),
        line {BIGINT} NOT NULL,
        ok {BIGINT} NOT NULL,
        result TEXT NOT NULL,
        created {REAL} NOT NULL,
        PRIMARY KEY (batch_id, line)
    )""",
)


def _batch_api(tx: Transaction) -> None:
    blob = "BLOB" if tx.dialect == "sqlite" else "BYTEA"
    for statement in _BATCH_TABLES:
        tx.execute_ddl(statement.replace("{BLOB}", blob))


# ---------------------------------------------------------------------------------------------
# Migration 4: the budget summary.


def _budget_summary(tx: Transaction) -> None:
    """The ``budget_summary`` table, filled for existing ledgers by recomputing each tenant's
    charges from its rows (once, at this upgrade; admission maintains it from then on)."""
    tx.execute_ddl(summary.TABLE)
    summary.fill(tx)


# Migration 5: private predictors and their charged queries.

_PREDICTOR_TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS predictors (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        name TEXT NOT NULL,
        dataset_id TEXT NOT NULL,
        plan TEXT NOT NULL,
        epsilon {REAL} NOT NULL,
        delta {REAL} NOT NULL,
        secret TEXT NOT NULL,
        created {REAL} NOT NULL,
        UNIQUE (tenant_id, name)
    )""",
    """CREATE TABLE IF NOT EXISTS predictor_queries (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        predictor_id TEXT NOT NULL,
        key_id TEXT,
        idempotency_key TEXT,
        request_hash TEXT NOT NULL,
        answer TEXT,
        created {REAL} NOT NULL,
        answered {REAL},
        UNIQUE (tenant_id, key_id, idempotency_key)
    )""",
    "CREATE INDEX IF NOT EXISTS predictor_queries_predictor ON predictor_queries (predictor_id)",
)


def _predictor_tables(tx: Transaction) -> None:
    for statement in _PREDICTOR_TABLES:
        tx.execute_ddl(statement)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the schema of release abd6ed3", _release_schema),
    Migration(
        2, "datasets.records_without_user, filled from the stored records", _records_without_user
    ),
    Migration(3, "the Batch API: files, batches and batch_lines", _batch_api),
    Migration(
        4, "budget_summary: per-tenant spend summary, filled from the ledger", _budget_summary
    ),
    Migration(5, "private predictors and their charged queries", _predictor_tables),
)
SCHEMA_VERSION: int = MIGRATIONS[-1].version

_GUARDS: tuple[Callable[[Transaction], None], ...] = (_ensure_triggers, _fill_records_without_user)
"""Idempotent steps run at every start-up after the migrations: a trigger dropped behind the
application's back comes back, and a dataset row an older replica wrote gets its count."""

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version {BIGINT} PRIMARY KEY,
    description TEXT NOT NULL,
    applied {REAL} NOT NULL
)"""


def schema_version(tx: Transaction) -> int:
    """The highest applied migration (0: none recorded, or no ``schema_version`` table)."""
    if not tx.has_table("schema_version"):
        return 0
    row = tx.execute("SELECT MAX(version) AS v FROM schema_version").one()
    return 0 if row is None or row["v"] is None else int(row["v"])


def _record(tx: Transaction, version: int, description: str) -> None:
    tx.execute(
        "INSERT INTO schema_version (version, description, applied) VALUES (?, ?, ?)",
        (version, description, time.time()),
    )


def _stamp_unversioned(tx: Transaction) -> int:
    """Record the versions a database written before versioning already has; returns the
    version it is at (0 for an empty database)."""
    if not tx.has_table("tenants"):
        return 0
    _record(tx, 1, "stamped: " + MIGRATIONS[0].description)
    if tx.has_column("datasets", "records_without_user"):
        _record(tx, 2, "stamped: " + MIGRATIONS[1].description)
        return 2
    return 1


def _migrate(tx: Transaction) -> None:
    current = schema_version(tx)
    if current == 0:
        current = _stamp_unversioned(tx)
    if current > SCHEMA_VERSION:
        raise StorageError(
            f"the database schema is version {current}, newer than this server's "
            f"{SCHEMA_VERSION}; upgrade the server"
        )
    for migration in MIGRATIONS:
        if migration.version > current:
            migration.apply(tx)
            _record(tx, migration.version, migration.description)
    for guard in _GUARDS:
        guard(tx)


def upgrade(db: Database) -> None:
    """Bring ``db`` to :data:`SCHEMA_VERSION` (see the module docstring); idempotent."""
    db.create_schema((_VERSION_TABLE,), migrate=_migrate)
