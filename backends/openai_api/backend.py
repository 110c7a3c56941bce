"""``OpenAIBackend``: the transport, the tokenizer, what was negotiated and the scorer,
composed into a ``Backend``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import backends.openai_api.negotiate as negotiate
from backends.openai_api.negotiate import SCORE_MODES, ServerInfo
from backends.openai_api.scoring import Scorer
from backends.openai_api.tokenizers import Spellings, _local_tokenizer, load_tokenizer
from backends.openai_api.transport import Completions, Transport, import_openai
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
from harness.errors import HarnessError
from harness.options import BackendOption
from harness.tokenizers import Tokenizer


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
    load_options = (
        BackendOption("tokenizer", str, None, "the model's tokenizer: an alias, a .gguf file, "
                      "an HF tokenizer folder or tokenizer.json, or tiktoken:ENCODING"),
        BackendOption("concurrency", int, 4, "requests in flight at once"),
        BackendOption("timeout", float, 60.0, "seconds before a request is retried"),
        BackendOption("retries", int, 4, "retries of a failed request"),
        BackendOption("api_key_env", str, None, "the variable that holds the API key "
                      "(default OPENAI_API_KEY)"),
        BackendOption("score_via", str, "auto", "auto, echo, forced or top_logprobs"),
    )
    completions: Completions  # set at load, with the tokenizer
    scorer: Scorer

    def __init__(self, target: str, tokenizer: str | None = None, concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 4, api_key_env: str | None = None,
                 score_via: str = "auto") -> None:
        super().__init__(target)
        openai = import_openai()
        if score_via not in SCORE_MODES:
            raise HarnessError(f"score_via must be one of {', '.join(SCORE_MODES)}, "
                               f"not {score_via!r}")
        self.transport = Transport(openai, target, concurrency, timeout, retries, api_key_env)
        self.server = ServerInfo()
        self.tokenizer_source = ""
        try:
            self._load(tokenizer, score_via)
        except BaseException:
            self.close()
            raise

    def _load(self, spec: str | None, score_via: str) -> None:
        t, info = self.transport, self.server
        negotiate.identify_server(t, info)
        self.tokenizer, self.tokenizer_source = load_tokenizer(
            spec, t, info.tokenize_route, info.vocab_size)
        self.completions = c = Completions(t, self.tokenizer)
        self.scorer = Scorer(c, Spellings(self.tokenizer.vocab()))
        negotiate.detect_endpoint(c, info)
        negotiate.check_tokenizer_agrees(c, info, self.tokenizer_source)
        negotiate.detect_scoring(self.scorer, info, score_via)
        caps = {Capability.VOCAB, Capability.GENERATE}
        if self.scorer.score_via is not None:
            caps.add(Capability.SCORE)
        self.capabilities = frozenset(caps)

    @classmethod
    def offline_tokenizer(cls, target: str, meta: dict[str, Any]) -> Tokenizer:
        """The local tokenizer the scan used (``describe()``'s ``tokenizer``); a server's
        own tokenize endpoints need the server."""
        spec = meta.get("tokenizer")
        if not spec or spec == "server":
            raise HarnessError(f"{target!r} was scanned with the server's own tokenizer: "
                               "without the server there is none here")
        return _local_tokenizer(spec)

    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, f"{self.transport.base_url}|{self.transport.model}",
                           "api", self.vocab().tokenizer_hash())

    def bos_ids(self) -> list[int]:
        c = self.completions
        return [] if c.prompt_as == "text" else list(c.bos)

    def context_length(self) -> int | None:
        return self.server.context

    def describe(self) -> dict[str, Any]:
        t, info, c, s = self.transport, self.server, self.completions, self.scorer
        return {
            "base_url": t.base_url,
            "model": t.model,
            "server": info.flavour,
            "endpoint": info.endpoint,
            "prompt_as": c.prompt_as,
            "score_via": s.score_via,
            "top_logprobs": s.top_k,
            "echo_checked": s.echo_ok,
            "forced_checked": s.forced_ok,
            "tokenizer": self.tokenizer_source,
            "server_tokenize": info.tokenize_route,
            "context_length": info.context,
            "api_key_env": t.key_env,
            "concurrency": t.concurrency,
            "timeout_s": t.timeout,
            "retries": t.retries,
        }

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Greedy completions (temperature 0). ``ids`` are the local tokenizer's encoding of
        the returned text: asking for the generated tokens' log-probabilities to learn their
        ids costs llama_cpp.server a sort of the vocabulary per token (ten times the time)."""
        c = self.completions

        def job(req: GenerateRequest) -> Callable[[], GenerateResult]:
            def run() -> GenerateResult:
                if self.server.endpoint == "chat":
                    prompt = c.prompt(req.ids)
                    text = self.transport.chat(prompt if isinstance(prompt, str) else
                                               c.tokenizer.decode(prompt), req.max_new_tokens)
                else:
                    text = c.complete(req.ids, max_tokens=req.max_new_tokens).text
                return GenerateResult(ids=[], text=text)
            return run

        out = self.transport.run([job(r) for r in requests])
        results = [GenerateResult(error=str(o)) if isinstance(o, Exception) else o for o in out]
        good = [r for r in results if r.error is None]
        for r, ids in zip(good, c.tokenizer.encode_batch([r.text for r in good]), strict=True):
            r.ids = list(ids)
        return results

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Exact log-probabilities by ``echo`` or ``forced`` requests (see the class), or
        top-k approximations; identical requests are sent once."""
        if self.scorer.score_via is None:
            raise NotImplementedError(f"the server at {self.transport.base_url} gives no "
                                      "log-probabilities: cannot score")
        return self.scorer.score(requests)

    def probe(self, requests: Sequence[ProbeRequest]) -> list[ProbeResult]:
        """One completion per request, with the top-k log-probabilities at each step; exact
        values asked for with ``score`` where the verdict needs them (see ``Scorer.probe``)."""
        if self.scorer.score_via is None:
            return [ProbeResult(error=f"the server at {self.transport.base_url} gives no "
                                      "log-probabilities") for _ in requests]
        return self.scorer.probe(requests)

    def close(self) -> None:
        self.transport.close()
        if self.tokenizer is not None:
            self.tokenizer.close()
        self.tokenizer = None
