"""The plugin manager and the registries the hooks fill.

Built-in backends, detectors, probe sets and aliases arrive through the same ``harness``
entry-point group as third-party ones; nothing here imports a concrete plugin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from harness import hookspecs
from harness.errors import HarnessError

ENTRY_POINT_GROUP = "harness"


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry points loaded and hooks checked."""
    pm = pluggy.PluginManager("harness")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    _check_pending(pm)
    return pm


def _check_pending(pm: pluggy.PluginManager) -> None:
    """A hook implementation that matches no hook (a misspelling) is an error, not a no-op."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or getattr(exc.plugin, "__name__", repr(exc.plugin))
        dist = dict((id(p), d) for p, d in pm.list_plugin_distinfo()).get(id(exc.plugin))
        where = f" (package {dist.project_name} {dist.version})" if dist else ""
        known = sorted(n for n in dir(hookspecs) if n.startswith("register_"))
        bad = [h for h in dir(exc.plugin) if h.startswith("register_") and h not in known]
        what = f"unknown hook {', '.join(map(repr, bad))}" if bad else str(exc)
        raise HarnessError(f"plugin {name!r}{where} is broken: {what} "
                           f"(hooks: {', '.join(known)})") from None


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object or module at run time (tests, notebooks)."""
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    try:
        _check_pending(pm)
    except HarnessError:
        pm.unregister(plugin)
        raise


def unregister_plugin(plugin: object) -> None:
    get_plugin_manager().unregister(plugin)


def _plugin_sources(pm: pluggy.PluginManager) -> dict[int, str]:
    """Map id(plugin) to ``distribution==version`` (or the plugin name when not installed)."""
    sources = {id(p): f"{d.project_name}=={d.version}" for p, d in pm.list_plugin_distinfo()}
    for name, plugin in pm.list_name_plugin():
        sources.setdefault(id(plugin), name)
    return sources


def _collect(hook_name: str, make_register: Callable[[str], Callable[..., None]]) -> None:
    pm = get_plugin_manager()
    sources = _plugin_sources(pm)
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        impl.function(register=make_register(sources.get(id(impl.plugin), impl.plugin_name)))


@dataclass(frozen=True)
class BackendEntry:
    name: str
    factory: Callable[..., Any]
    source: str


@dataclass(frozen=True)
class ModelAlias:
    alias: str
    target: str | Callable[[], str]
    backend: str | None
    description: str
    source: str

    def resolve_target(self) -> str:
        return self.target() if callable(self.target) else self.target

    def describe_target(self) -> str:
        if callable(self.target):
            doc = (self.target.__doc__ or "").strip().splitlines()
            return doc[0] if doc else f"<{self.target.__name__}>"
        return self.target


@dataclass
class Registry:
    """Everything the plugins registered, with the package each came from."""

    backends: dict[str, BackendEntry] = field(default_factory=dict)
    detectors: dict[str, tuple[type, str]] = field(default_factory=dict)
    probes: dict[str, tuple[Any, str]] = field(default_factory=dict)
    models: dict[str, ModelAlias] = field(default_factory=dict)


def registry() -> Registry:
    """Call every ``register_*`` hook and return what was registered."""
    reg = Registry()

    def backend_register(source: str):
        def register(name: str, factory: Callable[..., Any]) -> None:
            if name in reg.backends:
                raise HarnessError(f"backend {name!r} registered twice "
                                   f"({reg.backends[name].source} and {source})")
            reg.backends[name] = BackendEntry(name, factory, source)
        return register

    def detector_register(source: str):
        def register(detector_class: type) -> None:
            name = detector_class.name
            if name in reg.detectors:
                raise HarnessError(f"detector {name!r} registered twice")
            reg.detectors[name] = (detector_class, source)
        return register

    def probe_register(source: str):
        def register(probe_set: Any) -> None:
            reg.probes[probe_set.name] = (probe_set, source)
        return register

    def model_register(source: str):
        def register(alias: str, target: str | Callable[[], str], backend: str | None = None,
                     description: str = "") -> None:
            reg.models[alias] = ModelAlias(alias, target, backend, description, source)
        return register

    _collect("register_backends", backend_register)
    _collect("register_detectors", detector_register)
    _collect("register_probes", probe_register)
    _collect("register_models", model_register)
    return reg
