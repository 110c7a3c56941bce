"""The tokenizer of a GGUF file, run by llama.cpp: the ``llamacpp`` backend's, and the
``openai`` backend's for ``--tokenizer x.gguf``."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.llamacpp_lib import LoadedModel
from harness.tokenizers import Tokenizer
from harness.vocab import Vocab

# llama.cpp token attributes, most telling first; a token is named by the first it has.
ATTRIBUTES = (("unused", 1 << 1), ("control", 1 << 3), ("byte", 1 << 5),
              ("user-defined", 1 << 4), ("unknown", 1 << 0), ("normal", 1 << 2))


class GGUFTokenizer(Tokenizer):
    """The tokenizer of a GGUF file, exactly as llama.cpp runs it (a vocab-only load takes
    well under a second), or of a ``model`` already loaded, which its owner frees."""

    def __init__(self, path: str | Path, model: LoadedModel | None = None) -> None:
        self.path = Path(path).expanduser()
        self._model = model or LoadedModel(self.path, vocab_only=True)
        self._owns = model is None
        self.lib = self._model.lib
        self._v = self._model.vocab
        self._vocab: Vocab | None = None

    def n_tokens(self) -> int:
        return int(self.lib.llama_vocab_n_tokens(self._v))

    def _piece(self, token: int, buf: Any) -> bytes:
        n = self.lib.llama_token_to_piece(self._v, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self._v, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def attributes(self) -> list[str]:
        """Each token's llama.cpp attribute: unused, control, byte, user-defined, unknown,
        normal (or undefined)."""
        names = []
        for i in range(self.n_tokens()):
            attr = int(self.lib.llama_vocab_get_attr(self._v, i))
            names.append(next((name for name, bit in ATTRIBUTES if attr & bit), "undefined"))
        return names

    def vocab(self) -> Vocab:
        if self._vocab is not None:
            return self._vocab
        n = self.n_tokens()
        attrs = self.attributes()
        buf = ctypes.create_string_buffer(64)
        raw = [self._piece(i, buf) for i in range(n)]
        byte_level = int(self.lib.llama_vocab_type(self._v)) == 2  # LLAMA_VOCAB_TYPE_BPE
        special = np.array([a in ("control", "unused") for a in attrs], dtype=bool)
        byte_token = np.array([a == "byte" or (byte_level and len(r) == 1 and r[0] >= 0x80)
                               for a, r in zip(attrs, raw, strict=True)], dtype=bool)
        text = []
        for i, r in enumerate(raw):
            if special[i] or attrs[i] == "user-defined":
                get = self.lib.llama_vocab_get_text(self._v, i)
                text.append(get.decode("utf-8", errors="backslashreplace") if get else "")
            else:
                text.append(r.decode("utf-8", errors="backslashreplace"))
        self._vocab = Vocab(raw=raw, text=text, special=special, byte_token=byte_token,
                            attributes=attrs)
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        out = (self.lib.llama_token * cap)()
        n = self.lib.llama_tokenize(self._v, data, len(data), out, cap, add_special_tokens,
                                    True)
        if n < 0:
            cap = -n
            out = (self.lib.llama_token * cap)()
            n = self.lib.llama_tokenize(self._v, data, len(data), out, cap,
                                        add_special_tokens, True)
        return list(out[:n])

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts (special tokens written out in them are parsed, as in
        ``encode``), each straight into an int64 array, one buffer reused."""
        out: list[np.ndarray] = []
        cap = 1 << 16
        buf = (self.lib.llama_token * cap)()
        for text in texts:
            data = text.encode("utf-8")
            if len(data) + 8 > cap:
                cap = len(data) + 8
                buf = (self.lib.llama_token * cap)()
            n = self.lib.llama_tokenize(self._v, data, len(data), buf, cap, False, True)
            out.append(np.ctypeslib.as_array(buf)[:n].astype(np.int64))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        arr = (self.lib.llama_token * max(1, len(ids)))(*ids)
        cap = 16 * len(ids) + 16
        buf = ctypes.create_string_buffer(cap)
        n = self.lib.llama_detokenize(self._v, arr, len(ids), buf, cap, False, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_detokenize(self._v, arr, len(ids), buf, -n, False, True)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self._v, token))

    def close(self) -> None:
        if self._owns:
            self._model.free()
