"""The vocabulary of a model and the tokenizer analysis stored for every token."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# Tokenizer-analysis categories, in order of precedence.
PADDING = "padding"  # a matrix row past the tokenizer's size: no token maps to it
SPECIAL = "special"  # special / control token
BYTE = "byte"  # a single raw byte (byte-fallback <0xNN>, or a lone non-ASCII byte)
UNDECODABLE = "undecodable"  # several bytes that are not valid UTF-8 (a partial character)
UNREACHABLE = "unreachable"  # decoding then encoding does not give the token back
NORMAL = "normal"
CATEGORIES = (PADDING, SPECIAL, BYTE, UNDECODABLE, UNREACHABLE, NORMAL)


@dataclass
class Vocab:
    """Every row of the model's embedding matrices, as tokens.

    ``raw[i]`` is the exact byte string token ``i`` stands for; ``text[i]`` how the tokenizer
    spells it (``Ġthe``, ``<unused3>``, ``<0xFF>``). Rows past the tokenizer's size have
    ``raw == b""`` and ``padding`` set.
    """

    raw: list[bytes]
    text: list[str]
    special: np.ndarray
    byte_token: np.ndarray
    padding: np.ndarray = field(default=None)  # type: ignore[assignment]
    # the backend's own attribute per token where it has one (llama.cpp: normal, control,
    # unused, byte, user-defined); stored in tokens.attr
    attributes: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.raw)
        if self.padding is None:
            self.padding = np.zeros(n, dtype=bool)
        for name in ("text", "special", "byte_token", "padding", "attributes"):
            if getattr(self, name) is not None and len(getattr(self, name)) != n:
                raise ValueError(f"vocab field {name} has {len(getattr(self, name))} rows, not {n}")
        self.special = np.asarray(self.special, dtype=bool)
        self.byte_token = np.asarray(self.byte_token, dtype=bool)
        self.padding = np.asarray(self.padding, dtype=bool)

    def __len__(self) -> int:
        return len(self.raw)

    def tokenizer_hash(self) -> str:
        """sha256 over every token's bytes and special flag: equal hash, same tokenizer."""
        h = hashlib.sha256()
        for raw, special, pad in zip(self.raw, self.special, self.padding, strict=True):
            h.update(len(raw).to_bytes(4, "little"))
            h.update(raw)
            h.update(b"\x01" if special else (b"\x02" if pad else b"\x00"))
        return h.hexdigest()


def analyze(vocab: Vocab, encode_batch: Callable[[Sequence[str]], list[list[int]]]) -> np.ndarray:
    """One category per token (see ``CATEGORIES``), as an array of strings.

    Reachability costs one batched encode of every decodable token's text.
    """
    n = len(vocab)
    cats = np.full(n, NORMAL, dtype=object)
    decoded: dict[int, str] = {}
    for i, raw in enumerate(vocab.raw):
        if vocab.padding[i] or vocab.special[i] or vocab.byte_token[i]:
            continue
        try:
            decoded[i] = raw.decode("utf-8")
        except UnicodeDecodeError:
            cats[i] = UNDECODABLE
    ids = list(decoded)
    encoded = encode_batch([decoded[i] for i in ids]) if ids else []
    for i, enc in zip(ids, encoded, strict=True):
        if enc != [i]:
            cats[i] = UNREACHABLE
    cats[vocab.byte_token] = BYTE
    cats[vocab.special] = SPECIAL
    cats[vocab.padding] = PADDING
    return cats


def token_repr(text: str, raw: bytes = b"") -> str:
    """How a token is shown: its text as Python's ``repr`` prints it (quotes, escaped control
    characters and invisible code points); a token whose bytes are not UTF-8 (a lone byte
    of a multi-byte character) as its bytes, ``b'\\xf7'``."""
    if raw:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return repr(raw)
    return repr(text)
