"""Probe sets: named prompt templates that behavioural detectors fill with a token."""

from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_SLOT = "{token}"  # where the token under test goes
REPEAT_MARK = "{repeat}"  # where the model's repeat of the token is expected to start


@dataclass(frozen=True)
class ProbeSet:
    """A named list of prompt templates, each with a ``{token}`` slot and a ``{repeat}``
    mark at the end of the prompt, where the repeat should begin."""

    name: str
    description: str
    templates: tuple[str, ...] = ()
    known_tokens: tuple[tuple[int, str], ...] = field(default=())

    def __post_init__(self) -> None:
        for t in self.templates:
            if TOKEN_SLOT not in t or not t.endswith(REPEAT_MARK):
                raise ValueError(f"probe set {self.name!r}: template {t!r} needs {TOKEN_SLOT} "
                                 f"and must end with {REPEAT_MARK}")
