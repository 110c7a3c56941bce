"""Errors a user can cause and fix: the CLI prints them as one line and exits 2."""


class HarnessError(Exception):
    """A user-facing error: bad model name, broken file, bad SQL, unreachable server.

    The message is printed as is, on one line, without a traceback.
    """


class UnknownModelError(HarnessError):
    """The model reference names no alias, backend, file or folder that can be loaded."""


class ModelLoadError(HarnessError):
    """The model exists but could not be loaded (corrupt file, no network for a hub id, ...)."""


class DatabaseError(HarnessError):
    """The results database cannot be opened or queried (newer schema, corrupt file, bad SQL)."""


def first_line(exc: BaseException | str) -> str:
    """The first line of an error's message (at most 200 characters), or its type's name."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:200]
