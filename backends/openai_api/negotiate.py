"""What an OpenAI-compatible server can do, found at load from its answers: which server it
is and how it tokenizes, which endpoint and prompt form it takes, whether the local
tokenizer is the served model's, and how log-probabilities can be read from it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from backends.openai_api.scoring import Scorer, agrees
from backends.openai_api.transport import Completions, RequestFailed, Transport
from harness.errors import ModelLoadError

TOP_LOGPROBS = (20, 5)  # asked for in turn; OpenAI's completions allow at most 5
SCORE_MODES = ("auto", "echo", "forced", "top_logprobs", "none")
CALIBRATION_TEXT = "Count: one, two, three, four,"  # short: an echo costs per token
TOKENIZER_SAMPLE = "Hello world! Glitch tokens like SolidGoldMagikarp, 12345 and naïve café."


@dataclass
class ServerInfo:
    """What the server says about itself and the endpoint it answers on."""

    flavour: str = "openai-compatible"
    tokenize_route: str | None = None  # whose /tokenize it has: extras, llama.cpp, vllm
    context: int | None = None
    vocab_size: int | None = None
    endpoint: str = "completions"  # or chat


def identify_server(t: Transport, info: ServerInfo) -> None:
    """Reachable, key accepted, model served; which server it is, its tokenize endpoint and
    the context length where reported."""
    _check_server(t, info)
    _detect_flavour(t, info)
    if info.flavour in ("llama-cpp-python", "llama.cpp"):
        # llama.cpp servers default to a repeat penalty of 1.1, which would bend greedy
        # decoding away from repeating the token under test
        t.extra = {"extra_body": {"repeat_penalty": 1.0}}


def _check_server(t: Transport, info: ServerInfo) -> None:
    openai = t.openai
    try:
        page = t.first_contact().models.list()
        served = [m.model_dump() for m in page.data]
    except openai.AuthenticationError:
        raise ModelLoadError(t.auth_message()) from None
    except openai.PermissionDeniedError:
        raise ModelLoadError(f"the server at {t.base_url} refused access with the key in "
                             f"${t.key_env} (HTTP 403)") from None
    except openai.NotFoundError:
        return  # no model list on this server: the first completion will tell
    except openai.APIConnectionError as exc:
        raise ModelLoadError(t.redact(
            f"cannot reach the API server at {t.base_url}: "
            f"{t.reason(exc, load=True)}")) from None
    except openai.APIError as exc:
        raise t.load_error(f"the API server at {t.base_url} failed to list its models",
                           exc) from None
    ids = [str(m.get("id")) for m in served]
    if ids and t.model not in ids:
        shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        raise ModelLoadError(f"model {t.model!r} is not served by {t.base_url} "
                             f"(it serves {shown})")
    entry = next((m for m in served if m.get("id") == t.model), {})
    meta = entry.get("meta") or {}
    for value in (entry.get("max_model_len"), entry.get("context_length"),
                  entry.get("context_window"), meta.get("n_ctx_train")):
        if isinstance(value, int) and value > 0:
            info.context = value
            break
    if isinstance(meta.get("n_vocab"), int):
        info.vocab_size = int(meta["n_vocab"])
    if entry.get("owned_by") == "llamacpp" or meta:
        info.flavour = "llama.cpp"
    if entry.get("owned_by") == "vllm":
        info.flavour = "vllm"


def _detect_flavour(t: Transport, info: ServerInfo) -> None:
    """Which tokenize endpoint the server has: llama_cpp.server's /extras/tokenize,
    llama-server's /tokenize or vLLM's /tokenize (each takes its own body)."""
    routes = [("extras", "/extras/tokenize", {"input": "a"}),
              ("llama.cpp", "/tokenize", {"content": "a"}),
              ("vllm", "/tokenize", {"model": t.model, "prompt": "a"})]
    for name, path, body in routes:
        answer = t.root_post(path, body)
        if isinstance(answer, dict) and isinstance(answer.get("tokens"), list):
            info.tokenize_route = name
            if name == "extras":
                info.flavour = "llama-cpp-python"
            elif name == "vllm":
                info.flavour = "vllm"
                if isinstance(answer.get("max_model_len"), int):
                    info.context = info.context or answer["max_model_len"]
            else:
                info.flavour = "llama.cpp"
            return


def server_tokenize(t: Transport, info: ServerInfo, text: str) -> list[int] | None:
    """``text`` as the server's tokenize endpoint splits it; None without one."""
    if info.tokenize_route is None:
        return None
    body = {"extras": {"input": text},
            "llama.cpp": {"content": text, "add_special": True},
            "vllm": {"model": t.model, "prompt": text}}[info.tokenize_route]
    path = "/extras/tokenize" if info.tokenize_route == "extras" else "/tokenize"
    answer = t.root_post(path, body)
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list):
        return None
    # llama-server may answer [{"id": .., "piece": ..}] when asked for pieces
    return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]


def detect_endpoint(c: Completions, info: ServerInfo) -> None:
    """Completions with the prompt as token ids, else as text, else chat completions."""
    t = c.transport
    if _takes_ids(t, c.bos + c.tokenizer.encode(CALIBRATION_TEXT)):
        c.prompt_as = "ids"
        return
    c.prompt_as = "text"
    try:
        c.complete(c.tokenizer.encode(CALIBRATION_TEXT), max_tokens=1)
        return
    except RequestFailed as exc:
        failure = exc
    if "404" not in str(failure) and "chat" not in str(failure).lower():
        raise ModelLoadError(f"completions at {t.base_url} failed: {failure}")
    info.endpoint = "chat"
    try:
        t.chat(CALIBRATION_TEXT, 1)
    except RequestFailed as exc:
        if "max_completion_tokens" not in str(exc):
            raise ModelLoadError(f"neither completions nor chat completions work at "
                                 f"{t.base_url}: {exc}") from None
        t.chat_max_key = "max_completion_tokens"
        try:
            t.chat(CALIBRATION_TEXT, 1)
        except RequestFailed as exc2:
            raise ModelLoadError(f"chat completions at {t.base_url} failed: "
                                 f"{exc2}") from None


def _takes_ids(t: Transport, ids: list[int]) -> bool:
    """Does the server take a prompt given as token ids? A refusal is a 4xx, or the 500
    llama_cpp.server answers for a body that fails validation; that 500 must not be
    retried like a server fault (it would take the client's whole backoff), so this
    request retries by itself, on rate limits and other server faults only."""
    openai = t.openai
    quick = t.client.with_options(max_retries=0)
    for attempt in range(t.retries + 1):
        try:
            quick.completions.create(model=t.model, prompt=ids, max_tokens=1,
                                     temperature=0, **t.extra)
            return True
        except openai.AuthenticationError:
            raise ModelLoadError(t.auth_message()) from None
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


def check_tokenizer_agrees(c: Completions, info: ServerInfo, source: str) -> None:
    """Once: the server splits a sample text as the local tokenizer does (by its tokenize
    endpoint, else by the prompt token count it reports); else one clear line."""
    if source == "server":
        return
    t = c.transport
    local = c.tokenizer.encode(TOKENIZER_SAMPLE)
    server = server_tokenize(t, info, TOKENIZER_SAMPLE)
    if server is not None:
        # the server may put its BOS first, even one the local tokenizer would not add
        special = c.tokenizer.vocab().special
        same = server == local or (server[1:] == local and 0 <= server[0] < len(special)
                                   and bool(special[server[0]]))
        if not same:
            raise ModelLoadError(
                f"tokenizer {source!r} does not match the model at {t.base_url}: "
                f"{TOKENIZER_SAMPLE[:24]!r}... is {local[:6]}... here and {server[:6]}... "
                "there; pass the served model's tokenizer with --tokenizer")
        return
    if info.endpoint != "completions" or c.prompt_as != "text":
        return
    try:
        got = c.complete(local, max_tokens=1)
    except RequestFailed:
        return
    if got.prompt_tokens is not None and got.prompt_tokens not in (len(local),
                                                                    len(local) + 1):
        raise ModelLoadError(
            f"tokenizer {source!r} does not match the model at {t.base_url}: a sample text "
            f"is {len(local)} tokens here and {got.prompt_tokens} there; pass the served "
            "model's tokenizer with --tokenizer")


def detect_scoring(scorer: Scorer, info: ServerInfo, wanted: str) -> None:
    """``scorer.score_via``: ``wanted``, or with ``auto`` the first of ``echo``, ``forced``
    and ``top_logprobs`` that the server gets right; None without log-probabilities."""
    c = scorer.completions
    base_url = c.transport.base_url
    if info.endpoint != "completions" or wanted == "none":
        return
    sample = c.tokenizer.encode(CALIBRATION_TEXT)
    first = None
    for k in TOP_LOGPROBS:
        try:
            first = c.complete(sample, max_tokens=1, logprobs=k)
        except RequestFailed:
            continue
        if first.top_logprobs and first.top_logprobs[0]:
            scorer.top_k = k
            break
    if not scorer.top_k or first is None:
        if wanted not in ("auto", "none"):
            raise ModelLoadError(f"score_via={wanted} needs log-probabilities, and "
                                 f"{base_url} returns none")
        return
    ranked = sorted(first.top_logprobs[0].items(), key=lambda kv: -kv[1])
    known = [(scorer.spellings.token_id(k), v) for k, v in ranked]
    known = [(t, v) for t, v in known if t is not None]
    if known:
        scorer.echo_ok = _check_echo(scorer, sample, *known[0])
    # forced: a token well below the top one, so that a server that reports the biased
    # log-probability (near 0) cannot pass
    below = [(t, v) for t, v in known[1:] if v < known[0][1] - 1.0]
    if below:
        scorer.forced_ok = _check_forced(scorer, sample, *below[0])
    if wanted == "auto":
        scorer.score_via = ("echo" if scorer.echo_ok else "forced" if scorer.forced_ok
                            else "top_logprobs")
    elif (wanted == "echo" and not scorer.echo_ok) or (wanted == "forced"
                                                       and not scorer.forced_ok):
        raise ModelLoadError(f"score_via={wanted}: {base_url} does not give correct "
                             f"{wanted} log-probabilities (checked at load)")
    else:
        scorer.score_via = wanted


def _check_echo(scorer: Scorer, sample: list[int], token: int, logprob: float) -> bool:
    """Echo ``sample + [token]``: the value at ``token`` must be the plain completion's,
    and that position's top token must be ``token`` (the greedy choice) itself; a server
    that pairs each token with the prediction made after it fails both."""
    try:
        got = scorer.completions.complete(sample + [token], max_tokens=1, logprobs=1,
                                          echo=True)
        values = scorer.parse_echo(sample + [token], got)
    except RequestFailed:  # a Mismatch too
        return False
    lead = len(got.token_logprobs) - (got.completion_tokens or 0) - len(sample) - 1
    top = got.top_logprobs[lead + len(sample)] if lead >= 0 else None
    best = max(top.items(), key=lambda kv: kv[1])[0] if top else None
    return agrees(values[len(sample)], logprob) and best == scorer.spellings.key_of(token)


def _check_forced(scorer: Scorer, sample: list[int], token: int, logprob: float) -> bool:
    try:
        value = scorer.forced(tuple(sample), token)
    except RequestFailed:
        return False
    return agrees(value, logprob)
