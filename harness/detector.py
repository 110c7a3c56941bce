"""The detector interface and what detectors produce."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from harness.backend import Backend, Capability
from harness.errors import HarnessError
from harness.options import coerce
from harness.verdicts import OK, SUSPECT
from harness.vocab import Vocab


@dataclass
class Finding:
    """What a detector concluded about one token."""

    token_id: int
    score: float | None
    verdict: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class FindingArrays:
    """A batch of findings as arrays (one entry per token): the fast path for detectors that
    compute whole-vocabulary arrays. ``evidence`` maps a name to one number per token;
    ``evidence_texts``, where given, is each token's evidence as a JSON object instead."""

    token_ids: np.ndarray
    scores: np.ndarray
    verdicts: np.ndarray
    evidence: dict[str, np.ndarray] = field(default_factory=dict)
    evidence_texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def evidence_json(self) -> list[str]:
        """One JSON object per token, formatted by numpy rather than a json.dumps per row."""
        if self.evidence_texts is not None:
            return list(self.evidence_texts)
        if not self.evidence:
            return ["{}"] * len(self)
        parts = []
        for key, values in self.evidence.items():
            values = np.asarray(values, dtype=np.float64)
            text = np.char.mod(f'"{key}": %.7g', values)
            parts.append(np.where(np.isfinite(values), text, f'"{key}": null'))
        joined = parts[0]
        for part in parts[1:]:
            joined = np.char.add(np.char.add(joined, ", "), part)
        return np.char.add(np.char.add("{", joined), "}").tolist()

    def rows(self) -> list[tuple]:
        """``(token_id, score, verdict, evidence_json)`` per token, as ``store.insert_findings``
        takes them (a score that is not finite as None)."""
        scores = [None if not np.isfinite(s) else s for s in self.scores.astype(float).tolist()]
        return list(zip(self.token_ids.tolist(), scores, np.asarray(self.verdicts).tolist(),
                        self.evidence_json(), strict=True))


@dataclass
class ScanContext:
    """What a detector gets to work with."""

    backend: Backend
    vocab: Vocab
    categories: np.ndarray
    progress: Callable[[int], None] = lambda n: None
    scope: np.ndarray | None = None  # every token the run covers (None: the whole vocabulary)
    # the verdict per token id ("" where none) of the latest finished run of the named
    # detector on this model, None when it has none (given by a scan; None outside one)
    verdicts_of: Callable[[str], np.ndarray | None] | None = None

    def scope_ids(self) -> np.ndarray:
        return np.arange(len(self.vocab)) if self.scope is None else self.scope


class Detector:
    """Base class of every detector.

    Subclasses set ``name``, ``version`` (bump it when results change), ``requires`` (the
    backend capabilities needed), ``suspicious_when`` (``"low"`` or ``"high"`` scores are the
    glitchy end) and ``defaults`` (options and their default values), and implement ``run``.
    ``behavioural`` detectors run the model on prompts, after the static ones. A detector
    that ``screens`` is a cheap behavioural first stage run on every token: its ``ok``
    settles a token, and a scan sends every token it flags on to the other behavioural
    detectors. A detector that ``verifies`` gives the final word: its ``glitch`` and ``ok``
    decide the scan's verdict of a token. A ``default`` detector runs in every scan that
    names no detectors; the core names none itself.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    requires: ClassVar[frozenset[Capability]] = frozenset()
    suspicious_when: ClassVar[Literal["low", "high"]] = "low"
    defaults: ClassVar[dict[str, Any]] = {}
    behavioural: ClassVar[bool] = False
    screens: ClassVar[bool] = False  # a first stage on every token (repeat-screen)
    verifies: ClassVar[bool] = False  # its glitch/ok verdict is final (repeat-probe)
    default: ClassVar[bool] = False  # runs in a scan that names no detectors

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.defaults)
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise HarnessError(f"detector {self.name!r} has no option "
                               f"{', '.join(sorted(unknown))} (options: {known})")
        self.options: dict[str, Any] = {
            k: v if self.defaults[k] is None else coerce(v, type(self.defaults[k]), k)
            for k, v in {**self.defaults, **options}.items()
        }

    def missing_capabilities(self, backend: Backend) -> set[Capability]:
        return set(self.requires) - set(backend.capabilities)

    def block_size(self) -> int | None:
        """How many tokens of a run's scope one block holds: the unit that processes sharing
        a run claim. Default: the ``batch`` option where the detector has one, else the
        whole scope in one block (a detector whose batches are not slices of the sorted
        scope, or that needs the whole scope at once)."""
        batch = self.options.get("batch")
        return int(batch) if isinstance(batch, int) and batch > 0 else None

    def prepare(self, ctx: ScanContext) -> dict[str, Any]:
        """Resolve options that depend on the model (e.g. an automatic reference set).

        Returns the options to record with the run; called before ``run``.
        """
        return dict(self.options)

    def run(self, ctx: ScanContext, token_ids: np.ndarray
            ) -> Iterator[list[Finding] | FindingArrays]:
        """Yield findings for ``token_ids`` in batches (lists of ``Finding`` or one
        ``FindingArrays``); each batch is committed as it comes."""
        raise NotImplementedError

    def store_extra(self, conn: Any, model_id: int, run_id: int,
                    batch: list[Finding] | FindingArrays) -> None:
        """Store what a batch produced besides its findings (rows of a table of its own,
        through ``harness.store``), in the transaction that stores the batch's findings.
        Default: nothing."""


def robust_z(scores: np.ndarray) -> np.ndarray:
    """Modified z-score (Iglewicz & Hoaglin): (x - median) / (1.4826 * MAD), NaN-safe."""
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return np.zeros_like(scores)
    med = np.median(finite)
    mad = np.median(np.abs(finite - med)) * 1.4826
    if mad == 0:
        mad = np.std(finite) or 1.0
    return (scores - med) / mad


def tail_verdicts(scores: np.ndarray, suspicious_when: str, z_threshold: float) -> np.ndarray:
    """``suspect`` where the robust z-score is past ``z_threshold`` on the glitchy side."""
    z = robust_z(scores)
    flagged = z <= -z_threshold if suspicious_when == "low" else z >= z_threshold
    return np.where(flagged, SUSPECT, OK)
