"""A tiny database layer over sqlite3 (default) and psycopg 3 (PostgreSQL).

URLs
----
* SQLite (WAL mode, busy_timeout 30 s), SQLAlchemy's convention: ``sqlite:///relative.db``
  (relative to the working directory), ``sqlite:////abs/path.db`` (so
  ``f"sqlite:///{absolute_path}"`` works), or a bare file path.
* ``postgresql://user@host:port/db`` (or ``postgres://``): PostgreSQL. An extra query
  parameter ``schema=NAME`` (or the ``schema`` argument) puts every table in that schema,
  created if missing, by setting ``search_path`` on each connection; tests use it to isolate
  runs.

Invariants
----------
* SQL is written once with ``?`` placeholders and translated to ``%s`` for psycopg; the SQL
  text of this project never contains a literal ``?`` or ``%``.
* One connection per (thread, process): a ``threading.local`` keyed on ``os.getpid()``, so a
  forked child never reuses its parent's connection. Connections run in autocommit mode and
  every unit of work is an explicit transaction (:meth:`Database.transaction`).
* Read transactions see one consistent snapshot (SQLite: a deferred transaction in WAL mode;
  PostgreSQL: ``REPEATABLE READ READ ONLY``, which never fails to serialise).
* Write transactions: SQLite ``BEGIN IMMEDIATE`` (takes the database write lock at once, so
  two writers — threads or processes — are serialised and a read-check-write sequence inside
  one is atomic); PostgreSQL a READ COMMITTED transaction in which the caller locks the rows
  it reads before writing (``SELECT ... FOR UPDATE``, see :data:`Database.for_update`).
* Every driver error is raised as :class:`StorageError` (the app answers 503: fail closed).
  A PostgreSQL connection found dead at ``BEGIN`` (the server restarted since its last use)
  is replaced once, before any statement runs; a server that is down is a StorageError at
  once (connection refused) or after ``connect_timeout`` (10 s unless the URL sets one).
  The message carries the error class and the driver's primary message only, never bound
  parameter values (so no stored text can leak through an error).
* :meth:`Database.create_schema` (used by :mod:`proxy.storage.schema`, which versions the
  schema) is idempotent (``CREATE ... IF NOT EXISTS``) and safe to run
  from several processes at once (PostgreSQL: under a transaction-scoped advisory lock).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Cursor", "Database", "IntegrityError", "StorageError", "Transaction", "parse_url"]

Dialect = Literal["sqlite", "postgresql"]

_BUSY_TIMEOUT_MS = 30_000
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SCHEMA_LOCK_KEY = 7_340_512_113  # pg_advisory_xact_lock key for schema creation
_COLUMN_TYPES: dict[str, dict[str, str]] = {
    "sqlite": {"REAL": "REAL", "BIGINT": "INTEGER", "SERIAL": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {
        "REAL": "DOUBLE PRECISION",
        "BIGINT": "BIGINT",
        "SERIAL": "BIGSERIAL PRIMARY KEY",
    },
}


class StorageError(RuntimeError):
    """The database failed or is unavailable. Callers fail closed (HTTP 503)."""


class IntegrityError(StorageError):
    """A uniqueness (or other integrity) constraint refused a write."""


@dataclass(frozen=True)
class ParsedURL:
    dialect: Dialect
    target: str  # sqlite: file path; postgresql: libpq URL without our own parameters
    schema: str | None = None


def parse_url(url: str, schema: str | None = None) -> ParsedURL:
    """Split a storage URL into dialect, connection target and optional PostgreSQL schema.

    ``sqlite:///:memory:`` is refused (every thread would see its own empty database).
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("a storage URL is required")
    url = url.strip()
    if url.startswith(("postgresql://", "postgres://")):
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        kept = [(k, v) for k, v in query if k != "schema"]
        from_url = [v for k, v in query if k == "schema"]
        chosen = schema if schema is not None else (from_url[-1] if from_url else None)
        if chosen is not None and not _SCHEMA_NAME.match(chosen):
            raise ValueError("schema must be a plain SQL identifier (letters, digits, _)")
        target = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))
        return ParsedURL("postgresql", target, chosen)
    if schema is not None:
        raise ValueError("schema applies to PostgreSQL URLs only")
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            raise ValueError("a SQLite URL is sqlite:///relative.db or sqlite:////absolute.db")
        path = url[len("sqlite:///") :]
    elif "://" in url:
        raise ValueError("unsupported storage URL scheme (use sqlite:/// or postgresql://)")
    else:
        path = url
    if path in (":memory:", "/:memory:") or not path:
        raise ValueError("an in-memory SQLite database is not supported; give a file path")
    return ParsedURL("sqlite", os.path.abspath(path))


class Cursor:
    """The rows of one statement, as dicts (column name -> value)."""

    def __init__(self, rows: list[dict[str, Any]], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def one(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None


class Database:
    """Connections, transactions and dialect differences. Thread-safe; see module docstring."""

    def __init__(self, url: str, schema: str | None = None) -> None:
        self.parsed = parse_url(url, schema)
        self.dialect: Dialect = self.parsed.dialect
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[tuple[int, Any]] = []
        self._closed = False
        if self.dialect == "postgresql":
            try:
                import psycopg  # noqa: F401
            except ImportError as e:  # pragma: no cover - dependency is declared
                raise StorageError("psycopg is not installed") from e

    # -- dialect helpers -------------------------------------------------------------------
    @property
    def for_update(self) -> str:
        """Suffix that locks selected rows until commit (PostgreSQL); empty for SQLite, where
        ``BEGIN IMMEDIATE`` already holds the database write lock."""
        return " FOR UPDATE" if self.dialect == "postgresql" else ""

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    # -- connections -----------------------------------------------------------------------
    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            directory = os.path.dirname(self.parsed.target)
            if not os.path.isdir(directory):
                raise StorageError("the SQLite database directory does not exist")
            conn = sqlite3.connect(
                self.parsed.target,
                timeout=_BUSY_TIMEOUT_MS / 1000.0,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                _enable_wal(conn)
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            except BaseException:
                conn.close()
                raise
            return conn
        import psycopg
        from psycopg.rows import dict_row

        target = self.parsed.target
        if "connect_timeout" not in target:  # a stopped or unreachable server: fail in 10 s
            target += ("&" if "?" in target else "?") + "connect_timeout=10"
        pg = psycopg.connect(target, autocommit=True, row_factory=dict_row)
        try:
            schema = self.parsed.schema
            if schema is not None:  # created (once, under a lock) by create_schema
                pg.execute(f'SET search_path TO "{schema}"')
        except BaseException:
            pg.close()
            raise
        return pg

    def _connection(self) -> Any:
        if self._closed:
            raise StorageError("the store is closed")
        pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == pid:
            if self.dialect == "postgresql" and (conn.closed or conn.broken):
                conn = None
            else:
                return conn
        with self._translate():
            conn = self._connect()
        self._local.conn = conn
        self._local.pid = pid
        with self._lock:
            self._all.append((pid, conn))
        return conn

    def _drop_connection(self) -> None:
        """Forget (and close) this thread's connection after a broken transaction."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Close every connection this object opened in this process; later calls fail."""
        self._closed = True
        pid = os.getpid()
        with self._lock:
            conns, self._all = self._all, []
        for owner, conn in conns:
            if owner == pid:
                with contextlib.suppress(Exception):
                    conn.close()

    # -- transactions ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn driver errors into StorageError / IntegrityError (no parameter values)."""
        try:
            yield
        except StorageError:
            raise
        except sqlite3.IntegrityError as e:
            raise IntegrityError(f"constraint violated ({e.args[0] if e.args else ''})") from None
        except sqlite3.Error as e:
            message = e.args[0] if e.args else ""
            raise StorageError(f"SQLite error ({type(e).__name__}: {message})") from None
        except Exception as e:
            if self.dialect == "postgresql" and _is_psycopg_error(e):
                raise _pg_error(e) from None
            raise

    @contextlib.contextmanager
    def transaction(self, write: bool = False) -> Iterator[Transaction]:
        """One transaction on this thread's connection: committed on normal exit, rolled back
        on any exception (which propagates; driver errors as StorageError)."""
        conn = self._begin(write)
        ok = False
        try:
            tx = Transaction(self, conn)
            yield tx
            with self._translate():
                conn.execute("COMMIT")
            ok = True
        finally:
            if not ok:
                try:
                    if self.dialect == "postgresql" or conn.in_transaction:
                        conn.execute("ROLLBACK")
                except Exception:
                    self._drop_connection()

    def _begin(self, write: bool) -> Any:
        """This thread's connection with a transaction begun on it. A PostgreSQL connection
        that died since its last use (the server restarted, or dropped it) fails at BEGIN,
        before any statement ran: it is replaced once, so recovery needs no 503 per thread."""
        if self.dialect == "sqlite":
            conn = self._connection()
            with self._translate():
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            return conn
        begin = "BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        for attempt in (1, 2):
            conn = self._connection()
            try:
                with self._translate():
                    conn.execute(begin)
                return conn
            except StorageError:
                if conn.closed or conn.broken:
                    self._drop_connection()
                    if attempt == 1:
                        continue
                    raise
                try:
                    conn.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 - the connection is unusable: forget it
                    self._drop_connection()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- schema ----------------------------------------------------------------------------
    def create_schema(
        self,
        statements: Sequence[str],
        migrate: Callable[[Transaction], None] | None = None,
    ) -> None:
        """Run ``CREATE ... IF NOT EXISTS`` statements (with ``{REAL}``, ``{BIGINT}``,
        ``{SERIAL}`` type placeholders) in one write transaction, then ``migrate(tx)`` (if
        given) in the same transaction, so it too runs once at a time (PostgreSQL: under the
        advisory lock; SQLite: under ``BEGIN IMMEDIATE``)."""
        with self.transaction(write=True) as tx:
            if self.dialect == "postgresql":
                tx.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK_KEY})")
                if self.parsed.schema is not None:
                    tx.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.parsed.schema}"')
            for statement in statements:
                tx.execute_ddl(statement)
            if migrate is not None:
                migrate(tx)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL (persistent in the file). On a brand-new file several processes may race
    for it and SQLite answers "locked" without waiting, so retry up to the busy timeout."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000.0
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        if mode is None or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError("could not enable WAL journal mode")
        return


class Transaction:
    """Statements inside one open transaction."""

    def __init__(self, db: Database, conn: Any) -> None:
        self._db = db
        self._conn = conn

    @property
    def dialect(self) -> Dialect:
        return self._db.dialect

    @property
    def for_update(self) -> str:
        return self._db.for_update

    def has_column(self, table: str, column: str) -> bool:
        """Whether ``table`` (a plain identifier, in the current schema) has ``column``."""
        if self.dialect == "sqlite":
            rows = self.execute(f"PRAGMA table_info({table})").rows
            return any(r["name"] == column for r in rows)
        return bool(
            self.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = ? AND column_name = ?",
                (table, column),
            ).rows
        )

    def has_table(self, table: str) -> bool:
        """Whether ``table`` exists in the current schema (PostgreSQL) or database (SQLite)."""
        if self.dialect == "sqlite":
            sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        else:
            sql = (
                "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
                "AND table_name = ?"
            )
        return bool(self.execute(sql, (table,)).rows)

    def execute_ddl(self, statement: str) -> Cursor:
        """Run one DDL statement after filling its ``{REAL}``, ``{BIGINT}`` and ``{SERIAL}``
        column-type placeholders for this dialect."""
        return self.execute(statement.format(**_COLUMN_TYPES[self.dialect]))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement; returns its rows as dicts (empty for non-queries)."""
        with self._db._translate():
            cur = self._conn.execute(self._db._sql(sql), tuple(params))
            if cur.description is None:
                return Cursor([], cur.rowcount)
            if self._db.dialect == "sqlite":
                names = [d[0] for d in cur.description]
                rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            else:
                rows = list(cur.fetchall())
            return Cursor(rows, cur.rowcount)


def _is_psycopg_error(error: BaseException) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return False
    return isinstance(error, psycopg.Error)


def _pg_error(error: BaseException) -> StorageError:
    """StorageError for a psycopg error. The server's primary message is kept only for
    classes whose messages name objects, never values (23 integrity, 40 rollback, 42 syntax or
    undefined object, 53-58 resources/system); data exceptions (22...) may quote a value."""
    import psycopg

    diag = getattr(error, "diag", None)
    state = getattr(error, "sqlstate", None) or ""
    primary = ""
    if state[:2] in ("23", "40", "42", "53", "54", "55", "57", "58"):
        primary = getattr(diag, "message_primary", None) or ""
    elif not state and isinstance(error, psycopg.OperationalError):
        primary = (str(error).strip().splitlines() or [""])[0]  # connection failures
    text = f"PostgreSQL error ({type(error).__name__} {state}: {primary})"
    if isinstance(error, psycopg.IntegrityError):
        return IntegrityError(text)
    return StorageError(text)
