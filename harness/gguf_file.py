"""Checks and identity of GGUF files, shared by the backends that read them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"


def check_gguf_header(path: Path) -> None:
    """Refuse, with one clear line, a file that is missing or has no GGUF header."""
    if not path.is_file():
        raise ModelLoadError(f"no GGUF file at {path}")
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(24)
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {head[:4]!r})")
    if size < 24:
        raise ModelLoadError(f"{path} is truncated ({size} bytes)")


def check_gguf(path: Path) -> None:
    """Refuse, with one clear line, a file that is missing, not GGUF, or truncated (reads
    every tensor's extent: seconds on a large vocabulary)."""
    check_gguf_header(path)
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader raises many kinds of errors on damaged files
        raise ModelLoadError(f"{path} is a damaged or truncated GGUF file ("
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                             ) from None
    if end > size:
        raise ModelLoadError(f"{path} is truncated: its tensors need {end} bytes, "
                             f"the file has {size}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(4 << 20):
            h.update(block)
    return h.hexdigest()
