"""The results database: migrations on open, schema checks, read-only SQL."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from harness.db import alembic_config, head_revision, open_db, query_readonly
from harness.errors import DatabaseError
from harness.schema import Base


def test_exactly_one_head():
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1
    assert head_revision() == heads[0]


def test_blank_database_reaches_head_and_matches_models(tmp_path):
    engine = open_db(f"sqlite:///{tmp_path / 'blank.db'}")
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == head_revision()
        assert compare_metadata(ctx, Base.metadata) == []
    views = set(inspect(engine).get_view_names())
    assert {"latest_runs", "latest_findings", "latest_verdicts", "flagged_tokens"} <= views
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_open_is_idempotent_and_fast_when_at_head(tmp_path):
    url = f"sqlite:///{tmp_path / 'again.db'}"
    open_db(url).dispose()
    engine = open_db(url)  # second open: no migration, no error
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM models").scalar() == 0


def test_database_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "newer.db"
    open_db(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(DatabaseError, match="newer glitch-harness"):
        open_db(f"sqlite:///{path}")


def test_corrupt_database_is_refused(tmp_path):
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseError, match="cannot open database"):
        open_db(f"sqlite:///{path}")


@pytest.fixture
def db_with_rows(tmp_path):
    path = tmp_path / "rows.db"
    engine = open_db(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO models (ref, backend, fingerprint, tokenizer_hash, vocab_size, "
            "meta_json, created_utc) VALUES ('x:y', 'x', 'fp', 'th', 2, '{}', '2026-01-01')")
        conn.exec_driver_sql("INSERT INTO tokens (model_id, token_id, raw, text, category) "
                             "VALUES (1, 0, x'ff', '\\xff', 'byte')")
    return f"sqlite:///{path}"


@pytest.mark.parametrize("sql", [
    "INSERT INTO models (ref) VALUES ('x')",
    "DELETE FROM models",
    "UPDATE models SET ref = 'x'",
    "DROP TABLE findings",
    "CREATE TABLE t (x)",
    "ATTACH DATABASE '/tmp/other.db' AS other",
    "PRAGMA journal_mode = DELETE",
    "SELECT load_extension('/tmp/evil.so')",
    "SELECT 1; DELETE FROM models",
])
def test_sql_refuses_writes_attach_and_extensions(db_with_rows, sql):
    with pytest.raises(DatabaseError):
        query_readonly(db_with_rows, sql)
    cols, rows = query_readonly(db_with_rows, "SELECT count(*) FROM models")
    assert rows == [(1,)]


def test_sql_cli_formats(cli, db_with_rows, tmp_path):
    db = db_with_rows.removeprefix("sqlite:///")
    code, out, _ = cli("sql", "SELECT token_id, raw, category FROM tokens", "--db", db, "--json")
    assert code == 0
    assert '"raw": "ff"' in out and '"category": "byte"' in out
    code, out, _ = cli("sql", "SELECT token_id, category FROM tokens", "--db", db, "--csv")
    assert out.splitlines() == ["token_id,category", "0,byte"]
    code, out, _ = cli("sql", "SELECT ref FROM models", "--db", db)
    assert code == 0 and "x:y" in out


def test_sql_cli_errors_are_one_line(cli, db_with_rows, tmp_path):
    db = db_with_rows.removeprefix("sqlite:///")
    for args in (("sql", "SELEC nonsense", "--db", db),
                 ("sql", "DELETE FROM models", "--db", db),
                 ("sql", "SELECT 1", "--db", str(tmp_path / "missing.db"))):
        code, out, err = cli(*args)
        assert code == 2, args
        assert err.startswith("error:") and err.strip().count("\n") == 0, err


def test_db_path(cli, harness_home, tmp_path):
    code, out, _ = cli("db", "path")
    assert code == 0 and out.strip() == str(harness_home / "results.db")
    code, out, _ = cli("db", "path", "--db", str(tmp_path / "x.db"))
    assert out.strip() == str(tmp_path / "x.db")
