"""A black-box backend plugin: the hf backend with only ``vocab`` and ``generate`` declared,
the way a chat API looks (no embeddings, no log-probabilities)."""

from __future__ import annotations

from backends.hf import HFBackend
from harness.backend import Capability
from harness.hookspecs import hookimpl


class GenerateOnly(HFBackend):
    """Greedy text in, text out; nothing else."""

    name = "generate-only"
    capabilities = frozenset({Capability.VOCAB, Capability.GENERATE})


@hookimpl
def register_backends(register):
    register("generate-only", GenerateOnly)
