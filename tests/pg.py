"""A throwaway PostgreSQL server for the tests: Debian's binaries, ``initdb`` and ``pg_ctl`` in
a temporary directory, listening on a unix socket only, run as the ``postgres`` user (the
server refuses to run as root)."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def _pg_bin() -> Path:
    """``$HARNESS_PG_BIN``, else Debian's newest /usr/lib/postgresql/N/bin."""
    if os.environ.get("HARNESS_PG_BIN"):
        return Path(os.environ["HARNESS_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
USER = "postgres"
# a test server: durability off, for speed
SERVER_OPTIONS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                  "-c max_connections=200")


def missing() -> str | None:
    """Why no server can be started here, or None."""
    for tool in ("initdb", "pg_ctl"):
        if not (PG_BIN / tool).is_file():
            return (f"PostgreSQL's {tool} is not in {PG_BIN}: install Debian's postgresql "
                    "package (`make install` does)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed: pip install -e '.[pg]'"
    return None


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120,
                          check=False)


def _ensure_user() -> None:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)


class Server:
    """One running server; ``new_database`` gives each test a database of its own."""

    def __init__(self) -> None:
        if os.geteuid() == 0:
            _ensure_user()
        self.dir = Path(tempfile.mkdtemp(prefix="harness-pg-"))
        self.data = self.dir / "data"
        self._names = itertools.count(1)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._check(_as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", USER,
                                 "-A", "trust", "--no-sync", "-E", "UTF8"), "initdb")
        self._check(_as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w",
            "-o", f"-k {self.dir} -c listen_addresses='' {SERVER_OPTIONS}", "start"),
            "pg_ctl start")

    def _check(self, done: subprocess.CompletedProcess, what: str) -> None:
        if done.returncode != 0:
            log = self.dir / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            self.stop()
            raise RuntimeError(f"{what} failed: {done.stderr[-2000:]}{tail}")

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://{USER}@/{database}?host={self.dir}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the superuser."""
        import psycopg

        with psycopg.connect(host=str(self.dir), user=USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> tuple[str, str]:
        """A fresh empty database: (name, URL)."""
        name = f"t{next(self._names)}"
        self.admin(f"CREATE DATABASE {name}")
        return name, self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a test's database, closing whatever connections it left open."""
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        """Stop the server at once and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                         "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
