"""The results database: migrations on open, schema checks, read-only SQL."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from harness.db import alembic_config, head_revision, open_db
from harness.errors import DatabaseError
from harness.readonly_sql import query_readonly, run_readonly_postgresql
from harness.schema import Base
from tests.dbs import execute, query


def test_exactly_one_head():
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1
    assert head_revision() == heads[0]


VIEWS = {"latest_runs", "latest_findings", "latest_verdicts", "flagged_tokens",
         "final_verdicts", "glitch_tokens", "shared_tokens", "verdict_pairs"}


def test_blank_database_reaches_head_and_matches_models(db_url):
    engine = open_db(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == head_revision()
        assert compare_metadata(ctx, Base.metadata) == []
    views = set(inspect(engine).get_view_names())
    assert {"latest_runs", "latest_findings", "latest_verdicts", "flagged_tokens"} <= views
    assert views == VIEWS  # the same views on both databases
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_open_is_idempotent_and_fast_when_at_head(db_url):
    url = db_url
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


def _fill(db_url: str) -> str:
    open_db(db_url).dispose()
    execute(db_url, "INSERT INTO models (ref, backend, fingerprint, tokenizer_hash, vocab_size, "
                    "meta_json, created_utc) VALUES ('x:y', 'x', 'fp', 'th', 2, '{}', "
                    "'2026-01-01')")
    execute(db_url, "INSERT INTO tokens (model_id, token_id, raw, text, category) "
                    "VALUES (1, 0, ?, '\\xff', 'byte')", (b"\xff",))
    return db_url


@pytest.fixture
def db_with_rows(db_url):
    return _fill(db_url)


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
    db = db_with_rows
    code, out, _ = cli("sql", "SELECT token_id, raw, category FROM tokens", "--db", db, "--json")
    assert code == 0
    assert '"raw": "ff"' in out and '"category": "byte"' in out
    code, out, _ = cli("sql", "SELECT token_id, category FROM tokens", "--db", db, "--csv")
    assert out.splitlines() == ["token_id,category", "0,byte"]
    code, out, _ = cli("sql", "SELECT ref FROM models", "--db", db)
    assert code == 0 and "x:y" in out


def test_sql_cli_errors_are_one_line(cli, db_with_rows, tmp_path):
    db = db_with_rows
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


RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


def test_sql_stops_a_runaway_query_at_the_timeout(cli, db_with_rows):
    started = time.monotonic()
    code, out, err = cli("sql", RUNAWAY, "--db", db_with_rows, "--timeout", "1")
    assert code == 2 and err.startswith("error:") and err.strip().count("\n") == 0, err
    assert "stopped after 1 s" in err and "--timeout" in err
    assert time.monotonic() - started < 30
    code, _, err = cli("sql", "SELECT 1", "--db", db_with_rows, "--timeout", "0")
    assert code == 2 and "--timeout must be a positive" in err


@pytest.fixture
def pg_rows(pg_server):
    name, url = pg_server.new_database()
    yield _fill(url)
    pg_server.drop_database(name)


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
    "/* a comment */ (COPY models TO PROGRAM 'touch {marker}')",
    "SELECT 1; COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
    "WITH gone AS (DELETE FROM models RETURNING id) SELECT * FROM gone",
    "SELECT nextval('models_id_seq')",
    "SELECT 1; COMMIT",
    "SET search_path = nowhere",
    "EXPLAIN ANALYZE WITH gone AS (DELETE FROM models RETURNING id) SELECT * FROM gone",
])
def test_sql_on_postgresql_is_read_only(pg_rows, tmp_path, sql):
    marker = tmp_path / "written-by-the-server"
    with pytest.raises(DatabaseError):
        query_readonly(pg_rows, sql.format(marker=marker))
    assert not marker.exists()
    assert query_readonly(pg_rows, "SELECT count(*) FROM models")[1] == [(1,)]


def test_sql_on_postgresql_leaves_no_setting_behind(pg_rows):
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(pg_rows)
    with psycopg.connect(host=url.query["host"], user=url.username, dbname=url.database) as conn:
        before = conn.execute("SHOW search_path").fetchone()
        cols, rows = run_readonly_postgresql(
            conn, "SELECT set_config('search_path', 'nowhere', false), "
                  "current_setting('transaction_read_only'), "
                  "current_setting('statement_timeout')", timeout_s=3)
        assert rows == [("nowhere", "on", "3s")]
        assert conn.execute("SHOW search_path").fetchone() == before
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert conn.execute("SHOW transaction_read_only").fetchone() == ("off",)


def test_sql_on_postgresql_through_the_cli(cli, pg_rows):
    code, out, err = cli("sql", "SELECT ref, 'a%' AS pattern FROM models", "--db", pg_rows,
                         "--csv")
    assert code == 0, err
    assert out.splitlines() == ["ref,pattern", "x:y,a%"]
    # timestamps and numerics as JSON (SQLite hands back text and integers)
    code, out, err = cli("sql", "SELECT created_utc, sum(vocab_size) AS n, avg(vocab_size) AS a "
                         "FROM models GROUP BY created_utc", "--db", pg_rows, "--json")
    assert code == 0, err
    assert json.loads(out) == [{"created_utc": "2026-01-01 00:00:00", "n": 2, "a": 2}]
    code, _, err = cli("sql", "COPY models TO PROGRAM 'true'", "--db", pg_rows)
    assert code == 2 and "only queries are allowed" in err and err.count("\n") == 1
    assert query(pg_rows, "SELECT count(*) FROM models") == [(1,)]


def test_other_databases_are_refused_with_one_line(cli):
    with pytest.raises(DatabaseError, match="SQLite or PostgreSQL, not mysql"):
        open_db("mysql://user@host/db")
    code, _, err = cli("sql", "SELECT 1", "--db", "mssql+pyodbc://user@dsn")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
