"""The plugin hooks of glitch-harness (pluggy project name ``harness``).

Each hook receives a ``register`` callback, in the style of simonw/llm. Every hook here
must be documented in README.md; ``tests/test_plugins.py`` fails when one is not.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("harness")
hookimpl = pluggy.HookimplMarker("harness")


@hookspec
def register_backends(register):
    """Register model backends: ``register(name, factory, default=False)``.

    ``factory(target: str, **options) -> harness.backend.Backend`` loads the model that
    ``target`` names (a hub id, a path, ``model@url``...). ``name`` is the prefix of a model
    reference: ``hf:gpt2`` uses the backend registered as ``hf``. One backend registers with
    ``default=True``: it loads the models given without a backend (a path, an alias without a
    preference); the built-in ``hf`` does.
    """


@hookspec
def register_detectors(register):
    """Register detectors: ``register(detector_class)``.

    ``detector_class`` subclasses ``harness.detector.Detector`` and has a unique ``name``.
    """


@hookspec
def register_probes(register):
    """Register probe sets: ``register(probe_set)``, a ``harness.probes.ProbeSet``.

    A probe set is a named list of prompt templates (or a known-token list) that behavioural
    detectors use.
    """


@hookspec
def register_models(register):
    """Register model aliases: ``register(alias, target, backend=None, description="")``.

    ``target`` is a string or a zero-argument callable returning one (so an alias can locate
    or assemble a file only when it is used). ``backend`` is the backend to use when the
    user does not pick one; ``None`` lets the target decide.
    """


@hookspec
def register_commands(app):
    """Add commands to the ``harness`` CLI: ``app`` is the root ``typer.Typer``."""
