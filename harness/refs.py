"""Model references: aliases, ``BACKEND:TARGET`` and bare paths, resolved to a backend."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UnknownModelError
from harness.plugins import Registry


@dataclass(frozen=True)
class ResolvedRef:
    """A model reference resolved to the backend that loads it and that backend's target."""

    backend: str
    target: str
    alias: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.backend}:{self.target}"


def resolve(ref: str, registry: Registry, backend: str | None = None) -> ResolvedRef:
    """Resolve ``ref`` (alias, ``BACKEND:TARGET``, path to a ``.gguf`` file or HF folder)."""
    ref = ref.strip()
    if backend is not None and backend not in registry.backends:
        raise UnknownModelError(f"unknown backend {backend!r} "
                                f"(known: {', '.join(sorted(registry.backends))})")
    if ref in registry.models:
        entry = registry.models[ref]
        target = entry.resolve_target()
        return ResolvedRef(backend or entry.backend or registry.default_backend(), target,
                           alias=ref)
    m = re.match(r"^([A-Za-z][\w.-]*):(.+)$", ref)
    if m and m.group(1) in registry.backends:
        if backend is not None and backend != m.group(1):
            raise UnknownModelError(f"{ref!r} names backend {m.group(1)!r} "
                                    f"but --backend says {backend!r}")
        return ResolvedRef(m.group(1), m.group(2))
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf" or \
            path.is_dir() and (path / "config.json").is_file():
        return ResolvedRef(backend or registry.default_backend(), str(path.resolve()))
    if path.suffix.lower() == ".gguf" or "/" in ref and path.parent.exists() and ref.startswith(
            (".", "/", "~")):
        raise UnknownModelError(f"no model file or folder at {ref}")
    if path.is_dir():
        raise UnknownModelError(f"{ref} is a folder without config.json, not a model folder")
    hint = ""
    if re.match(r"^[\w.-]+/[\w.-]+$", ref):
        hint = f"; for a Hugging Face hub id write hf:{ref}"
    elif m:
        hint = f"; unknown backend {m.group(1)!r} (known: {', '.join(sorted(registry.backends))})"
    aliases = ", ".join(sorted(registry.models)) or "none"
    raise UnknownModelError(f"unknown model {ref!r}: not an alias ({aliases}), "
                            f"not BACKEND:TARGET, not a .gguf file or model folder{hint}")
