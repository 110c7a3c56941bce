"""Requests to an OpenAI-compatible server: the openai client, with its retries, for the API
under ``/v1``; a plain POST for the server's own endpoints at its root; the thread pool that
runs requests side by side; one line for each failure, with the API key removed; and token
ids sent as a prompt, as ids or as the text they decode to."""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError, ModelLoadError, first_line
from harness.tokenizers import Tokenizer

DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEY_ENV = "OPENAI_API_KEY"
KEY_ENV_OVERRIDE = "HARNESS_OPENAI_KEY_ENV"  # names the variable that holds the key
NO_KEY = "sk-no-key"  # sent to servers that need no key (the client insists on one)
MESSAGE_CHARS = 200  # of a server's error message quoted in a reason


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


def import_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise HarnessError("the openai backend needs the openai package: "
                           "pip install 'glitch-harness[api]'") from None
    return openai


class RequestFailed(Exception):
    """One API request failed for good (after the client's retries); the text is the reason
    stored with the result, with the API key removed."""


@dataclass
class Completion:
    """The parts of a completion the backend reads."""

    text: str
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


class Transport:
    """The client of one server for one model: requests, retries, failures as one line.

    The openai client retries 408/409/429/5xx, connection errors and timeouts ``retries``
    times with exponential backoff, honouring ``Retry-After``; ``run`` runs requests on
    ``concurrency`` threads. ``extra`` is sent with every completion and ``chat_max_key``
    names the chat's token limit, both as negotiated at load.
    """

    def __init__(self, openai: Any, target: str, concurrency: int, timeout: float,
                 retries: int, key_env: str | None) -> None:
        self.openai = openai
        self.model, self.base_url = split_target(target)
        self.root_url = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.key_env = key_env or os.environ.get(KEY_ENV_OVERRIDE) or KEY_ENV
        key = os.environ.get(self.key_env)
        self.key_given = bool(key)
        self._key = key or NO_KEY
        self.client = openai.OpenAI(api_key=self._key, base_url=self.base_url,
                                    timeout=self.timeout, max_retries=self.retries)
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="openai-api")
        self.contact_timeout = self.timeout
        self.extra: dict[str, Any] = {}
        self.chat_max_key = "max_tokens"

    def first_contact(self) -> Any:
        """The client for the first request: one retry, at most 10 s, so that a wrong URL
        fails in seconds."""
        self.contact_timeout = min(self.timeout, 10.0)
        return self.client.with_options(max_retries=min(self.retries, 1),
                                        timeout=self.contact_timeout)

    def root_post(self, path: str, body: dict) -> Any:
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

    def complete(self, prompt: str | list[int], max_tokens: int, **kwargs: Any) -> Completion:
        """One greedy completion; raises ``RequestFailed`` with the reason."""
        try:
            resp = self.client.completions.create(
                model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                **kwargs, **self.extra)
        except self.openai.APIError as exc:
            raise RequestFailed(self.redact(self.reason(exc))) from None
        if not resp.choices:
            raise RequestFailed("the server answered with no completion")
        choice = resp.choices[0]
        lp = choice.logprobs
        usage = resp.usage
        return Completion(
            text=choice.text or "",
            tokens=list(lp.tokens or []) if lp else [],
            token_logprobs=list(lp.token_logprobs or []) if lp else [],
            top_logprobs=list(lp.top_logprobs or []) if lp else [],
            finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None)

    def chat(self, text: str, max_tokens: int) -> str:
        """One greedy chat completion of ``text`` as the user's message."""
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": text}],
                temperature=0, **{self.chat_max_key: max_tokens}, **self.extra)
        except self.openai.APIError as exc:
            raise RequestFailed(self.redact(self.reason(exc))) from None
        if not resp.choices:
            raise RequestFailed("the server answered with no completion")
        return resp.choices[0].message.content or ""

    def run(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run jobs on the pool, in order; a job's ``RequestFailed`` is its result."""
        def call(job: Callable[[], Any]) -> Any:
            try:
                return job()
            except RequestFailed as exc:
                return exc
        return list(self.pool.map(call, jobs))

    def reason(self, exc: BaseException, load: bool = False) -> str:
        """One line for a failed request; ``load``: said at load time (no retry count)."""
        openai = self.openai
        n = self.retries
        retries = f"{n} {'retry' if n == 1 else 'retries'}"
        tries = "" if load or not n else f" after {retries}"
        if isinstance(exc, openai.APITimeoutError):
            if load:
                return f"no answer within {self.contact_timeout:g} s"
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

    def redact(self, text: str) -> str:
        if self._key and self._key != NO_KEY and len(self._key) >= 4:
            text = text.replace(self._key, "***")
        return text

    def load_error(self, what: str, exc: BaseException) -> ModelLoadError:
        return ModelLoadError(self.redact(f"{what}: {self.reason(exc, load=True)}"))

    def auth_message(self) -> str:
        if not self.key_given:
            return (f"the server at {self.base_url} needs an API key (HTTP 401): set "
                    f"${self.key_env}")
        return (f"the server at {self.base_url} rejected the API key in ${self.key_env} "
                "(HTTP 401)")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


class Completions:
    """Completions of token ids. Where the server takes no token-id prompt (``prompt_as``
    ``text``), the ids go as the text ``tokenizer`` decodes them to, and the server adds
    its own BOS: a leading ``bos`` is dropped."""

    def __init__(self, transport: Transport, tokenizer: Tokenizer) -> None:
        self.transport = transport
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_ids()
        self.prompt_as = "text"
        self._lock = threading.Lock()

    def strip_bos(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        bos = self.bos
        if self.prompt_as == "text" and bos and ids[: len(bos)] == bos:
            return ids[len(bos):]
        return ids

    def prompt(self, ids: Sequence[int]) -> str | list[int]:
        """The prompt as the server takes it. A text prompt is read back by the server's
        tokenizer, which may split it otherwise than ``ids`` (a token whose text is other
        tokens): nothing is lost where that matters, since an echo is checked token by token
        against ``ids`` (a mismatch is scored ``forced``), ``forced`` needs no alignment,
        and ``repeat-probe`` records whether its prompt re-encodes (``reencodes``)."""
        if self.prompt_as == "ids":
            return list(ids)
        with self._lock:  # requests are built on the pool's threads
            return self.tokenizer.decode(self.strip_bos(ids))

    def complete(self, ids: Sequence[int], max_tokens: int, **kwargs: Any) -> Completion:
        """One completion of ``ids``; raises ``RequestFailed`` with the reason."""
        return self.transport.complete(self.prompt(ids), max_tokens, **kwargs)


def _server_message(exc: Any) -> str:
    """The message of an API error body (``{"error": {"message": ..}}`` or ``{"detail"}``)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        message = message or body.get("detail") or ""
        return first_line(str(message), MESSAGE_CHARS) if message else ""
    return first_line(str(body), MESSAGE_CHARS) if body else ""
