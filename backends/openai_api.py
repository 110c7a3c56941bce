"""The ``openai`` backend: a model behind an OpenAI-compatible HTTP API.

``openai:MODEL@BASE_URL`` names a model served by OpenAI itself, vLLM, llama.cpp's
``llama-server``, ``python -m llama_cpp.server`` or anything else that speaks
``/v1/completions`` (or, as a last resort, ``/v1/chat/completions``). Without ``@BASE_URL`` the
base is ``$OPENAI_BASE_URL``, else ``https://api.openai.com/v1``.

The model itself is a black box; the tokenizer is local (``tokenizer=``: an alias, a ``.gguf``
file, a Hugging Face tokenizer folder or ``tokenizer.json``, ``tiktoken:ENCODING``), or
tiktoken's for OpenAI model names, or the server's own tokenize endpoints. At load the backend
asks the server what it can do (see ``OpenAIBackend``) and records what it found in
``describe()``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from harness.backend import (
    Backend,
    Capability,
    Fingerprint,
    GenerateRequest,
    GenerateResult,
    ProbeRequest,
    ProbeResult,
    ScoreRequest,
    ScoreResult,
)
from harness.errors import HarnessError, ModelLoadError, first_line
from harness.hookspecs import hookimpl
from harness.vocab import Vocab

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEY_ENV = "OPENAI_API_KEY"
KEY_ENV_OVERRIDE = "HARNESS_OPENAI_KEY_ENV"  # names the variable that holds the key
NO_KEY = "sk-no-key"  # sent to servers that need no key (the client insists on one)
MESSAGE_CHARS = 200  # an error message quoted from a server or library is cut here
TOP_LOGPROBS = (20, 5)  # asked for in turn; OpenAI's completions allow at most 5
FORCE_BIAS = 100  # the largest logit bias OpenAI accepts; enough to make any token greedy
SCORE_MODES = ("auto", "echo", "forced", "top_logprobs", "none")
CALIBRATION_TEXT = "Count: one, two, three, four,"  # short: an echo costs per token
TOKENIZER_SAMPLE = "Hello world! Glitch tokens like SolidGoldMagikarp, 12345 and naïve café."
# two log-probabilities of one token "agree" within this: llama.cpp's numbers move by up to
# 0.1 with the batch a position was computed in (a cached prefix, or not)
LOGPROB_TOLERANCE = 0.25


@hookimpl
def register_backends(register):
    register("openai", OpenAIBackend)


def split_target(target: str) -> tuple[str, str]:
    """``MODEL@BASE_URL`` -> (model, base URL); without ``@``, $OPENAI_BASE_URL or OpenAI's."""
    for scheme in ("@http://", "@https://"):  # a base URL may itself hold an '@' (user info)
        at = target.find(scheme)
        if at > 0:
            return target[:at], target[at + 1:].rstrip("/")
    model, sep, base = target.rpartition("@")
    if not sep:
        model, base = target, os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    if not model:
        raise HarnessError(f"openai target {target!r} names no model: write MODEL@BASE_URL")
    return model, base.rstrip("/")


class _Tokenizer(Protocol):
    def vocab(self) -> Vocab: ...
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]: ...
    def bos_ids(self) -> list[int]: ...


class RequestFailed(Exception):
    """One API request failed for good (after the client's retries); the text is the reason
    stored with the result, with the API key removed."""


class _Mismatch(Exception):
    """The server tokenized a text prompt into other tokens than the ones meant."""


@dataclass
class _Completion:
    """The parts of a completion the backend reads."""

    text: str
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


class OpenAIBackend(Backend):
    """A model behind an OpenAI-compatible API, with a local (or server-side) tokenizer.

    Detected at load, from the server's answers, and recorded in ``describe()``:

    - ``endpoint``: ``completions``, or ``chat`` when the server has no completions endpoint
      (then the prompt is sent as one user message: generation only);
    - ``prompt_as``: ``ids`` when the server takes a prompt as a list of token ids (OpenAI,
      vLLM: exact), else ``text`` decoded by the tokenizer (llama_cpp.server); the server then
      adds its own BOS, so ``bos_ids()`` is empty and a leading BOS is dropped from requests;
    - ``score_via``: how a log-probability is read, the first that the server gets right:
      ``echo`` (the prompt echoed with log-probabilities; checked against a plain completion,
      since llama_cpp.server misplaces echoed values by one token for models without a BOS),
      ``forced`` (the prompt up to the position, ``logit_bias`` +100 on the target and one
      generated token: the server reports the target's unbiased log-probability; checked
      likewise), ``top_logprobs`` (an approximation: the prediction's top-k log-probabilities;
      a target outside them counts as the k-th value, an upper bound), or none (no ``score``).

    Requests run on ``concurrency`` threads; the openai client retries 408/409/429/5xx,
    connection errors and timeouts ``retries`` times with exponential backoff, honouring
    ``Retry-After``. A request that still fails gives a result with ``error`` set.
    """

    name = "openai"
    capabilities = frozenset({Capability.VOCAB, Capability.GENERATE})

    def __init__(self, target: str, tokenizer: str | None = None, concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 4, api_key_env: str | None = None,
                 score_via: str = "auto", **options: Any) -> None:
        super().__init__(target, **options)  # dtype, device, threads ...: nothing to do here
        try:
            import openai
        except ImportError:
            raise HarnessError("the openai backend needs the openai package: "
                               "pip install 'glitch-harness[api]'") from None
        if score_via not in SCORE_MODES:
            raise HarnessError(f"score_via must be one of {', '.join(SCORE_MODES)}, "
                               f"not {score_via!r}")
        self.openai = openai
        self.model, self.base_url = split_target(target)
        self.root_url = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.key_env = api_key_env or os.environ.get(KEY_ENV_OVERRIDE) or KEY_ENV
        key = os.environ.get(self.key_env)
        self._key_given = bool(key)
        self._key = key or NO_KEY
        self.client = openai.OpenAI(api_key=self._key, base_url=self.base_url,
                                    timeout=self.timeout, max_retries=self.retries)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="openai-api")
        self._context: int | None = None
        self._contact_timeout = self.timeout
        self._server_vocab_size: int | None = None
        self.flavour = "openai-compatible"
        self._tokenize_route: str | None = None
        self.endpoint = "completions"
        self.prompt_as = "text"
        self.top_k = 0
        self.score_via: str | None = None
        self._echo_ok = False
        self._forced_ok = False
        self._chat_max_key = "max_tokens"
        self.tokenizer_source = ""
        self._tok: _Tokenizer | None = None
        self._tok_lock = threading.Lock()
        self._bos: list[int] = []
        try:
            self._load(tokenizer, score_via)
        except BaseException:
            self.close()
            raise

    # --- load-time checks -------------------------------------------------------------------

    def _load(self, tokenizer: str | None, score_via: str) -> None:
        self._check_server()
        self._detect_flavour()
        self._tok, self.tokenizer_source = self._load_tokenizer(tokenizer)
        self._bos = self.tokenizer.bos_ids()
        self._index_keys()
        self._detect_endpoint()
        self._check_tokenizer_agrees()
        self._detect_scoring(score_via)
        caps = {Capability.VOCAB, Capability.GENERATE}
        if self.score_via is not None:
            caps.add(Capability.SCORE)
        self.capabilities = frozenset(caps)

    def _load_error(self, what: str, exc: BaseException) -> ModelLoadError:
        return ModelLoadError(self._redact(f"{what}: {self._reason(exc, load=True)}"))

    def _first_contact(self) -> Any:
        """The client for the first request: one retry, at most 10 s, so that a wrong URL
        fails in seconds."""
        self._contact_timeout = min(self.timeout, 10.0)
        return self.client.with_options(max_retries=min(self.retries, 1),
                                        timeout=self._contact_timeout)

    def _check_server(self) -> None:
        """Reachable, key accepted, model served; the context length where reported."""
        openai = self.openai
        try:
            page = self._first_contact().models.list()
            served = [m.model_dump() for m in page.data]
        except openai.AuthenticationError:
            raise ModelLoadError(self._auth_message()) from None
        except openai.PermissionDeniedError:
            raise ModelLoadError(f"the server at {self.base_url} refused access with the key in "
                                 f"${self.key_env} (HTTP 403)") from None
        except openai.NotFoundError:
            return  # no model list on this server: the first completion will tell
        except openai.APIConnectionError as exc:
            raise ModelLoadError(self._redact(
                f"cannot reach the API server at {self.base_url}: "
                f"{self._reason(exc, load=True)}")) from None
        except openai.APIError as exc:
            raise self._load_error(f"the API server at {self.base_url} failed to list its "
                                   "models", exc) from None
        ids = [str(m.get("id")) for m in served]
        if ids and self.model not in ids:
            shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
            raise ModelLoadError(f"model {self.model!r} is not served by {self.base_url} "
                                 f"(it serves {shown})")
        entry = next((m for m in served if m.get("id") == self.model), {})
        meta = entry.get("meta") or {}
        for value in (entry.get("max_model_len"), entry.get("context_length"),
                      entry.get("context_window"), meta.get("n_ctx_train")):
            if isinstance(value, int) and value > 0:
                self._context = value
                break
        if isinstance(meta.get("n_vocab"), int):
            self._server_vocab_size = int(meta["n_vocab"])
        if entry.get("owned_by") == "llamacpp" or meta:
            self.flavour = "llama.cpp"
        if entry.get("owned_by") == "vllm":
            self.flavour = "vllm"

    def _auth_message(self) -> str:
        if not self._key_given:
            return (f"the server at {self.base_url} needs an API key (HTTP 401): set "
                    f"${self.key_env}")
        return (f"the server at {self.base_url} rejected the API key in ${self.key_env} "
                "(HTTP 401)")

    def _detect_flavour(self) -> None:
        """Which tokenize endpoint the server has: llama_cpp.server's /extras/tokenize,
        llama-server's /tokenize or vLLM's /tokenize (each takes its own body)."""
        routes = [("extras", "/extras/tokenize", {"input": "a"}),
                  ("llama.cpp", "/tokenize", {"content": "a"}),
                  ("vllm", "/tokenize", {"model": self.model, "prompt": "a"})]
        for name, path, body in routes:
            answer = self._root_post(path, body)
            if isinstance(answer, dict) and isinstance(answer.get("tokens"), list):
                self._tokenize_route = name
                if name == "extras":
                    self.flavour = "llama-cpp-python"
                elif name == "vllm":
                    self.flavour = "vllm"
                    if isinstance(answer.get("max_model_len"), int):
                        self._context = self._context or answer["max_model_len"]
                else:
                    self.flavour = "llama.cpp"
                return

    def _root_post(self, path: str, body: dict) -> Any:
        """POST JSON to a path under the server's root (not under /v1); None on any failure."""
        req = urllib.request.Request(
            self.root_url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self._key}"})
        try:
            with urllib.request.urlopen(req, timeout=min(self.timeout, 10.0)) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _server_tokenize(self, text: str) -> list[int] | None:
        if self._tokenize_route is None:
            return None
        body = {"extras": {"input": text},
                "llama.cpp": {"content": text, "add_special": True},
                "vllm": {"model": self.model, "prompt": text}}[self._tokenize_route]
        path = "/extras/tokenize" if self._tokenize_route == "extras" else "/tokenize"
        answer = self._root_post(path, body)
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            return None
        # llama-server may answer [{"id": .., "piece": ..}] when asked for pieces
        return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]

    def _load_tokenizer(self, spec: str | None) -> tuple[_Tokenizer, str]:
        if spec:
            return _local_tokenizer(spec), spec
        try:
            import tiktoken
        except ImportError:
            tiktoken = None
        if tiktoken is not None:
            try:
                encoding = tiktoken.encoding_name_for_model(self.model)
            except KeyError:
                encoding = None
            if encoding is not None:
                try:
                    return _tiktoken_tokenizer(encoding), f"tiktoken:{encoding}"
                except ModelLoadError as exc:
                    raise ModelLoadError(f"{exc}; or pass --tokenizer") from None
        local = _local_model_file(self.model)
        if local is not None:
            return _local_tokenizer(local), local
        if (self._tokenize_route == "llama.cpp" and self._server_vocab_size
                and self._server_vocab_size > 0):
            return (ServerTokenizer(self._root_post, self._server_vocab_size, self._pool),
                    "server")
        raise ModelLoadError(f"no tokenizer for model {self.model!r} at {self.base_url}: pass "
                             "--tokenizer (a model alias, a .gguf file, a Hugging Face "
                             "tokenizer folder or tokenizer.json, or tiktoken:ENCODING)")

    def _index_keys(self) -> None:
        """Map the strings a server uses for tokens in log-probability answers back to ids.

        A string that several tokens share (every lone byte of a partial UTF-8 character
        decodes to ``""``) maps to none of them. A special token may be spelled out
        (OpenAI) or left empty (llama.cpp), so it has both spellings."""
        vocab = self.tokenizer.vocab()
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

    def _token_id(self, key: str) -> int | None:
        if key.startswith("bytes:"):  # OpenAI spells undecodable tokens bytes:\xe2\x80
            try:
                raw = key[6:].encode("latin-1").decode("unicode_escape").encode("latin-1")
            except (UnicodeDecodeError, UnicodeEncodeError):
                return None
            return self._bytes_to_id.get(raw)
        return self._key_to_id.get(key)

    def _key_of(self, token: int) -> str | None:
        """The unambiguous string for a token, or None when other tokens share it."""
        if not 0 <= token < len(self._spellings):
            return None
        key = self._spellings[token][0]
        return key if self._key_to_id.get(key) == token else None

    def _spelled(self, token: int, text: str) -> bool:
        """Can ``text`` be the server's spelling of ``token``?"""
        return 0 <= token < len(self._spellings) and text in self._spellings[token]

    def _detect_endpoint(self) -> None:
        """Completions with the prompt as token ids, else as text, else chat completions."""
        if self._takes_ids(self.tokenizer.bos_ids() + self.tokenizer.encode(CALIBRATION_TEXT)):
            self.prompt_as = "ids"
            return
        self.prompt_as = "text"
        try:
            self._complete(self.tokenizer.encode(CALIBRATION_TEXT), max_tokens=1)
            return
        except RequestFailed as exc:
            failure = exc
        if "404" not in str(failure) and "chat" not in str(failure).lower():
            raise ModelLoadError(f"completions at {self.base_url} failed: {failure}")
        self.endpoint = "chat"
        try:
            self._chat(CALIBRATION_TEXT, 1)
        except RequestFailed as exc:
            if "max_completion_tokens" not in str(exc):
                raise ModelLoadError(f"neither completions nor chat completions work at "
                                     f"{self.base_url}: {exc}") from None
            self._chat_max_key = "max_completion_tokens"
            try:
                self._chat(CALIBRATION_TEXT, 1)
            except RequestFailed as exc2:
                raise ModelLoadError(f"chat completions at {self.base_url} failed: "
                                     f"{exc2}") from None

    def _takes_ids(self, ids: list[int]) -> bool:
        """Does the server take a prompt given as token ids? A refusal is a 4xx, or the 500
        llama_cpp.server answers for a body that fails validation; that 500 must not be
        retried like a server fault (it would take the client's whole backoff), so this
        request retries by itself, on rate limits and other server faults only."""
        openai = self.openai
        quick = self.client.with_options(max_retries=0)
        for attempt in range(self.retries + 1):
            try:
                quick.completions.create(model=self.model, prompt=ids, max_tokens=1,
                                         temperature=0, **self._extra())
                return True
            except openai.AuthenticationError:
                raise ModelLoadError(self._auth_message()) from None
            except openai.APIStatusError as exc:
                code = exc.status_code
                validation = "valid" in str(exc).lower()
                transient = code in (408, 409, 429) or (code >= 500 and not validation)
                if not transient:
                    return False
            except openai.APIConnectionError:
                pass
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
        return False  # the text prompt's request below says what is wrong

    def _check_tokenizer_agrees(self) -> None:
        """Once: the server splits a sample text as the local tokenizer does (by its tokenize
        endpoint, else by the prompt token count it reports); else one clear line."""
        if self.tokenizer_source == "server":
            return
        local = self.tokenizer.encode(TOKENIZER_SAMPLE)
        server = self._server_tokenize(TOKENIZER_SAMPLE)
        if server is not None:
            # the server may put its BOS first, even one the local tokenizer would not add
            special = self.tokenizer.vocab().special
            same = server == local or (server[1:] == local and 0 <= server[0] < len(special)
                                       and bool(special[server[0]]))
            if not same:
                raise ModelLoadError(
                    f"tokenizer {self.tokenizer_source!r} does not match the model at "
                    f"{self.base_url}: {TOKENIZER_SAMPLE[:24]!r}... is {local[:6]}... here and "
                    f"{server[:6]}... there; pass the served model's tokenizer with --tokenizer")
            return
        if self.endpoint != "completions" or self.prompt_as != "text":
            return
        try:
            got = self._complete(local, max_tokens=1)
        except RequestFailed:
            return
        if got.prompt_tokens is not None and got.prompt_tokens not in (len(local),
                                                                        len(local) + 1):
            raise ModelLoadError(
                f"tokenizer {self.tokenizer_source!r} does not match the model at "
                f"{self.base_url}: a sample text is {len(local)} tokens here and "
                f"{got.prompt_tokens} there; pass the served model's tokenizer with --tokenizer")

    def _detect_scoring(self, wanted: str) -> None:
        if self.endpoint != "completions" or wanted == "none":
            return
        sample = self.tokenizer.encode(CALIBRATION_TEXT)
        first = None
        for k in TOP_LOGPROBS:
            try:
                first = self._complete(sample, max_tokens=1, logprobs=k)
            except RequestFailed:
                continue
            if first.top_logprobs and first.top_logprobs[0]:
                self.top_k = k
                break
        if not self.top_k or first is None:
            if wanted not in ("auto", "none"):
                raise ModelLoadError(f"score_via={wanted} needs log-probabilities, and "
                                     f"{self.base_url} returns none")
            return
        ranked = sorted(first.top_logprobs[0].items(), key=lambda kv: -kv[1])
        known = [(self._token_id(k), v) for k, v in ranked]
        known = [(t, v) for t, v in known if t is not None]
        if known:
            self._echo_ok = self._check_echo(sample, *known[0])
        # forced: a token well below the top one, so that a server that reports the biased
        # log-probability (near 0) cannot pass
        below = [(t, v) for t, v in known[1:] if v < known[0][1] - 1.0]
        if below:
            self._forced_ok = self._check_forced(sample, *below[0])
        if wanted == "auto":
            self.score_via = ("echo" if self._echo_ok else "forced" if self._forced_ok
                              else "top_logprobs")
        elif (wanted == "echo" and not self._echo_ok) or (wanted == "forced"
                                                          and not self._forced_ok):
            raise ModelLoadError(f"score_via={wanted}: {self.base_url} does not give correct "
                                 f"{wanted} log-probabilities (checked at load)")
        else:
            self.score_via = wanted

    def _check_echo(self, sample: list[int], token: int, logprob: float) -> bool:
        """Echo ``sample + [token]``: the value at ``token`` must be the plain completion's,
        and that position's top token must be ``token`` (the greedy choice) itself; a server
        that pairs each token with the prediction made after it fails both."""
        try:
            got = self._complete(sample + [token], max_tokens=1, logprobs=1, echo=True)
            values = self._parse_echo(sample + [token], got)
        except (RequestFailed, _Mismatch):
            return False
        lead = len(got.token_logprobs) - (got.completion_tokens or 0) - len(sample) - 1
        top = got.top_logprobs[lead + len(sample)] if lead >= 0 else None
        best = max(top.items(), key=lambda kv: kv[1])[0] if top else None
        return _close(values[len(sample)], logprob) and best == self._key_of(token)

    def _check_forced(self, sample: list[int], token: int, logprob: float) -> bool:
        try:
            value = self._forced(tuple(sample), token)
        except (RequestFailed, _Mismatch):
            return False
        return _close(value, logprob)

    # --- requests ---------------------------------------------------------------------------

    def _extra(self) -> dict[str, Any]:
        # llama.cpp servers default to a repeat penalty of 1.1, which would bend greedy
        # decoding away from repeating the token under test
        if self.flavour in ("llama-cpp-python", "llama.cpp"):
            return {"extra_body": {"repeat_penalty": 1.0}}
        return {}

    def _strip_bos(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        bos = self._bos
        if self.prompt_as == "text" and bos and ids[: len(bos)] == bos:
            return ids[len(bos):]
        return ids

    def _prompt(self, ids: Sequence[int]) -> str | list[int]:
        """The prompt as the server takes it. A text prompt is read back by the server's
        tokenizer, which may split it otherwise than ``ids`` (a token whose text is other
        tokens): nothing is lost where that matters, since an echo is checked token by token
        against ``ids`` (a mismatch is scored ``forced``), ``forced`` needs no alignment,
        and ``repeat-probe`` records whether its prompt re-encodes (``reencodes``)."""
        if self.prompt_as == "ids":
            return list(ids)
        with self._tok_lock:  # requests are built on the pool's threads
            return self.tokenizer.decode(self._strip_bos(ids))

    def _complete(self, ids: Sequence[int], max_tokens: int, **kwargs: Any) -> _Completion:
        """One completion of ``ids``; raises ``RequestFailed`` with the reason."""
        try:
            resp = self.client.completions.create(
                model=self.model, prompt=self._prompt(ids), max_tokens=max_tokens,
                temperature=0, **kwargs, **self._extra())
        except self.openai.APIError as exc:
            raise RequestFailed(self._redact(self._reason(exc))) from None
        if not resp.choices:
            raise RequestFailed("the server answered with no completion")
        choice = resp.choices[0]
        lp = choice.logprobs
        usage = resp.usage
        return _Completion(
            text=choice.text or "",
            tokens=list(lp.tokens or []) if lp else [],
            token_logprobs=list(lp.token_logprobs or []) if lp else [],
            top_logprobs=list(lp.top_logprobs or []) if lp else [],
            finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None)

    def _chat(self, text: str, max_tokens: int) -> str:
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": text}],
                temperature=0, **{self._chat_max_key: max_tokens}, **self._extra())
        except self.openai.APIError as exc:
            raise RequestFailed(self._redact(self._reason(exc))) from None
        if not resp.choices:
            raise RequestFailed("the server answered with no completion")
        return resp.choices[0].message.content or ""

    def _echo(self, seq: Sequence[int]) -> list[float | None]:
        """Log-probability of each token of ``seq`` given the tokens before it (index 0 and a
        leading BOS have none), from one echoed completion."""
        return self._parse_echo(seq, self._complete(seq, max_tokens=1, logprobs=1, echo=True))

    def _parse_echo(self, seq: Sequence[int], got: _Completion) -> list[float | None]:
        sent = self._strip_bos(seq)
        off = len(seq) - len(sent)
        n_done = got.completion_tokens
        entries = len(got.token_logprobs)
        n_prompt = entries - n_done if n_done is not None else len(sent)
        lead = n_prompt - len(sent)  # a BOS the server added and echoes
        if lead not in (0, 1) or len(got.tokens) != entries:
            raise _Mismatch(f"the server read the prompt as {n_prompt} tokens, not "
                            f"{len(sent)}")
        for i, token in enumerate(sent):
            if not self._spelled(token, got.tokens[lead + i]):
                raise _Mismatch(f"the server read token {i} of the prompt as "
                                f"{got.tokens[lead + i]!r}, not "
                                f"{self._spellings[token][0]!r}")
        values: list[float | None] = [None] * len(seq)
        for i in range(len(sent)):
            value = got.token_logprobs[lead + i]
            values[off + i] = None if value is None else float(value)
        return values

    def _forced(self, context: tuple[int, ...], target: int) -> float:
        """log P(target | context): one token generated with the target's logit raised by
        ``FORCE_BIAS``; the server reports its log-probability before the bias."""
        if not self._strip_bos(context):
            raise RequestFailed("position 0 has no context to send")
        got = self._complete(context, max_tokens=1, logprobs=1,
                             logit_bias={str(target): FORCE_BIAS})
        if not got.token_logprobs or got.token_logprobs[0] is None:
            raise RequestFailed("the server returned no log-probability")
        if got.tokens and not self._spelled(target, got.tokens[0]):
            raise RequestFailed(f"the server generated {got.tokens[0]!r} despite a logit bias "
                                f"on {self._spellings[target][0]!r}")
        return float(got.token_logprobs[0])

    def _top(self, context: tuple[int, ...]) -> dict[str, float]:
        if not self._strip_bos(context):
            raise RequestFailed("position 0 has no context to send")
        got = self._complete(context, max_tokens=1, logprobs=self.top_k)
        if not got.top_logprobs or not got.top_logprobs[0]:
            raise RequestFailed("the server returned no log-probabilities")
        return dict(got.top_logprobs[0])

    def _run(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run jobs on the pool, in order; a job's ``RequestFailed``/``_Mismatch`` is its
        result."""
        def call(job: Callable[[], Any]) -> Any:
            try:
                return job()
            except (RequestFailed, _Mismatch) as exc:
                return exc
        return list(self._pool.map(call, jobs))

    def _reason(self, exc: BaseException, load: bool = False) -> str:
        """One line for a failed request; ``load``: said at load time (no retry count)."""
        openai = self.openai
        n = self.retries
        retries = f"{n} {'retry' if n == 1 else 'retries'}"
        tries = "" if load or not n else f" after {retries}"
        if isinstance(exc, openai.APITimeoutError):
            if load:
                return f"no answer within {self._contact_timeout:g} s"
            return f"timeout after {self.timeout:g} s" + (f" ({retries})" if n else "")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc.__context__
            detail = first_line(cause if cause is not None else exc, MESSAGE_CHARS)
            return f"connection failed{tries}: {detail}"
        if isinstance(exc, openai.APIStatusError):
            code = exc.status_code
            if code in (401, 403):  # its message may quote part of the key: not kept
                return f"HTTP {code}: the key in ${self.key_env} was refused"
            retried = code in (408, 409, 429) or code >= 500
            message = _server_message(exc)
            return (f"HTTP {code}{tries if retried else ''}"
                    + (f": {message}" if message else ""))
        return first_line(exc, MESSAGE_CHARS)

    def _redact(self, text: str) -> str:
        if self._key and self._key != NO_KEY and len(self._key) >= 4:
            text = text.replace(self._key, "***")
        return text

    # --- the Backend interface --------------------------------------------------------------

    @property
    def tokenizer(self) -> _Tokenizer:
        if self._tok is None:
            raise HarnessError("the openai backend has no tokenizer loaded")
        return self._tok

    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, f"{self.base_url}|{self.model}", "api",
                           self.vocab().tokenizer_hash())

    def vocab(self) -> Vocab:
        return self.tokenizer.vocab()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        return self.tokenizer.decode_batch(seqs)

    def bos_ids(self) -> list[int]:
        return [] if self.prompt_as == "text" else list(self._bos)

    def context_length(self) -> int | None:
        return self._context

    def describe(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "server": self.flavour,
            "endpoint": self.endpoint,
            "prompt_as": self.prompt_as,
            "score_via": self.score_via,
            "top_logprobs": self.top_k,
            "echo_checked": self._echo_ok,
            "forced_checked": self._forced_ok,
            "tokenizer": self.tokenizer_source,
            "server_tokenize": self._tokenize_route,
            "context_length": self._context,
            "api_key_env": self.key_env,
            "concurrency": self.concurrency,
            "timeout_s": self.timeout,
            "retries": self.retries,
        }

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Greedy completions (temperature 0). ``ids`` are the local tokenizer's encoding of
        the returned text: asking for the generated tokens' log-probabilities to learn their
        ids costs llama_cpp.server a sort of the vocabulary per token (ten times the time)."""
        def job(req: GenerateRequest) -> Callable[[], GenerateResult]:
            def run() -> GenerateResult:
                if self.endpoint == "chat":
                    prompt = self._prompt(req.ids)
                    text = self._chat(prompt if isinstance(prompt, str) else
                                      self.tokenizer.decode(prompt), req.max_new_tokens)
                else:
                    text = self._complete(req.ids, max_tokens=req.max_new_tokens).text
                return GenerateResult(ids=[], text=text)
            return run

        out = self._run([job(r) for r in requests])
        results = [GenerateResult(error=str(o)) if isinstance(o, Exception) else o for o in out]
        good = [r for r in results if r.error is None]
        for r, ids in zip(good, self.tokenizer.encode_batch([r.text for r in good]),
                          strict=True):
            r.ids = list(ids)
        return results

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Exact log-probabilities by ``echo`` or ``forced`` requests (see the class), or
        top-k approximations; identical requests are sent once."""
        if self.score_via is None:
            raise NotImplementedError(f"the server at {self.base_url} gives no "
                                      "log-probabilities: cannot score")
        results = [ScoreResult() for _ in requests]
        wanted: list[tuple[int, int, int]] = []  # (request, slot, position)
        for i, req in enumerate(requests):
            if problem := req.problem():
                results[i].error = problem
            else:
                results[i].logprobs = [math.nan] * len(req.positions)
                wanted.extend((i, k, p) for k, p in enumerate(req.positions))
        if self.score_via == "echo":
            self._score_echo(requests, wanted, results)
        elif self.score_via == "forced":
            self._score_forced(requests, wanted, results)
        else:
            self._score_top(requests, wanted, results)
        return results

    def _score_echo(self, requests: Sequence[ScoreRequest], wanted: list[tuple[int, int, int]],
                    results: list[ScoreResult]) -> None:
        """One echoed sequence per distinct context: the request itself for its own next
        tokens, ``ids[:p] + [target]`` for any other target; a sequence that is a prefix of
        another is read from the longer one."""
        need: dict[tuple[int, int, int], tuple[int, ...]] = {}
        for i, k, p in wanted:
            ids, t = requests[i].ids, requests[i].targets[k]
            need[(i, k, p)] = (tuple(ids) if p < len(ids) and ids[p] == t
                               else tuple(ids[:p]) + (t,))
        seqs = sorted(set(need.values()))
        cover = {}
        for j in range(len(seqs) - 1, -1, -1):  # longest first: a prefix takes its extension
            s = seqs[j]
            nxt = seqs[j + 1] if j + 1 < len(seqs) else None
            cover[s] = cover[nxt] if nxt is not None and nxt[: len(s)] == s else s
        roots = sorted(set(cover.values()))
        answers = dict(zip(roots, self._run([lambda s=s: self._echo(s) for s in roots]),
                           strict=True))
        retry: list[tuple[int, int, int]] = []
        for (i, k, p), seq in need.items():
            got = answers[cover[seq]]
            if isinstance(got, _Mismatch) and self._forced_ok:
                retry.append((i, k, p))
            elif isinstance(got, Exception):
                results[i].error = str(got)
            elif got[p] is None:
                results[i].error = f"the server echoed no log-probability at position {p}"
            else:
                results[i].logprobs[k] = got[p]
        if retry:  # the text re-tokenized differently: ask position by position instead
            self._score_forced(requests, retry, results)
        self._drop_failed(results)

    def _score_forced(self, requests: Sequence[ScoreRequest],
                      wanted: list[tuple[int, int, int]], results: list[ScoreResult]) -> None:
        jobs = sorted({(tuple(requests[i].ids[:p]), requests[i].targets[k])
                       for i, k, p in wanted})  # sorted: neighbours share the server's cache
        answers = dict(zip(jobs, self._run([lambda c=c, t=t: self._forced(c, t)
                                            for c, t in jobs]), strict=True))
        for i, k, p in wanted:
            got = answers[(tuple(requests[i].ids[:p]), requests[i].targets[k])]
            if isinstance(got, Exception):
                results[i].error = str(got)
            else:
                results[i].logprobs[k] = got
        self._drop_failed(results)

    def _score_top(self, requests: Sequence[ScoreRequest], wanted: list[tuple[int, int, int]],
                   results: list[ScoreResult]) -> None:
        """Top-k only: a target outside the top k gets the k-th log-probability, an upper
        bound on its own."""
        contexts = sorted({tuple(requests[i].ids[:p]) for i, _, p in wanted})
        answers = dict(zip(contexts, self._run([lambda c=c: self._top(c) for c in contexts]),
                           strict=True))
        for i, k, p in wanted:
            got = answers[tuple(requests[i].ids[:p])]
            if isinstance(got, Exception):
                results[i].error = str(got)
            else:
                results[i].logprobs[k] = self._lookup(got, requests[i].targets[k])[0]
        self._drop_failed(results)

    def _lookup(self, top: dict[str, float], target: int) -> tuple[float, str]:
        """The log-probability of ``target`` in a top-k answer and how far to trust it:
        ``exact``; ``bound`` (outside the top k: the k-th value, an upper bound); ``unknown``
        (a string that other tokens share is in the top k: it may or may not be the target's,
        so its value is only a guess)."""
        key = self._key_of(target)
        if key is not None and key in top:
            return float(top[key]), "exact"
        for k, v in top.items():
            if k.startswith("bytes:") and self._token_id(k) == target:
                return float(v), "exact"
        shared = [k for k in self._spellings[target] if k in top] \
            if 0 <= target < len(self._spellings) else []
        if shared:
            return float(max(top[k] for k in shared)), "unknown"
        return float(min(top.values())), "bound"

    @staticmethod
    def _drop_failed(results: list[ScoreResult]) -> None:
        for r in results:
            if r.error:
                r.logprobs = []

    def probe(self, requests: Sequence[ProbeRequest]) -> list[ProbeResult]:
        """One completion per request: ``steps`` greedy tokens with the top-k
        log-probabilities at each (requests run ``concurrency`` at a time).

        P(target) is exact where the target is among the top k. Where it is not, the k-th
        probability bounds it from above; that bound is kept when it is already below
        ``stop_at`` (the verdict cannot change), and otherwise the exact value is asked for
        with ``score`` (``forced`` or ``echo`` requests), as it is for a step where the server
        stopped at end-of-text. Asking for the first token alone and the rest only when
        needed would save llama_cpp.server its 0.13 s per reported step for tokens repeated
        at once, but there the prompt evaluation dominates (about 2 s for a 200-token prompt
        on one busy core) and the server keeps only the last prompt cached: with concurrent
        requests the second completion would evaluate the prompt again."""
        if self.score_via is None:
            return [ProbeResult(error=f"the server at {self.base_url} gives no "
                                      "log-probabilities") for _ in requests]
        prompts = [list(r.prefix) + list(r.ids) for r in requests]
        out = self._run([lambda ids=ids, r=r: self._complete(ids, max_tokens=r.steps,
                                                             logprobs=self.top_k)
                         for ids, r in zip(prompts, requests, strict=True)])
        parts = [got if isinstance(got, Exception) else self._read_steps(got) for got in out]
        return self._probe_results(requests, prompts, parts)

    def _read_steps(self, got: _Completion) -> tuple[list[dict[str, float]], list[int], bool]:
        """(top-k answer per step, greedy ids, stopped at end-of-text) of a completion."""
        tops = [t for t in got.top_logprobs if t]
        greedy = [self._token_id(t) for t in got.tokens[: len(tops)]]
        if any(t is None for t in greedy):  # spelled like other tokens: re-encode the text
            found = self.tokenizer.encode(got.text)
        else:
            found = [int(t) for t in greedy if t is not None]
        return tops, found, got.finish_reason == "stop"

    def _probe_results(self, requests: Sequence[ProbeRequest], prompts: list[list[int]],
                       parts: list[Any]) -> list[ProbeResult]:
        results: list[ProbeResult] = []
        exact = self.score_via in ("echo", "forced")
        later: list[tuple[int, int, ScoreRequest]] = []  # (request, step, what to score)
        for n, (req, ids, part) in enumerate(zip(requests, prompts, parts, strict=True)):
            if isinstance(part, Exception):
                results.append(ProbeResult(error=str(part)))
                continue
            tops, greedy, stopped = part
            probs = []
            for s, top in enumerate(tops):
                value, trust = self._lookup(top, req.target)
                probs.append(float(np.exp(value)))
                settled = trust == "exact" or trust == "bound" and (
                    req.stop_at is not None and probs[-1] < req.stop_at)
                if not settled and exact and s <= len(greedy):
                    ctx = ids + greedy[:s]
                    later.append((n, s, ScoreRequest(ctx, [len(ctx)], [req.target])))
            reached = req.stop_at is not None and max(probs, default=0.0) >= req.stop_at
            if (exact and stopped and len(tops) < req.steps and not reached
                    and len(tops) <= len(greedy)):
                ctx = ids + greedy[: len(tops)]  # the step at which the server stopped
                probs.append(math.nan)
                later.append((n, len(tops), ScoreRequest(ctx, [len(ctx)], [req.target])))
            results.append(ProbeResult(probs=probs, ids=greedy))
        if later:
            for (n, s, _), res in zip(later, self.score([x[2] for x in later]), strict=True):
                if res.error:
                    results[n] = ProbeResult(error=res.error)
                elif results[n].error is None:
                    results[n].probs[s] = float(np.exp(res.logprobs[0]))
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
        if self._tok is not None and hasattr(self._tok, "close"):
            self._tok.close()
        self._tok = None


# --- tokenizers -----------------------------------------------------------------------------


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


def _local_tokenizer(spec: str) -> _Tokenizer:
    """``tiktoken:ENCODING``, a model alias, a .gguf file, an HF tokenizer folder or a
    tokenizer.json file."""
    if spec.startswith("tiktoken:"):
        return _tiktoken_tokenizer(spec.partition(":")[2])
    from harness.plugins import registry

    alias = registry().models.get(spec)
    target = alias.resolve_target() if alias is not None else spec
    path = Path(target).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"tokenizer {spec!r}: no GGUF file at {path}")
        try:
            from backends.llamacpp import GGUFTokenizer
        except ImportError as exc:
            raise HarnessError(f"a .gguf tokenizer needs llama-cpp-python ({exc.name} is "
                               "missing): pip install llama-cpp-python") from None
        return GGUFTokenizer(str(path))
    if path.is_dir() or path.name.endswith(".json") and path.is_file():
        return HFTokenizer(path)
    what = f"model alias {spec!r} resolves to {target!r}, which" if alias else repr(spec)
    raise ModelLoadError(f"tokenizer {what} is not a .gguf file, a tokenizer folder, a "
                         "tokenizer.json file or tiktoken:ENCODING")


class HFTokenizer:
    """A Hugging Face (fast) tokenizer from a local folder or ``tokenizer.json``."""

    def __init__(self, path: Path) -> None:
        try:
            from transformers import AutoTokenizer, PreTrainedTokenizerFast
        except ImportError:
            raise HarnessError("a Hugging Face tokenizer needs transformers: "
                               "pip install 'glitch-harness[hf]'") from None
        from backends.hf import quiet_transformers

        try:
            with quiet_transformers():
                if path.is_dir():
                    self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                else:
                    self.tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load a tokenizer from {path}: "
                                 f"{first_line(exc, MESSAGE_CHARS)}") from None
        self._vocab: Vocab | None = None

    def vocab(self) -> Vocab:
        if self._vocab is None:
            from backends.hf import tokenizer_vocab

            self._vocab = tokenizer_vocab(self.tok)
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        backend = self.tok.backend_tokenizer
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(s) for s in seqs]

    def bos_ids(self) -> list[int]:
        return self.encode("", add_special_tokens=True)


def _tiktoken_tokenizer(name: str) -> TiktokenTokenizer:
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


class TiktokenTokenizer:
    """A tiktoken encoding; ids no token uses (gaps before the special tokens) are padding."""

    def __init__(self, encoding: Any) -> None:
        self.enc = encoding
        self._vocab: Vocab | None = None

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


class ServerTokenizer:
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

    def bos_ids(self) -> list[int]:
        return self.encode("", add_special_tokens=True)


# --- helpers --------------------------------------------------------------------------------


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= LOGPROB_TOLERANCE + 0.05 * abs(b)


def _server_message(exc: Any) -> str:
    """The message of an API error body (``{"error": {"message": ..}}`` or ``{"detail"}``)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        message = message or body.get("detail") or ""
        return first_line(str(message), MESSAGE_CHARS) if message else ""
    return first_line(str(body), MESSAGE_CHARS) if body else ""
