"""The tokenizer interface that backends share, and adapters of tokenizer libraries:
``harness.tokenizers.hf`` (transformers), ``.gguf`` (llama.cpp on a GGUF file) and
``.tiktoken``.

A backend that sets ``Backend.tokenizer`` to a ``Tokenizer`` gets ``vocab``, ``encode``,
``decode``, their batch forms and ``bos_ids`` from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from harness.vocab import Vocab


class Tokenizer(ABC):
    """Text to token ids and back, and every token of the vocabulary.

    Subclasses implement ``vocab``, ``encode`` and ``decode``; the batch methods and
    ``bos_ids`` are built on those, to be overridden where a library has faster ones.
    """

    @abstractmethod
    def vocab(self) -> Vocab:
        """Every token: id, raw bytes, display text, special flag."""

    def n_tokens(self) -> int:
        """How many tokens the tokenizer has (cheaper than ``vocab()`` where a library says)."""
        return len(self.vocab())

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts without special tokens."""
        return [self.encode(t) for t in texts]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts without special tokens, each as an int64 array (what
        ``harness check`` scans with numpy)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(s) for s in seqs]

    def bos_ids(self) -> list[int]:
        """What the tokenizer puts before a text (usually ``[bos]`` or nothing)."""
        return self.encode("", add_special_tokens=True)

    def close(self) -> None:  # noqa: B027 - optional hook, most tokenizers hold nothing
        """Free what the tokenizer holds (a loaded file)."""
