"""The ``openai`` backend's tokenizer: where it comes from (``--tokenizer``, tiktoken's for
OpenAI model names, a local file the model is named after, or the server's own endpoints),
and how the strings a server gives for tokens map back to token ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from backends.openai_api.transport import RequestFailed, Transport
from harness.errors import HarnessError, ModelLoadError
from harness.tokenizers import Tokenizer
from harness.tokenizers.gguf import GGUFTokenizer
from harness.tokenizers.hf import HFTokenizer
from harness.tokenizers.tiktoken import tiktoken_tokenizer
from harness.vocab import Vocab


def load_tokenizer(spec: str | None, transport: Transport, tokenize_route: str | None,
                   server_vocab_size: int | None) -> tuple[Tokenizer, str]:
    """The tokenizer of the served model and where it came from (``describe()`` says it)."""
    if spec:
        return _local_tokenizer(spec), spec
    try:
        import tiktoken
    except ImportError:
        tiktoken = None
    if tiktoken is not None:
        try:
            encoding = tiktoken.encoding_name_for_model(transport.model)
        except KeyError:
            encoding = None
        if encoding is not None:
            try:
                return tiktoken_tokenizer(encoding), f"tiktoken:{encoding}"
            except ModelLoadError as exc:
                raise ModelLoadError(f"{exc}; or pass --tokenizer") from None
    local = _local_model_file(transport.model)
    if local is not None:
        return _local_tokenizer(local), local
    if tokenize_route == "llama.cpp" and server_vocab_size and server_vocab_size > 0:
        return ServerTokenizer(transport.root_post, server_vocab_size, transport.pool), "server"
    raise ModelLoadError(f"no tokenizer for model {transport.model!r} at {transport.base_url}: "
                         "pass --tokenizer (a model alias, a .gguf file, a Hugging Face "
                         "tokenizer folder or tokenizer.json, or tiktoken:ENCODING)")


def _local_model_file(model: str) -> str | None:
    """A served model named like a local .gguf file or a model alias that resolves to one."""
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return str(path)
    from harness.plugins import registry

    alias = registry().models.get(model)
    if alias is None:
        return None
    try:
        target = alias.resolve_target()
    except HarnessError:
        return None
    return target if target.lower().endswith(".gguf") and Path(target).is_file() else None


def _local_tokenizer(spec: str) -> Tokenizer:
    """``tiktoken:ENCODING``, a model alias, a .gguf file, an HF tokenizer folder or a
    tokenizer.json file."""
    if spec.startswith("tiktoken:"):
        return tiktoken_tokenizer(spec.partition(":")[2])
    from harness.plugins import registry

    alias = registry().models.get(spec)
    target = alias.resolve_target() if alias is not None else spec
    path = Path(target).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"tokenizer {spec!r}: no GGUF file at {path}")
        return GGUFTokenizer(path)
    if path.is_dir() or path.name.endswith(".json") and path.is_file():
        return HFTokenizer.load(path)
    what = f"model alias {spec!r} resolves to {target!r}, which" if alias else repr(spec)
    raise ModelLoadError(f"tokenizer {what} is not a .gguf file, a tokenizer folder, a "
                         "tokenizer.json file or tiktoken:ENCODING")


class ServerTokenizer(Tokenizer):
    """llama.cpp ``llama-server``'s own /tokenize and /detokenize, for a server that reports
    its vocabulary size. The vocabulary costs one /detokenize request per token (once per
    load, on the backend's threads); a token that is part of a UTF-8 character comes back
    as U+FFFD, so its bytes are not known exactly."""

    def __init__(self, post: Callable[[str, dict], Any], n_vocab: int,
                 pool: ThreadPoolExecutor) -> None:
        self.post = post
        self.n_vocab = n_vocab
        self.pool = pool
        self._vocab: Vocab | None = None

    def _call(self, path: str, body: dict, field: str) -> Any:
        answer = self.post(path, body)
        if not isinstance(answer, dict) or field not in answer:
            raise RequestFailed(f"the server's {path} failed")
        return answer[field]

    def vocab(self) -> Vocab:
        if self._vocab is not None:
            return self._vocab
        texts = list(self.pool.map(
            lambda i: self._call("/detokenize", {"tokens": [i]}, "content"),
            range(self.n_vocab)))
        raw = [t.encode("utf-8") for t in texts]
        byte_token = np.array(["\ufffd" in t for t in texts], dtype=bool)
        self._vocab = Vocab(raw=raw, text=list(texts), special=np.zeros(self.n_vocab, bool),
                            byte_token=byte_token)
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        tokens = self._call("/tokenize", {"content": text, "add_special": add_special_tokens},
                            "tokens")
        return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return list(self.pool.map(self.encode, texts))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._call("/detokenize", {"tokens": list(ids)}, "content"))

    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        return list(self.pool.map(self.decode, seqs))


class Spellings:
    """The strings a server uses for tokens in log-probability answers, mapped back to ids.

    A string that several tokens share (every lone byte of a partial UTF-8 character
    decodes to ``""``) maps to none of them. A special token may be spelled out (OpenAI) or
    left empty (llama.cpp), so it has both spellings."""

    def __init__(self, vocab: Vocab) -> None:
        spellings: list[tuple[str, ...]] = []
        count: dict[str, int] = {}
        for i, raw in enumerate(vocab.raw):
            key = raw.decode("utf-8", errors="ignore") if not vocab.padding[i] else ""
            spelled = (key, "") if vocab.special[i] and key else (key,)
            spellings.append(spelled)
            for k in spelled:
                count[k] = count.get(k, 0) + 1
        self._spellings = spellings
        self._key_to_id = {sp[0]: i for i, sp in enumerate(spellings)
                           if sp[0] and count[sp[0]] == 1}
        self._bytes_to_id = {raw: i for i, raw in enumerate(vocab.raw) if raw}

    def token_id(self, key: str) -> int | None:
        """The token a string stands for, or None when it is ambiguous or unknown."""
        if key.startswith("bytes:"):  # OpenAI spells undecodable tokens bytes:\xe2\x80
            try:
                raw = key[6:].encode("latin-1").decode("unicode_escape").encode("latin-1")
            except (UnicodeDecodeError, UnicodeEncodeError):
                return None
            return self._bytes_to_id.get(raw)
        return self._key_to_id.get(key)

    def key_of(self, token: int) -> str | None:
        """The unambiguous string for a token, or None when other tokens share it."""
        if not 0 <= token < len(self._spellings):
            return None
        key = self._spellings[token][0]
        return key if self._key_to_id.get(key) == token else None

    def of(self, token: int) -> tuple[str, ...]:
        """Every string the server may use for ``token`` (none for an id out of range)."""
        return self._spellings[token] if 0 <= token < len(self._spellings) else ()

    def shown(self, token: int) -> str:
        """The string of ``token``, for messages."""
        return self._spellings[token][0]

    def spelled(self, token: int, text: str) -> bool:
        """Can ``text`` be the server's spelling of ``token``?"""
        return text in self.of(token)
