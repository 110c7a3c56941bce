"""``npz``: a model given only as exported weights, in one NumPy ``.npz`` archive.

``harness scan npz:/path/to/model.npz`` reads these arrays (write them with ``np.savez``):

- ``embeddings``: the input embedding matrix, one row per token id (rows x dim, any float);
- ``tokens``: one string per token id (``np.array(strings, dtype=str)``); a string may have
  fewer entries than ``embeddings`` has rows: the rows past it are padding. A token that is
  not valid UTF-8 can be written as ``raw.decode("utf-8", "surrogateescape")`` and comes
  back as its exact bytes. (NumPy string arrays drop trailing NUL characters.)
- ``unembeddings`` (optional): the output embedding matrix, same shape; without it the
  model is taken as having tied embeddings;
- ``special`` (optional): one bool per entry of ``tokens``, true for special tokens.

It can read weights but not run the model: capabilities ``vocab`` and ``embeddings``, enough
for the static detectors. The fingerprint is the sha256 of the file. Its one option,
``-b embeddings_key=NAME``, reads the input embeddings from another array of the archive
(exports that keep a framework's names, such as ``wte``).
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.backend import Backend, Capability, Fingerprint
from harness.errors import ModelLoadError
from harness.options import BackendOption
from harness.vocab import Vocab


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _matrix(arrays: dict[str, np.ndarray], key: str, where: str) -> np.ndarray:
    matrix = arrays[key]
    if matrix.ndim != 2 or matrix.shape[0] == 0 or not (
            np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise ModelLoadError(f"npz: {where}: {key!r} must be a non-empty 2-D array of numbers, "
                             f"not {matrix.dtype} with shape {matrix.shape}")
    return np.ascontiguousarray(matrix, dtype=np.float32)


_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _load_arrays(path: Path, target: str) -> dict[str, np.ndarray]:
    """Every array of the archive; one ModelLoadError line for anything unreadable."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ModelLoadError(f"npz: {target} holds a single array (.npy), not an .npz "
                                 "archive of named arrays")
        with data:
            return {key: data[key] for key in data.files}
    except _READ_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"npz: {target} is not a readable .npz archive ({reason})"
                             ) from None


class NpzBackend(Backend):
    """Embeddings and a vocabulary read from an ``.npz`` file; no inference.

    ``encode`` has no real tokenizer to call: it matches the longest token string at each
    position (greedy), which gives every token string back as its own id (the first id, for
    a string that several tokens share) and drops characters that no token holds.
    """

    name = "npz"
    capabilities = frozenset({Capability.VOCAB, Capability.EMBEDDINGS})
    load_options = (BackendOption("embeddings_key", str, "embeddings",
                                  "the archive's array that holds the input embeddings"),)

    def __init__(self, target: str, embeddings_key: str = "embeddings") -> None:
        super().__init__(target, embeddings_key=embeddings_key)
        self.path = Path(target).expanduser()
        if not self.path.is_file():
            raise ModelLoadError(f"npz: no such file: {target}")
        arrays = _load_arrays(self.path, target)
        missing = [k for k in (embeddings_key, "tokens") if k not in arrays]
        if missing:
            raise ModelLoadError(f"npz: {target} lacks {' and '.join(map(repr, missing))} "
                                 f"(arrays: {', '.join(sorted(arrays)) or 'none'})")
        self._emb = _matrix(arrays, embeddings_key, target)
        self._unemb = _matrix(arrays, "unembeddings", target) if "unembeddings" in arrays \
            else None
        if self._unemb is not None and self._unemb.shape != self._emb.shape:
            raise ModelLoadError(f"npz: {target}: unembeddings {self._unemb.shape} and "
                                 f"embeddings {self._emb.shape} differ in shape")
        self._vocab = self._read_vocab(arrays, target)
        self._digest = _sha256(self.path)
        self._ids: dict[str, int] = {}
        for i, raw in enumerate(self._vocab.raw):
            if raw and not self._vocab.special[i]:
                self._ids.setdefault(raw.decode("utf-8", "surrogateescape"), i)
        self._longest = max(map(len, self._ids), default=0)

    def _read_vocab(self, arrays: dict[str, np.ndarray], target: str) -> Vocab:
        tokens = arrays["tokens"]
        rows = self._emb.shape[0]
        if tokens.ndim != 1 or tokens.dtype.kind != "U":
            raise ModelLoadError(f"npz: {target}: 'tokens' must be a 1-D array of str "
                                 f"(np.array(strings, dtype=str)), not {tokens.dtype} "
                                 f"with shape {tokens.shape}")
        n = len(tokens)
        if n > rows:
            raise ModelLoadError(f"npz: {target}: {n} tokens but only {rows} embedding rows")
        special = np.zeros(rows, dtype=bool)
        if "special" in arrays:
            flags = arrays["special"]
            if flags.shape != (n,) or flags.dtype != bool:
                raise ModelLoadError(f"npz: {target}: 'special' must be {n} bools, not "
                                     f"{flags.dtype} with shape {flags.shape}")
            special[:n] = flags
        try:
            raw = [t.encode("utf-8", "surrogateescape") for t in tokens.tolist()]
        except UnicodeEncodeError as exc:
            raise ModelLoadError(f"npz: {target}: a token holds a lone surrogate that is not "
                                 f"an escaped byte ({exc.object[exc.start:exc.end]!r})") from None
        raw.extend(b"" for _ in range(rows - n))
        padding = np.zeros(rows, dtype=bool)
        padding[n:] = True
        text = [r.decode("utf-8", "backslashreplace") for r in raw[:n]]
        text.extend(f"<row {i}>" for i in range(n, rows))
        byte_token = np.array([len(r) == 1 and r[0] >= 0x80 for r in raw], dtype=bool)
        return Vocab(raw=raw, text=text, special=special, byte_token=byte_token,
                     padding=padding)

    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, f"sha256:{self._digest}", "float32",
                           self._vocab.tokenizer_hash())

    def vocab(self) -> Vocab:
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        pos = 0
        while pos < len(text):
            for length in range(min(self._longest, len(text) - pos), 0, -1):
                token_id = self._ids.get(text[pos: pos + length])
                if token_id is not None:
                    ids.append(token_id)
                    pos += length
                    break
            else:
                pos += 1  # no token holds this character
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self._vocab.raw[i] for i in ids).decode("utf-8", "replace")

    def describe(self) -> dict[str, Any]:
        rows, dim = self._emb.shape
        return {"file": str(self.path.resolve()), "rows": rows, "dim": dim,
                "tokens": int((~self._vocab.padding).sum()), "tied": self.embeddings_tied()}

    def input_embeddings(self) -> np.ndarray:
        return self._emb

    def output_embeddings(self) -> np.ndarray:
        return self._emb if self._unemb is None else self._unemb

    def embeddings_tied(self) -> bool:
        return self._unemb is None
