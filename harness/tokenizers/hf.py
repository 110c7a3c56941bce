"""Hugging Face (transformers) tokenizers: the ``hf`` backend's, and the ``openai``
backend's for ``--tokenizer`` a tokenizer folder or ``tokenizer.json``."""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError, ModelLoadError, first_line
from harness.tokenizers import Tokenizer
from harness.vocab import Vocab

_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class HFTokenizer(Tokenizer):
    """A transformers tokenizer ``tok``; with ``n_rows`` (the model's embedding rows) the
    vocabulary has that many rows, those past the tokenizer's size being padding."""

    def __init__(self, tok: Any, n_rows: int | None = None) -> None:
        self.tok = tok
        self.n_rows = n_rows
        self._vocab: Vocab | None = None

    @classmethod
    def load(cls, path: Path) -> HFTokenizer:
        """A (fast) tokenizer from a local folder or a ``tokenizer.json`` file."""
        try:
            from transformers import AutoTokenizer, PreTrainedTokenizerFast
        except ImportError:
            raise HarnessError("a Hugging Face tokenizer needs transformers: "
                               "pip install 'glitch-harness[hf]'") from None
        try:
            with quiet_transformers():
                if path.is_dir():
                    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                else:
                    tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load a tokenizer from {path}: "
                                 f"{first_line(exc)}") from None
        return cls(tok)

    @classmethod
    def load_cached(cls, hub_id: str) -> HFTokenizer:
        """The tokenizer of a hub model already in the local Hugging Face cache (no
        download)."""
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise HarnessError("a Hugging Face tokenizer needs transformers: "
                               "pip install 'glitch-harness[hf]'") from None
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(hub_id, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"no tokenizer of {hub_id!r} in the local Hugging Face "
                                 f"cache: {first_line(exc)}") from None
        return cls(tok)

    @classmethod
    def from_gguf(cls, path: Path) -> HFTokenizer:
        """transformers' conversion of a GGUF file's tokenizer (where llama.cpp is missing)."""
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise HarnessError("reading a GGUF tokenizer needs llama-cpp-python or "
                               "transformers: pip install 'glitch-harness[hf]'") from None
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:  # transformers raises many types on unsupported files
            raise ModelLoadError(f"transformers cannot read the tokenizer of {path}: "
                                 f"{first_line(exc)}") from None
        return cls(tok)

    def vocab(self) -> Vocab:
        if self._vocab is None:
            self._vocab = tokenizer_vocab(self.tok, self.n_rows)
        return self._vocab

    def n_tokens(self) -> int:
        return max(len(self.tok), self.n_rows or 0)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None or not texts:
            return super().encode_batch(texts)
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None or not texts:
            return super().encode_arrays(texts)
        return [np.array(e.ids, dtype=np.int64)
                for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        if not seqs:
            return []
        seqs = [list(s) for s in seqs]
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None or getattr(self.tok, "clean_up_tokenization_spaces", True):
            return self.tok.batch_decode(seqs, skip_special_tokens=False)
        # the Rust tokenizer directly: transformers' batch_decode gives the same text but
        # first walks every id in Python (to_py_obj), 4x the time on SmolLM2's vocabulary
        return backend.decode_batch(seqs, skip_special_tokens=False)


def tokenizer_vocab(tok: Any, n_rows: int | None = None) -> Vocab:
    """Every token's exact bytes from a transformers tokenizer (byte-level BPE or
    SentencePiece); rows ``n_rows`` past the tokenizer's size are padding."""
    n_tok = len(tok)
    n_rows = max(n_rows or 0, n_tok)
    pieces = tok.convert_ids_to_tokens(list(range(n_tok)))
    added = getattr(tok, "added_tokens_decoder", {})
    added_ids = {int(t) for t in added}
    special_ids = set(tok.all_special_ids) | {int(t) for t, a in added.items()
                                              if getattr(a, "special", False)}
    inv = _bytes_to_unicode() if _byte_level(tok) else None
    raw: list[bytes] = []
    byte_token = np.zeros(n_rows, dtype=bool)
    for i, piece in enumerate(pieces):
        piece = piece if piece is not None else ""
        if i in special_ids or i in added_ids:
            raw.append(piece.encode("utf-8"))
        elif inv is not None:
            try:
                raw.append(bytes(inv[c] for c in piece))
            except KeyError:  # a piece outside the byte alphabet: keep its UTF-8
                raw.append(piece.encode("utf-8"))
            byte_token[i] = len(raw[-1]) == 1 and raw[-1][0] >= 0x80
        elif m := _SP_BYTE.match(piece):
            raw.append(bytes([int(m.group(1), 16)]))
            byte_token[i] = True
        else:
            raw.append(piece.replace("\u2581", " ").encode("utf-8"))
    padding = np.zeros(n_rows, dtype=bool)
    padding[n_tok:] = True
    raw.extend(b"" for _ in range(n_rows - n_tok))
    special = np.zeros(n_rows, dtype=bool)
    special[[i for i in special_ids if i < n_rows]] = True
    text = [
        (pieces[i] if special[i] or i in added_ids else
         raw[i].decode("utf-8", errors="backslashreplace")) if i < n_tok else f"<row {i}>"
        for i in range(n_rows)
    ]
    return Vocab(raw=raw, text=text, special=special, byte_token=byte_token, padding=padding)


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _byte_level(tok: Any) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    raw = backend.decoder.__getstate__() if backend.decoder is not None else b"{}"
    decoder = json.loads(raw) or {}
    parts = decoder.get("decoders", [decoder]) if decoder else []
    return any(p.get("type") == "ByteLevel" for p in parts)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars, warnings or log lines from transformers under the harness's own
    display: its GGUF conversion draws a tqdm bar of its own, so stderr is held too."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
