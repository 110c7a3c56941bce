"""Opening the results database (migrations applied on open)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url

import migrations
from harness.errors import DatabaseError, first_line
from harness.paths import display_url

BUSY_TIMEOUT_MS = 60_000
SUPPORTED = ("sqlite", "postgresql")
MIGRATION_LOCK = 0x6C17C4  # PostgreSQL advisory lock key taken while migrating


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
    if parsed.get_backend_name() not in SUPPORTED:
        raise DatabaseError(f"glitch-harness stores results in SQLite or PostgreSQL, not "
                            f"{parsed.get_backend_name()} ({display_url(url)})")
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database:
        path = Path(parsed.database)
        if path.is_dir():
            raise DatabaseError(f"{path} is a directory, not a database file")
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}
                               if is_sqlite else {})
    except ImportError as exc:  # the driver is missing
        raise DatabaseError(f"cannot open database {display_url(url)}: {exc.msg}; for "
                            "PostgreSQL install the driver: pip install "
                            "'glitch-harness[pg]'") from None
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _begin_immediate)
    try:
        _migrate(engine)
    except sa_exc.DatabaseError as exc:
        engine.dispose()
        raise DatabaseError(f"cannot open database {display_url(url)}: "
                            f"{first_line(exc.orig or exc)}") from None
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
                f"the database {display_url(engine.url)} has schema revision {current!r}, "
                "written by a newer glitch-harness; upgrade glitch-harness to read it"
            ) from None
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # several processes opening a new database at once: one migrates, the others
            # wait here and find it done (alembic reads the revision again below)
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
