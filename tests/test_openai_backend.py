"""The ``openai`` backend against a real ``python -m llama_cpp.server`` serving SmolLM2-135M:
what it detects at load, scores against llama.cpp run in-process, scans through the CLI, and
faults injected by a proxy (rate limits, server errors, resets, answers too slow)."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from harness import plugins
from harness.backend import Capability, GenerateRequest, ProbeRequest, ScoreRequest
from harness.db import open_db
from harness.errors import ModelLoadError
from harness.hookspecs import hookimpl
from harness.probe_sets import ProbeSet, plan_prompt
from harness.runner import scan
from tests.fault_proxy import FaultProxy
from tests.llama_server import llama_server, start_llama_server

__all__ = ["llama_server"]  # the fixture, imported to be used here

# no skip when llama-cpp-python is missing: `make test` installs it, and a broken install
# must fail here rather than pass unseen
pytestmark = pytest.mark.real_model

NORMAL = {260: " the", 2644: " cat", 2291: " house", 913: " water", 2382: " red",
          2477: " music", 2583: " computer", 4480: " garden", 4626: " river"}
GLITCH = {43858: "MetaInfoClass", 36743: "PlaneProtection", 5: "<file_sep>"}
TOKENS = sorted(NORMAL) + sorted(GLITCH)
# A short copy prompt: verify-3's prompts are 70 to 270 tokens, which llama_cpp.server on one
# shared core evaluates at about 100 tokens a second.
QUICK = ProbeSet("quick-copy", "a short copy prompt for tests",
                 templates=("Copy the word exactly.\nInput: {token}\nOutput: {token}\n"
                            "Input: {token}\nOutput: {token}\nInput: {token}\nOutput: {repeat}",),
                 labels=("copy",))
MARK = b"Copy the word exactly"  # in the body of every probe request, in no load-time one
KEY = "sk-test-4f1c9a7e2b"


class _QuickProbes:
    @hookimpl
    def register_probes(self, register):
        register(QUICK)


@pytest.fixture(scope="module", autouse=True)
def quick_probes():
    plugin = _QuickProbes()
    plugins.register_plugin(plugin, name="quick-probes")
    yield
    plugins.unregister_plugin(plugin)


@pytest.fixture(scope="module")
def backend(llama_server):
    from backends.openai_api import OpenAIBackend

    be = OpenAIBackend(f"smollm2@{llama_server}", tokenizer="smollm2")
    yield be
    be.close()


@pytest.fixture(scope="module")
def bos_server():
    """A second server that needs an API key and starts every prompt with SmolLM2's BOS
    (<|im_start|>), as models with a BOS do: llama_cpp.server echoes correctly then."""
    with start_llama_server(api_key=KEY, extra_args=(
            "--kv_overrides", "tokenizer.ggml.add_bos_token=bool:true")) as server:
        yield server


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def rows(db: Path, sql: str, *params) -> list:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def findings(db: Path, detector: str) -> dict[int, tuple]:
    return {t: (v, s, json.loads(e)) for t, v, s, e in rows(
        db, "SELECT token_id, verdict, score, evidence_json FROM latest_findings "
            "WHERE detector = ?", detector)}


def quick_options(**extra) -> dict:
    return {"repeat-probe": {"probes": "quick-copy"}, **extra}


# --- what is detected ---------------------------------------------------------------------


def test_detects_what_llama_cpp_server_can_do(backend, llama_server):
    info = backend.describe()
    assert info["server"] == "llama-cpp-python"
    assert info["endpoint"] == "completions"
    assert info["prompt_as"] == "text"  # llama_cpp.server takes no token-id prompts
    # SmolLM2 has no BOS: llama_cpp.server pairs each echoed token with the prediction made
    # after it, which the load-time check catches; logit_bias scoring is exact instead
    assert info["echo_checked"] is False and info["forced_checked"] is True
    assert info["score_via"] == "forced" and info["top_logprobs"] == 20
    assert backend.capabilities == {Capability.VOCAB, Capability.SCORE, Capability.GENERATE}
    assert backend.bos_ids() == []  # the server adds its own BOS to a text prompt
    assert backend.context_length() is None  # llama_cpp.server does not report it
    fp = backend.fingerprint()
    assert (fp.backend, fp.source, fp.dtype) == ("openai", f"{llama_server}|smollm2", "api")
    assert len(backend.vocab()) == 49152
    root = llama_server.removesuffix("/v1")
    for text in ("Hello world", " SolidGoldMagikarp and naïve café", "x = f(1)\n\tdone"):
        ids = backend.encode(text)
        assert post(root + "/extras/tokenize", {"input": text})["tokens"] == ids
        assert post(root + "/extras/detokenize", {"tokens": ids})["text"] == backend.decode(ids)


def test_scores_and_greedy_tokens_match_llama_cpp_in_process(backend):
    """``forced`` scores are llama.cpp's own log-probabilities; probe and generate are greedy."""
    import llama_cpp

    from models.aliases import smollm2_gguf

    llm = llama_cpp.Llama(smollm2_gguf(), n_ctx=256, n_threads=1, logits_all=True,
                          verbose=False)
    ids = backend.encode("The quick brown fox jumps over the lazy dog. The capital of France is")
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    top = logits.max(1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    positions, targets = [1, 4, len(ids) - 1, len(ids)], [ids[1], 17, ids[-1], 260]
    (res,) = backend.score([ScoreRequest(ids, positions, targets)])
    assert res.error is None
    want = [logp[p - 1, t] for p, t in zip(positions, targets, strict=True)]
    # llama.cpp's numbers move by up to ~0.1 with the batch a position is computed in
    np.testing.assert_allclose(res.logprobs, want, atol=0.3)
    greedy = int(np.argmax(logp[-1]))
    (probe,) = backend.probe([ProbeRequest(ids[-3:], greedy, 3, ids[:-3], 0.5)])
    assert probe.error is None and probe.ids[0] == greedy
    assert probe.probs[0] == pytest.approx(float(np.exp(logp[-1, greedy])), abs=0.05)
    (gen,) = backend.generate([GenerateRequest(ids, 4)])
    assert gen.error is None and gen.text.startswith(llm.detokenize([greedy]).decode())
    # bad requests fail alone, with a reason; the others are answered
    bad, good = backend.score([ScoreRequest(ids, [0], [5]), ScoreRequest(ids, [2], [ids[2]])])
    assert "outside" in bad.error and good.error is None and len(good.logprobs) == 1


def test_probe_bounds_and_exact_values(backend):
    """A target outside the top 20 keeps the 20th probability as its bound when that is
    below ``stop_at``; without ``stop_at`` the exact value is asked for."""
    plan = plan_prompt(QUICK.templates[0], "copy", backend.encode)
    req = dict(ids=plan.tail_for(36743), target=36743, steps=2, prefix=plan.prefix)
    bounded, exact = backend.probe([ProbeRequest(**req, stop_at=0.01),
                                    ProbeRequest(**req, stop_at=None)])
    assert bounded.error is None and exact.error is None and bounded.ids == exact.ids
    for b, e in zip(bounded.probs, exact.probs, strict=True):
        assert e <= b + 1e-9 and b < 0.01
    (score,) = backend.score([ScoreRequest(plan.full_ids(36743), [len(plan.full_ids(36743))],
                                           [36743])])
    assert math.exp(score.logprobs[0]) == pytest.approx(exact.probs[0], rel=0.3)


def test_echo_is_used_where_the_server_gets_it_right(bos_server, monkeypatch):
    from backends.openai_api import OpenAIBackend

    monkeypatch.setenv("MY_SERVER_KEY", KEY)
    echo = OpenAIBackend(f"smollm2@{bos_server.url}", tokenizer="smollm2",
                         api_key_env="MY_SERVER_KEY")
    forced = OpenAIBackend(f"smollm2@{bos_server.url}", tokenizer="smollm2",
                           api_key_env="MY_SERVER_KEY", score_via="forced")
    try:
        assert echo.describe()["score_via"] == "echo" and echo.describe()["echo_checked"]
        assert echo.bos_ids() == []  # the server adds the BOS itself
        ids = echo.encode("One, two, three, four, five, six")
        requests = [ScoreRequest(ids, [1, 2, 3, len(ids)], [ids[1], ids[2], 260, 28]),
                    ScoreRequest(ids[:4], [2, 3], [ids[2], ids[3]]),  # read from the first
                    ScoreRequest(ids, [len(ids) - 1], [ids[-1]])]
        a, b = echo.score(requests), forced.score(requests)
        for x, y in zip(a, b, strict=True):
            assert x.error is None and y.error is None
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=0.3)
    finally:
        echo.close()
        forced.close()


def test_a_tokenizer_the_server_does_not_use_is_one_line(llama_server, tiny_model_dir):
    from backends.openai_api import OpenAIBackend

    with pytest.raises(ModelLoadError, match="does not match the model") as info:
        OpenAIBackend(f"smollm2@{llama_server}", tokenizer=str(tiny_model_dir))
    assert "\n" not in str(info.value)


# --- scans --------------------------------------------------------------------------------


def test_scan_through_the_server(cli, llama_server, harness_home):
    code, out, err = cli(
        "scan", f"openai:smollm2@{llama_server}", "-b", "tokenizer=smollm2", "-b", "concurrency=2",
        "--tokens", ",".join(map(str, TOKENS)),
        "-d", "repeat-probe,repeated-sequence,determinism",
        "-o", "repeat-probe.probes=quick-copy",
        "-o", "repeated-sequence.length=4", "-o", "repeated-sequence.contexts=1",
        "-o", "determinism.trials=2", "-o", "determinism.max_new_tokens=4")
    assert code == 0, err
    db = harness_home / "results.db"
    probe = findings(db, "repeat-probe")
    assert set(probe) == set(TOKENS)
    for t in NORMAL:
        assert probe[t][0] == "ok", (t, probe[t])
        assert probe[t][2]["completion"]["copy"].strip().startswith(NORMAL[t].strip())
    for t in GLITCH:
        assert probe[t][0] == "glitch" and probe[t][1] < 0.01, (t, probe[t])
    # a text API cannot show these two as themselves: their text is other tokens
    assert not probe[43858][2]["reencodes"] and not probe[36743][2]["reencodes"]
    seq = findings(db, "repeated-sequence")
    assert set(seq) == set(TOKENS) and all(np.isfinite(s) for _, s, _ in seq.values())
    det = findings(db, "determinism")
    assert set(det) == set(TOKENS) and not [t for t, f in det.items() if f[0] == "error"]
    (meta,) = rows(db, "SELECT meta_json FROM models WHERE backend = 'openai'")[0]
    assert json.loads(meta)["score_via"] == "forced"
    glitch = {t for (t,) in rows(db, "SELECT token_id FROM glitch_tokens")}
    assert glitch == set(GLITCH)


def _fault_rule(plan: dict[int, str]):
    """Faults by the number of the probe request (counting only requests of the scan)."""
    seen = {"n": 0}

    def rule(number: int, path: str, body: bytes) -> str | None:
        if MARK not in body:
            return None
        seen["n"] += 1
        return plan.get(seen["n"])
    return rule


def test_transient_faults_are_retried_and_nothing_is_lost(llama_server, harness_home):
    plan = {1: "429", 2: "500", 3: "reset", 5: "slow", 6: "429", 8: "500", 9: "reset"}
    engine = open_db(f"sqlite:///{harness_home / 'faults.db'}")
    with FaultProxy(llama_server.removesuffix("/v1"), rule=_fault_rule(plan),
                    slow_s=4.0) as proxy:
        result = scan(f"openai:smollm2@{proxy.url}/v1", engine, ["repeat-probe"],
                      backend_options={"tokenizer": "smollm2", "timeout": 2.5, "retries": 3,
                                       "concurrency": 3},
                      detector_options=quick_options(), tokens=TOKENS)
        probes = [b for b in proxy.bodies() if MARK.decode() in str(b.get("prompt"))]
        # every planned fault was injected once (numbers: among all /completions requests)
        assert sorted(f for _, f in proxy.faulted) == sorted(plan.values())
        # each faulted request was sent again: one forwarded probe request per token, plus
        # exact-value requests, and the faulted ones on top
        assert len(probes) - len(plan) >= len(TOKENS)
    (outcome,) = [o for o in result.outcomes if o.detector == "repeat-probe"]
    assert outcome.status == "done"
    got = findings(harness_home / "faults.db", "repeat-probe")
    assert set(got) == set(TOKENS)  # one finding per token: none lost, none doubled
    assert {t: v for t, (v, _, _) in got.items()} == {
        **{t: "ok" for t in NORMAL}, **{t: "glitch" for t in GLITCH}}


def test_permanent_failures_are_errors_and_a_second_scan_retries_only_them(
        llama_server, harness_home):
    failing = {b" garden": "500", b" river": "slow", b"<file_sep>": "reset"}
    engine = open_db(f"sqlite:///{harness_home / 'errors.db'}")
    db = harness_home / "errors.db"

    def rule(number: int, path: str, body: bytes) -> str | None:
        return next((f for word, f in failing.items() if MARK in body and word in body), None)

    options = {"tokenizer": "smollm2", "timeout": 3.0, "retries": 1, "concurrency": 3}
    with FaultProxy(llama_server.removesuffix("/v1"), rule=rule, slow_s=4.0) as proxy:
        ref = f"openai:smollm2@{proxy.url}/v1"
        scan(ref, engine, ["repeat-probe"], backend_options=options,
             detector_options=quick_options(), tokens=TOKENS)
        got = findings(db, "repeat-probe")
        assert set(got) == set(TOKENS)
        errors = {t: ev["error"] for t, (v, _, ev) in got.items() if v == "error"}
        assert set(errors) == {4480, 4626, 5}
        assert errors[4480] == "HTTP 500 after 1 retry: internal error injected by the fault proxy"
        assert errors[4626] == "timeout after 3 s (1 retry)"
        assert errors[5].startswith("connection failed after 1 retry: ")
        for fault in ("500", "slow", "reset"):
            assert proxy.count(fault=fault) == 2  # 1 try + 1 retry
        assert dict(rows(db, "SELECT token_id, verdict FROM final_verdicts WHERE token_id "
                             "IN (4480, 4626, 5)")) == {4480: "error", 4626: "error", 5: "error"}
        proxy.heal()
        proxy.reset_counts()
        result = scan(ref, engine, ["repeat-probe"], backend_options=options,
                      detector_options=quick_options(), tokens=TOKENS)
        asked = [b["prompt"] for b in proxy.bodies() if MARK.decode() in str(b.get("prompt"))]
    (outcome,) = [o for o in result.outcomes if o.detector == "repeat-probe"]
    assert outcome.status == "retried"
    # only the three failed tokens were asked again (exact-value requests for the glitch
    # token <file_sep> included)
    assert asked and all(any(w.decode() in p for w in failing) for p in asked), asked
    assert {w for w in failing if any(w.decode() in p for p in asked)} == set(failing)
    got = findings(db, "repeat-probe")
    assert set(got) == set(TOKENS)
    assert (got[4480][0], got[4626][0], got[5][0]) == ("ok", "ok", "glitch")
    assert dict(rows(db, "SELECT token_id, verdict FROM final_verdicts WHERE token_id "
                         "IN (4480, 4626, 5)")) == {4480: "ok", 4626: "ok", 5: "glitch"}


def test_requests_run_concurrently_and_answers_keep_their_order(llama_server):
    """Requests overlap at the proxy (``concurrency``), and results come back in order."""
    from backends.openai_api import OpenAIBackend

    in_flight = {"now": 0, "max": 0}
    lock = threading.Lock()

    class Counting(FaultProxy):
        def _forward(self, *args):
            with lock:
                in_flight["now"] += 1
                in_flight["max"] = max(in_flight["max"], in_flight["now"])
            try:
                return super()._forward(*args)
            finally:
                with lock:
                    in_flight["now"] -= 1

    with Counting(llama_server.removesuffix("/v1")) as proxy:
        be = OpenAIBackend(f"smollm2@{proxy.url}/v1", tokenizer="smollm2", concurrency=4)
        try:
            prompts = [be.encode(f"Count from {n}: {n}, {n + 1},") for n in range(8)]
            out = be.generate([GenerateRequest(p, 3) for p in prompts])
        finally:
            be.close()
    assert in_flight["max"] > 1
    for n, g in enumerate(out):
        assert g.error is None and str(n + 2) in g.text, (n, g.text)


# --- errors at load -----------------------------------------------------------------------


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:9/v1", "cannot reach the API server at http://127.0.0.1:9/v1"),
    ("http://no-such-host.invalid/v1", "cannot reach the API server at http://no-such-host"),
])
def test_unreachable_server_is_one_line(cli, url, message):
    code, _, err = cli("scan", f"openai:x@{url}", "-b", "tokenizer=smollm2", "--tokens", "1")
    assert code == 2, err
    assert message in err and err.strip().count("\n") == 0, err


def test_keys_are_checked_and_never_stored(cli, bos_server, harness_home, monkeypatch):
    ref = f"openai:smollm2@{bos_server.url}"
    args = ("-b", "tokenizer=smollm2", "--tokens", "260,5", "-d", "repeat-probe",
            "-o", "repeat-probe.probes=quick-copy")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, _, err = cli("scan", ref, *args)
    assert code == 2 and "needs an API key" in err and "$OPENAI_API_KEY" in err, err
    wrong = "sk-wrong-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    code, _, err = cli("scan", ref, *args)
    assert code == 2 and "rejected the API key in $OPENAI_API_KEY" in err, err
    assert wrong not in err and err.strip().count("\n") == 0
    monkeypatch.setenv("HARNESS_OPENAI_KEY_ENV", "MY_SERVER_KEY")
    monkeypatch.setenv("MY_SERVER_KEY", KEY)
    code, _, err = cli("scan", f"openai:nope@{bos_server.url}", *args)
    assert code == 2 and "model 'nope' is not served" in err and "smollm2" in err, err
    code, out, err = cli("scan", ref, *args)
    assert code == 0, err
    assert KEY not in out + err
    files = list(harness_home.rglob("*"))
    assert any(f.name == "results.db" for f in files)
    for f in files:
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_tiktoken_vocab_and_offline_message(monkeypatch, tmp_path):
    import tiktoken

    from harness.tokenizers.tiktoken import TiktokenTokenizer, tiktoken_tokenizer

    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"\xe2\x80": 257}
    enc = tiktoken.Encoding("tiny", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<|end|>": 259})
    vocab = TiktokenTokenizer(enc).vocab()
    assert len(vocab) == 260 and vocab.raw[256] == b"ab" and vocab.raw[97] == b"a"
    assert vocab.padding[258] and not vocab.padding[257]  # 258: an id no token uses
    assert vocab.special[259] and vocab.raw[259] == b"<|end|>"
    assert vocab.byte_token[200] and not vocab.byte_token[97]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # nothing cached: it must fetch
    try:
        tiktoken_tokenizer("cl100k_base")
    except ModelLoadError as exc:
        assert "tiktoken cannot fetch the BPE file of encoding 'cl100k_base'" in str(exc)
    else:
        pytest.skip("this machine can download tiktoken's files")
    with pytest.raises(ModelLoadError, match="no encoding or model"):
        tiktoken_tokenizer("no-such-encoding")


def test_server_tokenizer_reads_the_vocabulary_token_by_token():
    """llama-server's /tokenize and /detokenize, here answered by a function."""
    from concurrent.futures import ThreadPoolExecutor

    from backends.openai_api import ServerTokenizer

    pieces = ["<s>", "a", "b", " c", "ab", "\ufffd"]

    def post(path: str, body: dict):
        if path == "/detokenize":
            return {"content": "".join(pieces[i] for i in body["tokens"])}
        text, out = body["content"], [0] if body.get("add_special") else []
        while text:
            best = max((i for i, p in enumerate(pieces[1:], 1) if text.startswith(p)),
                       key=lambda i: len(pieces[i]))
            out.append(best)
            text = text[len(pieces[best]):]
        return {"tokens": out}

    with ThreadPoolExecutor(2) as pool:
        tok = ServerTokenizer(post, len(pieces), pool)
        vocab = tok.vocab()
        assert vocab.raw[3] == b" c" and vocab.raw[4] == b"ab" and len(vocab) == 6
        assert vocab.byte_token.tolist() == [False] * 5 + [True]  # a partial character
        assert tok.encode("ab c") == [4, 3] and tok.bos_ids() == [0]
        assert tok.encode_batch(["a", "b"]) == [[1], [2]]
        assert tok.decode([4, 3]) == "ab c" and tok.decode_batch([[1], [2]]) == ["a", "b"]
