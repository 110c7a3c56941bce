"""Reading and writing a results database in tests, on SQLite or PostgreSQL alike: SQL with
``?`` placeholders through SQLAlchemy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from harness.paths import db_url


def _bound(sql: str, params: tuple) -> tuple[Any, dict[str, Any]]:
    names = iter(range(len(params)))
    return text(re.sub(r"\?", lambda _: f":p{next(names)}", sql)), \
        {f"p{i}": p for i, p in enumerate(params)}


def _engine(db: str | Path) -> Any:
    url = db_url(str(db))
    return create_engine(url, poolclass=NullPool,
                         connect_args={"timeout": 30} if url.startswith("sqlite") else {})


def query(db: str | Path, sql: str, *params: Any) -> list[tuple]:
    """Rows of ``sql`` on the database ``db`` (a path or URL), as tuples; bytes as bytes."""
    engine = _engine(db)
    try:
        with engine.connect() as conn:
            stmt, bound = _bound(sql, params)
            return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                    for r in conn.execute(stmt, bound)]
    finally:
        engine.dispose()


def execute(db: str | Path, sql: str, *many: tuple) -> None:
    """Run a write statement once per parameter tuple in ``many`` (once without)."""
    engine = _engine(db)
    try:
        with engine.begin() as conn:
            for params in many or ((),):
                stmt, bound = _bound(sql, params)
                conn.execute(stmt, bound)
    finally:
        engine.dispose()


def is_postgres(db: str | Path) -> bool:
    """Whether ``db`` is a PostgreSQL URL."""
    return str(db).startswith("postgresql")
