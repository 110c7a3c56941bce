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
from harness.options import BackendOption

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
    sources = {}
    for plugin, dist in pm.list_plugin_distinfo():
        # Reading a distribution's name and version parses its metadata (several ms per
        # plugin, on every registry()); an entry point's distribution does not change.
        known = _DIST_SOURCES.get(id(plugin))
        if known is None or known[0] is not plugin:
            known = _DIST_SOURCES[id(plugin)] = (plugin, f"{dist.project_name}=={dist.version}")
        sources[id(plugin)] = known[1]
    for name, plugin in pm.list_name_plugin():
        sources.setdefault(id(plugin), name)
    return sources


_DIST_SOURCES: dict[int, tuple[object, str]] = {}


def _collect(hook_name: str, make_register: Callable[[str], Callable[..., None]]) -> None:
    pm = get_plugin_manager()
    sources = _plugin_sources(pm)
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        impl.function(register=make_register(sources.get(id(impl.plugin), impl.plugin_name)))


@dataclass(frozen=True)
class BackendEntry:
    """A registered backend: its name, the factory that loads a model with it, the package
    it came from, and whether it loads models given without a backend (the default)."""

    name: str
    factory: Callable[..., Any]
    source: str
    default: bool = False

    @property
    def options(self) -> tuple[BackendOption, ...]:
        """The options the backend declares (its factory's ``load_options``)."""
        return tuple(getattr(self.factory, "load_options", ()))

    def offline_tokenizer(self, target: str, meta: dict[str, Any]) -> Any:
        """The tokenizer of a model of this backend without its weights (the factory's
        ``offline_tokenizer``), or a one-line error where the backend has none."""
        load = getattr(self.factory, "offline_tokenizer", None)
        if load is None:
            raise HarnessError(f"the {self.name} backend cannot give a model's tokenizer "
                               "without loading the model")
        return load(target, meta)


@dataclass(frozen=True)
class DetectorEntry:
    """A registered detector class and the package it came from."""

    cls: type
    source: str


@dataclass(frozen=True)
class ProbeEntry:
    """A registered probe set and the package it came from."""

    probe_set: Any
    source: str


@dataclass(frozen=True)
class ModelAlias:
    """A model alias: the target it resolves to (a callable is called when the alias is
    used), the backend it prefers, and the package it came from."""

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
    detectors: dict[str, DetectorEntry] = field(default_factory=dict)
    probes: dict[str, ProbeEntry] = field(default_factory=dict)
    models: dict[str, ModelAlias] = field(default_factory=dict)

    def default_backend(self) -> str:
        """The backend that loads a model given without one (a path, an alias without a
        preference): the one registered with ``default=True``."""
        defaults = [b.name for b in self.backends.values() if b.default]
        if not defaults:
            raise HarnessError("no backend is registered as the default: name one with "
                               f"--backend (known: {', '.join(sorted(self.backends))})")
        return defaults[0]

    def default_detectors(self) -> list[str]:
        """The detectors a scan runs when none are named (those that declare ``default``):
        static ones first, then screens, then the other behavioural ones, each by name."""
        return sorted((n for n, d in self.detectors.items() if d.cls.default),
                      key=lambda n: (self.detectors[n].cls.behavioural,
                                     not self.detectors[n].cls.screens, n))

    def default_static(self) -> list[str]:
        """The static detectors among the defaults."""
        return [n for n in self.default_detectors() if not self.detectors[n].cls.behavioural]

    def default_screen(self) -> str | None:
        """The first screening detector among the defaults, if any."""
        return next((n for n in self.default_detectors() if self.detectors[n].cls.screens),
                    None)


def registry() -> Registry:
    """Call every ``register_*`` hook and return what was registered."""
    reg = Registry()

    def backend_register(source: str):
        def register(name: str, factory: Callable[..., Any], default: bool = False) -> None:
            if name in reg.backends:
                raise HarnessError(f"backend {name!r} registered twice "
                                   f"({reg.backends[name].source} and {source})")
            other = next((b for b in reg.backends.values() if b.default), None)
            if default and other is not None:
                raise HarnessError(f"backends {other.name!r} ({other.source}) and {name!r} "
                                   f"({source}) are both registered as the default")
            reg.backends[name] = BackendEntry(name, factory, source, default)
        return register

    def detector_register(source: str):
        def register(detector_class: type) -> None:
            name = detector_class.name
            if name in reg.detectors:
                raise HarnessError(f"detector {name!r} registered twice")
            reg.detectors[name] = DetectorEntry(detector_class, source)
        return register

    def probe_register(source: str):
        def register(probe_set: Any) -> None:
            reg.probes[probe_set.name] = ProbeEntry(probe_set, source)
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
