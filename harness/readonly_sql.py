"""``harness sql``: one user statement, read-only, stopped at a timeout, on SQLite or
PostgreSQL.

SQLite: a read-only connection with an authorizer that refuses writes, ``ATTACH``, state-
changing ``PRAGMA``s and extension loading; a progress handler stops the statement at the
timeout. PostgreSQL: a ``READ ONLY`` transaction with a local ``statement_timeout``, always
rolled back (so no ``SET`` outlives the statement); the statement must be one query
(``SELECT``, ``WITH``, ``VALUES``, ``TABLE``, ``SHOW``, ``EXPLAIN``), which rules out
``COPY ... TO PROGRAM``, and is sent with the extended protocol, which refuses a second
statement.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from harness.db import BUSY_TIMEOUT_MS, open_db
from harness.errors import DatabaseError, first_line

DEFAULT_TIMEOUT_S = 10.0

_ALLOWED_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
_DENIED_FUNCTIONS = {"load_extension", "writefile", "readfile", "edit", "fts3_tokenizer"}
_QUERY_KEYWORDS = {"select", "with", "values", "table", "show", "explain"}
_LEADING_NOISE = re.compile(r"(\s+|--[^\n]*(\n|$)|/\*.*?\*/|\()", re.S)
_PROGRESS_STEPS = 10_000  # SQLite virtual-machine steps between two looks at the clock


def query_readonly(url: str, sql: str, params: Sequence[Any] = (),
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement and return (column names, rows). Writes are refused, and
    a statement still running after ``timeout_s`` seconds is stopped; either raises
    ``DatabaseError`` with one line."""
    if not timeout_s > 0:
        raise DatabaseError("--timeout must be a positive number of seconds")
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return _sqlite(url, sql, params, timeout_s)
    if backend == "postgresql":
        return _postgresql(url, sql, params, timeout_s)
    raise DatabaseError(f"harness sql works on SQLite and PostgreSQL databases, not {backend}; "
                        "query it with its own client")


# --- SQLite ---------------------------------------------------------------------------------


def _authorizer(action: int, arg1: str | None, arg2: str | None, _db: str | None,
                _trigger: str | None) -> int:
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _DENIED_FUNCTIONS \
            else sqlite3.SQLITE_OK
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in (
            "table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list"):
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _sqlite(url: str, sql: str, params: Sequence[Any], timeout_s: float
            ) -> tuple[list[str], list[tuple]]:
    path = Path(make_url(url).database or "")
    if not path.exists():
        raise DatabaseError(f"no database at {path}: run `harness scan` first")
    open_db(url).dispose()  # brings an old schema up to date, refuses a newer or corrupt one
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    deadline = time.monotonic() + timeout_s
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.enable_load_extension(False) if hasattr(conn, "enable_load_extension") else None
        conn.set_authorizer(_authorizer)
        # a non-zero answer interrupts the statement ("interrupted")
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)
        try:
            cur = conn.execute(sql, params)
            if cur.description is None:
                raise DatabaseError("only SELECT statements (and WITH ... SELECT) are allowed")
            cols = [d[0] for d in cur.description]
            return cols, cur.fetchall()
        except sqlite3.Warning as exc:  # e.g. "You can only execute one statement at a time."
            raise DatabaseError(f"SQL error: {exc}") from None
        except sqlite3.DatabaseError as exc:
            if time.monotonic() > deadline and "interrupt" in str(exc):
                raise DatabaseError(_stopped(timeout_s)) from None
            msg = str(exc)
            if "not authorized" in msg or "readonly" in msg:
                msg += " (harness sql is read-only: SELECT only, no ATTACH or PRAGMA writes)"
            raise DatabaseError(f"SQL error: {msg}") from None
    finally:
        conn.close()


def _stopped(timeout_s: float) -> str:
    return (f"the query was stopped after {timeout_s:g} s: give it more time with "
            "--timeout SECONDS")


# --- PostgreSQL -----------------------------------------------------------------------------


def first_keyword(sql: str) -> str:
    """The statement's first keyword, lower case, past comments and opening parentheses."""
    pos = 0
    while m := _LEADING_NOISE.match(sql, pos):
        pos = m.end()
    word = re.match(r"[A-Za-z_]+", sql[pos:])
    return word.group(0).lower() if word else ""


def _postgresql(url: str, sql: str, params: Sequence[Any], timeout_s: float
                ) -> tuple[list[str], list[tuple]]:
    open_db(url).dispose()  # brings an old schema up to date, refuses a newer one
    engine = create_engine(url, poolclass=NullPool)
    try:
        raw = engine.raw_connection()
    except sa_exc.DBAPIError as exc:
        raise DatabaseError(f"cannot connect: {first_line(exc.orig or exc)}") from None
    try:
        return run_readonly_postgresql(raw.driver_connection, sql, params, timeout_s)
    finally:
        raw.close()
        engine.dispose()


def run_readonly_postgresql(conn: Any, sql: str, params: Sequence[Any] = (),
                            timeout_s: float = DEFAULT_TIMEOUT_S
                            ) -> tuple[list[str], list[tuple]]:
    """Run one query on an open psycopg connection in a read-only transaction with a local
    statement timeout, and roll the transaction back: nothing it does (a ``SET``, a
    ``set_config``) outlives it."""
    import psycopg

    keyword = first_keyword(sql)
    if keyword not in _QUERY_KEYWORDS:
        raise DatabaseError(f"only queries are allowed (SELECT, WITH, VALUES, TABLE, SHOW, "
                            f"EXPLAIN), not {keyword.upper() or 'this statement'}")
    conn.rollback()  # a clean start: the next statement opens our transaction
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION READ ONLY")
            cur.execute(f"SET LOCAL statement_timeout = {max(1, round(timeout_s * 1000))}")
            # pipeline mode sends the extended protocol: one statement, never two
            with conn.pipeline():
                cur.execute(sql, list(params) if params else None)
            if cur.description is None:
                raise DatabaseError("only queries that return rows are allowed")
            cols = [d.name for d in cur.description]
            return cols, [tuple(r) for r in cur.fetchall()]
    except psycopg.errors.QueryCanceled:
        raise DatabaseError(_stopped(timeout_s)) from None
    except psycopg.Error as exc:
        msg = first_line(exc)
        if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
            msg += " (harness sql is read-only)"
        raise DatabaseError(f"SQL error: {msg}") from None
    finally:
        conn.rollback()

