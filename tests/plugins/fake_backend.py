"""A fake backend plugin: a 64-token vocabulary with random embeddings and 4 collapsed rows.

It declares vocab and embeddings only (no score, no generate), like a backend that can read
weights but not run the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from harness.backend import Backend, Capability, Fingerprint
from harness.detector import Detector, Finding, ScanContext
from harness.hookspecs import hookimpl
from harness.vocab import Vocab

COLLAPSED = (60, 61, 62, 63)  # rows never moved from one shared initial value


class FakeBackend(Backend):
    """Deterministic embeddings; the target string seeds the generator."""

    name = "fake"
    capabilities = frozenset({Capability.VOCAB, Capability.EMBEDDINGS})

    def __init__(self, target: str, **options) -> None:
        super().__init__(target, **options)
        rng = np.random.default_rng(abs(hash(target)) % 2**32)
        self._emb = rng.normal(size=(64, 16)).astype(np.float32)
        self._emb[list(COLLAPSED)] = 0.001
        letters = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(64)]
        self._vocab = Vocab(raw=[s.encode() for s in letters], text=letters,
                            special=np.zeros(64, bool), byte_token=np.zeros(64, bool))

    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, self.target, "float32", self._vocab.tokenizer_hash())

    def vocab(self) -> Vocab:
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self._vocab.text.index(text)] if text in self._vocab.text else []

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._vocab.text[i] for i in ids)

    def input_embeddings(self) -> np.ndarray:
        return self._emb

    def output_embeddings(self) -> np.ndarray:
        return self._emb


class NeedsScore(Detector):
    """A detector that needs ``score``: on the fake backend it must be skipped, not crash."""

    name = "needs-score"
    requires = frozenset({Capability.SCORE})

    def run(self, ctx: ScanContext, token_ids: np.ndarray) -> Iterator[list[Finding]]:
        raise AssertionError("must not run without the score capability")


@hookimpl
def register_backends(register):
    register("fake", FakeBackend)


@hookimpl
def register_detectors(register):
    register(NeedsScore)


@hookimpl
def register_models(register):
    register("fake-model", "seed-1", backend="fake", description="the fake backend's model")
