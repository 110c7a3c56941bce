"""Options given on the command line as ``NAME=VALUE``: what a backend plugin declares it
takes, and the coercion of a value's text to the option's type (detector options too)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError


@dataclass(frozen=True)
class BackendOption:
    """An option a backend takes when it loads a model, given as ``harness scan MODEL -b
    NAME=VALUE`` (``--backend-option``). ``type`` is ``int``, ``float``, ``str`` or
    ``bool``; a ``default`` of None leaves the choice to the backend (``help`` says what it
    picks). The backend's factory receives it as the keyword argument ``NAME``."""

    name: str
    type: type
    default: Any
    help: str


def coerce(value: Any, kind: type, key: str) -> Any:
    """A value from the command line (text) as ``kind``: ``int``, ``float`` or ``bool``
    (``1/true/yes/on``, ``0/false/no/off``); other kinds and non-text values as they are."""
    if not isinstance(value, str) or kind not in (bool, int, float):
        return value
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return kind(value)
    except ValueError:
        raise HarnessError(f"option {key}={value!r} is not a valid {kind.__name__}") from None


def parse_assignments(items: Sequence[str], flag: str, example: str) -> dict[str, str]:
    """``NAME=VALUE`` items as a dict (one clear line for an item without ``=``)."""
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"bad {flag} {item!r}: write NAME=VALUE, e.g. {example}")
        parsed[key.strip().replace("-", "_")] = value
    return parsed


def resolve_backend_options(backend: str, declared: Sequence[BackendOption],
                            given: dict[str, Any]) -> dict[str, Any]:
    """The options ``given`` to ``backend``, each checked against what it ``declared`` and
    coerced to its type; None values (not given) are left out."""
    by_name = {o.name: o for o in declared}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        raise HarnessError(f"backend {backend!r} has no option {', '.join(unknown)} "
                           f"(its options: {known}; see harness plugins)")
    return {k: coerce(v, by_name[k].type, k) for k, v in given.items() if v is not None}
