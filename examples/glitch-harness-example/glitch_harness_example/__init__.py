"""An example glitch-harness plugin: the ``junk-text`` detector and the ``npz`` backend.

glitch-harness finds this module through the entry point ``example`` in the ``harness``
group (see ``pyproject.toml``) and registers the ``@hookimpl`` functions below with pluggy.
A function whose name matches no hook (``register_detector`` for ``register_detectors``)
stops ``harness`` at start-up with one error line instead of being silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable

from glitch_harness_example.junk_text import JunkText
from glitch_harness_example.npz_backend import NpzBackend
from harness.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["JunkText", "NpzBackend", "register_backends", "register_detectors"]


@hookimpl
def register_backends(register: Callable[..., None]) -> None:
    """Register the ``npz`` backend: ``harness scan npz:/path/to/model.npz``."""
    register("npz", NpzBackend)


@hookimpl
def register_detectors(register: Callable[[type], None]) -> None:
    """Register the ``junk-text`` detector: ``harness scan MODEL -d junk-text``."""
    register(JunkText)
