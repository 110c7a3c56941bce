"""The backend interface: batch-first, with declared capabilities.

A backend wraps one loaded model. Every batch call returns exactly one result per request,
in order; a request that fails carries its error instead of being dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.options import BackendOption
from harness.tokenizers import Tokenizer
from harness.vocab import Vocab


class Capability(StrEnum):
    """What a backend can do; detectors declare which of these they need."""

    VOCAB = "vocab"
    EMBEDDINGS = "embeddings"  # input_embeddings() and output_embeddings()
    SCORE = "score"
    GENERATE = "generate"
    GRADIENTS = "gradients"  # differentiable(): the model as a torch function of embeddings


@dataclass(frozen=True)
class Fingerprint:
    """Stable identity of a loaded model: same fingerprint, same results."""

    backend: str
    source: str  # hub id@revision, file sha256, or api base + model
    dtype: str
    tokenizer_hash: str

    def key(self) -> str:
        return f"{self.backend}|{self.source}|{self.dtype}|tok:{self.tokenizer_hash[:16]}"


@dataclass(frozen=True)
class ScoreRequest:
    """Log-probabilities of ``targets[i]`` at ``positions[i]`` of the sequence ``ids``.

    Position ``p`` means: the distribution predicted after reading ``ids[:p]``.
    """

    ids: Sequence[int]
    positions: Sequence[int]
    targets: Sequence[int]

    def problem(self, n_rows: int | None = None) -> str | None:
        """Why this request cannot be scored, or None: every backend checks it the same way
        (``n_rows``: the model's embedding rows, where token ids must fall)."""
        if len(self.positions) != len(self.targets):
            return "positions and targets differ in length"
        bad = [p for p in self.positions if p < 1 or p > len(self.ids)]
        if bad:
            return f"positions {bad} outside 1..{len(self.ids)}"
        return ids_problem([*self.ids, *self.targets], n_rows)


def ids_problem(ids: Sequence[int], n_rows: int | None) -> str | None:
    """Token ids outside ``0..n_rows - 1`` (which would crash or poison a GPU), or None."""
    if n_rows is None:
        return None
    bad = sorted({int(t) for t in ids if not 0 <= t < n_rows})
    return f"token ids {bad[:5]} outside the model's 0..{n_rows - 1}" if bad else None


class Differentiable(ABC):
    """A white-box model as a differentiable function of its input embeddings, for optimisers
    that work in the embedding space (``harness.elicitation``). What a backend with
    ``Capability.GRADIENTS`` hands out from ``Backend.differentiable()``.

    Values are torch tensors on ``device``; the core imports torch only when it uses one. The
    model's own weights take no gradient: only what is computed from ``embeds`` does.
    """

    embeddings: Any  # (rows, d) float32, no gradient: row t is what the model reads for token t
    device: str

    @abstractmethod
    def hidden(self, embeds: Any) -> Any:
        """The final hidden states (B, T, d) after reading ``embeds`` (B, T, d) from the
        start of the context (rows of ``embeddings``, or any point between them)."""

    @abstractmethod
    def logits(self, hidden: Any) -> Any:
        """Float32 next-token logits (..., rows) from final hidden states (..., d)."""

    def hidden_and_state(self, embeds: Any) -> tuple[Any, Any]:
        """``hidden(embeds)`` and, detached from gradients, what ``hidden_after`` needs to go
        on after any prefix of ``embeds``. By default the embeddings themselves (``hidden_after``
        then reads the prefix again); a backend with a key/value cache returns the cache that
        this forward pass builds anyway."""
        return self.hidden(embeds), embeds.detach()

    def hidden_after(self, state: Any, rows: Any, length: int, embeds: Any) -> Any:
        """The final hidden states (len(rows), T, d) of ``embeds`` (len(rows), T, d) read
        after the first ``length`` positions of rows ``rows`` of ``state``
        (``hidden_and_state``): ``hidden(cat(prefix, embeds))[:, length:]``."""
        import torch

        return self.hidden(torch.cat([state[rows, :length], embeds], dim=1))[:, length:]


@dataclass
class ScoreResult:
    logprobs: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """A greedy continuation of ``ids`` of at most ``max_new_tokens`` tokens."""

    ids: Sequence[int]
    max_new_tokens: int = 16


@dataclass
class GenerateResult:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    error: str | None = None


@dataclass(frozen=True)
class ProbeRequest:
    """Greedily continue ``prefix + ids`` for up to ``steps`` tokens and report the
    probability of ``target`` at each generated position.

    ``prefix`` is meant to be shared by many requests: backends evaluate it once and reuse
    its key/value cache. Decoding may stop early once P(target) reaches ``stop_at``. With a
    ``checkpoint``, a backend may first read P(target) after ``ids[:checkpoint]`` and give
    up there when it is below ``give_up_below`` (the result says ``gave_up`` and holds that
    one probability); the rest of ``ids`` continues from what the checkpoint computed, so a
    request that goes on costs nothing more. A backend may also ignore the checkpoint.
    """

    ids: Sequence[int]
    target: int
    steps: int = 3
    prefix: Sequence[int] = ()
    stop_at: float | None = None
    checkpoint: int | None = None
    give_up_below: float = 0.0

    def problem(self, n_rows: int | None = None) -> str | None:
        """Why this request cannot be probed, or None (see ``ScoreRequest.problem``)."""
        if not self.ids or self.steps < 1:
            return "a probe needs at least one token and one step"
        if self.checkpoint is not None and not 0 < self.checkpoint < len(self.ids):
            return f"checkpoint {self.checkpoint} outside 1..{len(self.ids) - 1}"
        return ids_problem([*self.prefix, *self.ids, self.target], n_rows)


@dataclass
class ProbeResult:
    probs: list[float] = field(default_factory=list)  # P(target) at each generated position
    ids: list[int] = field(default_factory=list)  # the greedy tokens
    error: str | None = None
    gave_up: bool = False  # stopped at the checkpoint: ``probs`` holds the one read there

    @property
    def max_prob(self) -> float:
        return max(self.probs, default=float("nan"))


class Backend(ABC):
    """One loaded model. Subclasses set ``name`` and ``capabilities``, and declare in
    ``load_options`` the keyword options their constructor takes (``harness scan -b
    NAME=VALUE``; ``harness plugins`` lists them).

    A backend sets ``tokenizer`` to a ``harness.tokenizers.Tokenizer``, which answers
    ``vocab``, ``encode``, ``decode``, their batch forms and ``bos_ids``; or it overrides
    ``vocab``, ``encode`` and ``decode`` itself (the batch methods and ``bos_ids`` are then
    built on those). White-box backends implement the embedding methods; black-box backends
    leave them raising ``NotImplementedError`` and do not declare ``Capability.EMBEDDINGS``.
    """

    name: str = "backend"
    capabilities: frozenset[Capability] = frozenset()
    load_options: ClassVar[tuple[BackendOption, ...]] = ()
    tokenizer: Tokenizer | None = None

    def __init__(self, target: str, **options: Any) -> None:
        self.target = target
        self.options = options

    @abstractmethod
    def fingerprint(self) -> Fingerprint:
        """Identity of the model, its weights, dtype and tokenizer."""

    @classmethod
    def offline_tokenizer(cls, target: str, meta: dict[str, Any]) -> Tokenizer:
        """The tokenizer of the model ``target`` names, without loading its weights, from the
        target and the metadata stored with the model (``describe()``); ``harness check``
        uses it. Backends that can, override it."""
        raise HarnessError(f"the {cls.name} backend cannot give a model's tokenizer without "
                           "loading the model")

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise HarnessError(f"the {self.name} backend has no tokenizer loaded")
        return self.tokenizer

    def vocab(self) -> Vocab:
        """Every token: id, raw bytes, display text, special flag."""
        return self._tokenizer().vocab()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer().decode(ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts without special tokens."""
        if self.tokenizer is None:
            return [self.encode(t) for t in texts]
        return self.tokenizer.encode_batch(texts)

    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        if self.tokenizer is None:
            return [self.decode(s) for s in seqs]
        return self.tokenizer.decode_batch(seqs)

    def bos_ids(self) -> list[int]:
        """What the tokenizer puts before a text (usually ``[bos]`` or nothing)."""
        if self.tokenizer is None:
            return self.encode("", add_special_tokens=True)
        return self.tokenizer.bos_ids()

    def context_length(self) -> int | None:
        """The longest sequence the model takes, where known."""
        return None

    def describe(self) -> dict[str, Any]:
        """Metadata stored with the model (architecture, sizes, device)."""
        return {}

    def input_embeddings(self) -> np.ndarray:
        """The input embedding matrix, rows indexed by token id, as float32."""
        raise NotImplementedError(f"{self.name} backend has no input embeddings")

    def output_embeddings(self) -> np.ndarray:
        """The output (unembedding) matrix, rows indexed by token id, as float32."""
        raise NotImplementedError(f"{self.name} backend has no output embeddings")

    def embeddings_tied(self) -> bool:
        return False

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        raise NotImplementedError(f"{self.name} backend cannot score")

    def differentiable(self) -> Differentiable:
        """The model as a differentiable function (backends with ``Capability.GRADIENTS``)."""
        raise HarnessError(f"backend {self.name!r} has no gradients; elicitation needs a "
                           "white-box backend such as hf")

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        raise NotImplementedError(f"{self.name} backend cannot generate")

    def probe(self, requests: Sequence[ProbeRequest]) -> list[ProbeResult]:
        """Needs ``score`` and ``generate``; white-box backends override this with a path
        that shares prefixes and stops early."""
        gens = self.generate([GenerateRequest(list(r.prefix) + list(r.ids), r.steps)
                              for r in requests])
        scores = []
        for r, g in zip(requests, gens, strict=True):
            seq = list(r.prefix) + list(r.ids) + g.ids
            start = len(r.prefix) + len(r.ids)
            n = max(1, len(g.ids))
            scores.append(ScoreRequest(seq, [start + k for k in range(n)], [r.target] * n))
        results = []
        for g, s in zip(gens, self.score(scores), strict=True):
            error = g.error or s.error
            results.append(ProbeResult(error=error) if error else
                           ProbeResult([float(np.exp(x)) for x in s.logprobs], g.ids))
        return results

    def close(self) -> None:  # noqa: B027 - optional hook, most backends need nothing
        """Free resources (weights, connections)."""
