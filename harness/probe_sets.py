"""Probe sets: named prompt templates that behavioural detectors fill with a token.

A template marks each place the token under test goes with ``{token}`` (as often as the
prompt needs, n-shot prompts repeat it) and ends with ``{repeat}``, where the model's repeat
of the token should start. Prompts are built by substituting the token's *id* into the
encoded template, so the token under test is always exactly one token, as Land & Bartolo do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

TOKEN_SLOT = "{token}"
REPEAT_MARK = "{repeat}"
# Tried in turn as the stand-in that marks the slots; the first that encodes to one token,
# the same one at every slot, wins.
_PLACEHOLDERS = ("X", "Z", "Q", "@", "#", "A", "0")


@dataclass(frozen=True)
class ProbeSet:
    """A named list of prompt templates (see the module docstring), with a label for each
    template and, optionally, a list of tokens known to be glitchy as ``(id, text)``.

    ``scouts`` may give, per template, a shorter template of the same kind (``None`` where
    there is none): a verifier may ask it first and skip the long prompt for a token the
    short one leaves far below the threshold (see ``repeat-probe``'s ``scout_below``)."""

    name: str
    description: str
    templates: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    known_tokens: tuple[tuple[int, str], ...] = field(default=())
    scouts: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        if self.scouts and len(self.scouts) != len(self.templates):
            raise ValueError(f"probe set {self.name!r}: {len(self.scouts)} scouts for "
                             f"{len(self.templates)} templates")
        for t in self.templates + tuple(s for s in self.scouts if s is not None):
            if TOKEN_SLOT not in t or not t.endswith(REPEAT_MARK) or t.count(REPEAT_MARK) != 1:
                raise ValueError(f"probe set {self.name!r}: template {t[:60]!r}... needs "
                                 f"{TOKEN_SLOT} and must end with {REPEAT_MARK}")
        if not self.labels:
            object.__setattr__(self, "labels",
                               tuple(f"t{i}" for i in range(len(self.templates))))
        if len(self.labels) != len(self.templates):
            raise ValueError(f"probe set {self.name!r}: {len(self.labels)} labels for "
                             f"{len(self.templates)} templates")


@dataclass(frozen=True)
class PromptPlan:
    """One template encoded once: ``prefix`` (shared by every token, cacheable) and ``tail``
    with the token's id to be written at ``slots``."""

    label: str
    prefix: tuple[int, ...]
    tail: tuple[int, ...]
    slots: tuple[int, ...]
    text: str
    checkpoint: int | None = None  # the length of its scout's tail (see ProbeSet.scouts)

    def tail_for(self, token_id: int) -> list[int]:
        ids = list(self.tail)
        for s in self.slots:
            ids[s] = token_id
        return ids

    def full_ids(self, token_id: int) -> list[int]:
        return list(self.prefix) + self.tail_for(token_id)

    def token_text(self, token_text: str) -> str:
        """The prompt as text with the token spelled out (for black-box backends)."""
        return self.text.replace(TOKEN_SLOT, token_text)


def find_probe_set(name: str) -> ProbeSet:
    """The registered probe set called ``name``; one line naming the known ones if none is."""
    from harness.errors import HarnessError
    from harness.plugins import registry

    probes = registry().probes
    if name not in probes:
        raise HarnessError(f"unknown probe set {name!r} (known: {', '.join(sorted(probes))})")
    return probes[name].probe_set


def plan_prompt(template: str, label: str, encode: Callable[[str], list[int]],
                bos: Sequence[int] = ()) -> PromptPlan:
    """Encode ``template`` once with a placeholder token at every slot; ``bos`` (what the
    tokenizer puts before a text) starts the shared prefix.

    Falls back to encoding the pieces between slots separately when no placeholder stays a
    single token everywhere (tokenizers that merge it with its neighbours).
    """
    plan = _plan(template, label, encode)
    return replace(plan, prefix=tuple(bos) + plan.prefix)


def plan_probe_set(probe_set: ProbeSet, encode: Callable[[str], list[int]],
                   bos: Sequence[int] = ()) -> list[PromptPlan]:
    """Every template of ``probe_set`` planned; where it has a scout, the scout's tail must
    open the template's tail, and its length is the template's ``checkpoint``."""
    from harness.errors import HarnessError

    plans = []
    scouts = probe_set.scouts or (None,) * len(probe_set.templates)
    for template, label, scout in zip(probe_set.templates, probe_set.labels, scouts,
                                      strict=True):
        plan = plan_prompt(template, label, encode, bos)
        if scout is not None:
            short = plan_prompt(scout, label, encode, bos)
            n = len(short.tail)
            if (short.prefix != plan.prefix or plan.tail[:n] != short.tail
                    or short.slots != tuple(s for s in plan.slots if s < n) or n >= len(plan.tail)):
                raise HarnessError(f"probe set {probe_set.name!r}: the scout of {label!r} is "
                                   "not an opening of its prompt as this tokenizer encodes it")
            plan = replace(plan, checkpoint=n)
        plans.append(plan)
    return plans


def _plan(template: str, label: str, encode: Callable[[str], list[int]]) -> PromptPlan:
    body = template[: -len(REPEAT_MARK)]
    n_slots = body.count(TOKEN_SLOT)
    for ph in _PLACEHOLDERS:
        ph_ids = encode(ph)
        if len(ph_ids) != 1 or ph in body.replace(TOKEN_SLOT, ""):
            continue
        ids = encode(body.replace(TOKEN_SLOT, ph))
        slots = [i for i, t in enumerate(ids) if t == ph_ids[0]]
        if len(slots) == n_slots:
            return _split(label, ids, slots, body)
    pieces = body.split(TOKEN_SLOT)
    ids, slots = [], []
    for k, piece in enumerate(pieces):
        ids.extend(encode(piece) if piece else [])
        if k < len(pieces) - 1:
            slots.append(len(ids))
            ids.append(-1)
    return _split(label, ids, slots, body)


def _split(label: str, ids: Sequence[int], slots: Sequence[int], body: str) -> PromptPlan:
    first = slots[0]
    return PromptPlan(label=label, prefix=tuple(ids[:first]), tail=tuple(ids[first:]),
                      slots=tuple(s - first for s in slots), text=body)
