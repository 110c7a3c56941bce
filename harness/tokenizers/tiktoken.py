"""tiktoken encodings (OpenAI's tokenizers): the ``openai`` backend's for OpenAI model names
and ``--tokenizer tiktoken:ENCODING``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.errors import HarnessError, ModelLoadError
from harness.tokenizers import Tokenizer
from harness.vocab import Vocab


def tiktoken_tokenizer(name: str) -> TiktokenTokenizer:
    """The encoding ``name``, or the one tiktoken uses for the model ``name``."""
    try:
        import tiktoken
    except ImportError:
        raise HarnessError("tiktoken tokenizers need tiktoken: "
                           "pip install 'glitch-harness[api]'") from None
    if name not in tiktoken.list_encoding_names():
        try:
            name = tiktoken.encoding_name_for_model(name)
        except KeyError:
            raise ModelLoadError(f"tiktoken knows no encoding or model {name!r}") from None
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as exc:  # requests' and urllib's errors: tiktoken downloads BPE files
        raise ModelLoadError(
            f"tiktoken cannot fetch the BPE file of encoding {name!r} (it downloads it once, "
            f"then caches it; offline, set TIKTOKEN_CACHE_DIR to a folder holding it): "
            f"{type(exc).__name__}") from None
    return TiktokenTokenizer(encoding)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding; ids no token uses (gaps before the special tokens) are padding."""

    def __init__(self, encoding: Any) -> None:
        self.enc = encoding
        self._vocab: Vocab | None = None

    def n_tokens(self) -> int:
        return int(self.enc.n_vocab)

    def vocab(self) -> Vocab:
        if self._vocab is not None:
            return self._vocab
        enc = self.enc
        n = enc.n_vocab
        specials = {i: s for s, i in enc._special_tokens.items()}
        raw: list[bytes] = []
        text: list[str] = []
        padding = np.zeros(n, dtype=bool)
        for i in range(n):
            if i in specials:
                raw.append(specials[i].encode("utf-8"))
                text.append(specials[i])
                continue
            try:
                b = enc.decode_single_token_bytes(i)
            except KeyError:
                b = b""
                padding[i] = True
            raw.append(b)
            text.append(b.decode("utf-8", errors="backslashreplace") if b else f"<row {i}>")
        special = np.zeros(n, dtype=bool)
        special[list(specials)] = True
        byte_token = np.array([len(b) == 1 and b[0] >= 0x80 for b in raw], dtype=bool)
        byte_token &= ~special
        self._vocab = Vocab(raw=raw, text=text, special=special, byte_token=byte_token,
                            padding=padding)
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_batch(list(texts), allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        return self.enc.decode_batch([list(s) for s in seqs])

    def bos_ids(self) -> list[int]:
        return []
