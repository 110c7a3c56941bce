"""Where glitch-harness keeps its database and caches (platformdirs, overridable by env)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from sqlalchemy.engine import URL, make_url

APP = "glitch-harness"


def data_dir() -> Path:
    """User data dir; ``HARNESS_HOME`` overrides it."""
    base = os.environ.get("HARNESS_HOME")
    path = Path(base) if base else Path(platformdirs.user_data_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """User cache dir (converted models, assembled GGUF files); ``HARNESS_CACHE`` overrides it."""
    base = os.environ.get("HARNESS_CACHE")
    path = Path(base) if base else Path(platformdirs.user_cache_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_db_url() -> str:
    """``HARNESS_DB`` (a path, or a SQLite or PostgreSQL URL), else ``results.db`` in the
    data dir."""
    env = os.environ.get("HARNESS_DB")
    if env:
        return db_url(env)
    return db_url(str(data_dir() / "results.db"))


def db_url(path_or_url: str) -> str:
    """Turn a plain file path into a SQLite URL; leave URLs alone."""
    if "://" in path_or_url:
        return path_or_url
    return f"sqlite:///{Path(path_or_url).expanduser().resolve()}"


def display_url(url: str | URL) -> str:
    """A database URL as messages show it: a SQLite database's file path (``:memory:`` for an
    in-memory one), any other URL with its password hidden."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)
