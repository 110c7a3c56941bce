"""Opening the results database (migrations applied on open) and read-only SQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url

import migrations
from harness.errors import DatabaseError

BUSY_TIMEOUT_MS = 60_000


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations have {len(heads)} heads: {heads}")
    return heads[0]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite would open transactions itself, as DEFERRED; _begin_immediate does it instead
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _begin_immediate(conn: Any) -> None:
    """Every transaction takes the write lock when it starts, waiting up to the busy timeout
    for another process's: a DEFERRED transaction that reads and then writes fails at once
    with "database is locked" when another writer got in between."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def open_db(url: str) -> Engine:
    """Create an engine for ``url`` and bring its schema to the head revision.

    A database written by a newer glitch-harness (an unknown revision) or a file that is not
    a SQLite database is refused with a ``DatabaseError``.
    """
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database:
        path = Path(parsed.database)
        if path.is_dir():
            raise DatabaseError(f"{path} is a directory, not a database file")
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}
                           if is_sqlite else {})
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _begin_immediate)
    try:
        _migrate(engine)
    except sa_exc.DatabaseError as exc:
        engine.dispose()
        raise DatabaseError(f"cannot open database {_display(url)}: "
                            f"{_first_line(exc.orig or exc)}") from None
    return engine


def _migrate(engine: Engine) -> None:
    script = ScriptDirectory.from_config(alembic_config())
    head = head_revision()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return
    if current is not None:
        try:
            script.get_revision(current)
        except Exception:
            raise DatabaseError(
                f"the database {_display(str(engine.url))} has schema revision {current!r}, "
                "written by a newer glitch-harness; upgrade glitch-harness to read it"
            ) from None
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _display(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- read-only SQL -------------------------------------------------------------------------

_ALLOWED_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
_DENIED_FUNCTIONS = {"load_extension", "writefile", "readfile", "edit", "fts3_tokenizer"}


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


def query_readonly(url: str, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement; writes, ATTACH, PRAGMAs that change state and extension
    loading are refused. Returns (column names, rows)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        raise DatabaseError("harness sql works on SQLite databases; "
                            "query other databases with their own client")
    path = Path(parsed.database or "")
    if not path.exists():
        raise DatabaseError(f"no database at {path}: run `harness scan` first")
    open_db(url).dispose()  # brings an old schema up to date, refuses a newer or corrupt one
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.enable_load_extension(False) if hasattr(conn, "enable_load_extension") else None
        conn.set_authorizer(_authorizer)
        try:
            cur = conn.execute(sql, params)
            if cur.description is None:
                raise DatabaseError("only SELECT statements (and WITH ... SELECT) are allowed")
            cols = [d[0] for d in cur.description]
            return cols, cur.fetchall()
        except sqlite3.Warning as exc:  # e.g. "You can only execute one statement at a time."
            raise DatabaseError(f"SQL error: {exc}") from None
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            if "not authorized" in msg or "readonly" in msg:
                msg += " (harness sql is read-only: SELECT only, no ATTACH or PRAGMA writes)"
            raise DatabaseError(f"SQL error: {msg}") from None
    finally:
        conn.close()
