"""``harness check``, ``export``, ``show`` and the report's structure facts on SmolLM2: a
short real scan (20 candidates per static detector), text with its verified glitch tokens
planted, and the exported ``logit_bias`` given to a real ``llama_cpp.server``."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from harness.db import open_db
from harness.runner import scan
from tests.crafted_db import store_scan
from tests.llama_server import llama_server

__all__ = ["llama_server"]  # the fixture, imported to be used here

pytestmark = pytest.mark.real_model

# SmolLM2 tokens that every scan verifies as glitch tokens (collapsed embedding rows), and a
# place in text where its tokenizer produces each
PLANTS = {36743: "PlaneProtection", 36744: "ManagementPlaneProtection", 5: "<file_sep>",
          48047: " InstancePreprocess", 45175: " transistorsum"}
LINES = [
    ("Ordinary prose: the café serves naïve crêpes, déjà vu! 🙂 Nothing odd here.", []),
    ("x = obj.PlaneProtection + 1", [36743]),
    ("Say <file_sep> twice: <file_sep>", [5, 5]),
    ("The model calls InstancePreprocess when it starts.", [48047]),
    ("ManagementPlaneProtection", [36744]),
    ("Ünïcödé 🙂🙂 transistorsum and more words after it.", [45175]),
    ("The quick brown fox jumps over the lazy dog; then it sleeps.", []),
]


ORDINARY = (260, 2644)  # ' the', ' cat'


@pytest.fixture(scope="module")
def smollm2_db(tmp_path_factory):
    """A short scan of SmolLM2 (llama.cpp): the static embedding-centroid over every token (it
    flags the collapsed rows), repeat-probe with the screen's short prompts on the planted
    tokens and two ordinary ones."""
    db = tmp_path_factory.mktemp("smollm2-check") / "results.db"
    result = scan("smollm2", open_db(f"sqlite:///{db}"),
                  ["embedding-centroid", "repeat-probe"], tokens=[*PLANTS, *ORDINARY],
                  backend="llamacpp", backend_options={"threads": 2},
                  detector_options={"repeat-probe": {"probes": "screen"}})
    assert result.verdict is not None and result.verdict.status == "done"
    glitch = {t for (t,) in query(db, "SELECT token_id FROM glitch_tokens")}
    assert glitch == set(PLANTS)  # verified: the planted tokens are this scan's own
    return db


def query(db, sql):
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def planted_text() -> tuple[str, list[tuple[int, int, int]]]:
    """The text and its planted findings as (line, 1-based column, token id)."""
    want = []
    for n, (line, ids) in enumerate(LINES, 1):
        at = 0
        for t in ids:
            col = line.index(PLANTS[t], at)
            at = col + len(PLANTS[t])
            want.append((n, col + 1, t))  # a leading space is the token's own
    return "\n".join(line for line, _ in LINES) + "\n", want


def test_check_finds_exactly_the_planted_glitch_tokens(cli, smollm2_db, tmp_path):
    text, want = planted_text()
    path = tmp_path / "mixed.txt"
    path.write_text(text, encoding="utf-8")
    code, out, err = cli("check", "smollm2", str(path), "--json", "--db", str(smollm2_db))
    assert code == 1, err
    found = [json.loads(x) for x in out.splitlines()]
    assert [(f["line"], f["column"], f["token_id"]) for f in found] == want
    assert [f["token"] for f in found] == [PLANTS[t] for _, _, t in want]
    # columns count characters: ' transistorsum' starts at the 11th, after 'Ünïcödé 🙂🙂'
    assert (6, 11, 45175) in [(f["line"], f["column"], f["token_id"]) for f in found]
    # the same text as JSON lines, one line broken: that line is named, the rest checked
    records = [json.dumps({"id": n, "text": line}, ensure_ascii=False)
               for n, (line, _) in enumerate(LINES, 1)]
    records[2] = records[2][:-5]  # cut: not valid JSON
    jpath = tmp_path / "mixed.jsonl"
    jpath.write_text("\n".join(records) + "\n", encoding="utf-8")
    code, out, err = cli("check", "smollm2", str(jpath), "--field", "text", "--json",
                         "--db", str(smollm2_db))
    assert code == 1
    assert [x for x in err.splitlines() if x.startswith("skipped:")] == [
        f"skipped: {jpath}:3: not valid JSON: Unterminated string starting at (column 19)"]
    got = [(f["line"], f["offset"], f["token_id"]) for f in map(json.loads, out.splitlines())]
    assert got == [(n, c - 1, t) for n, c, t in want if n != 3]


def test_check_of_a_model_never_scanned_says_so(cli, smollm2_db, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("PlaneProtection\n")
    code, out, err = cli("check", "gemma3-270m", str(path), "--db", str(smollm2_db))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "no stored scan of 'gemma3-270m'" in err and "harness scan gemma3-270m" in err


def test_show_and_report_give_the_structure_facts(cli, smollm2_db, tmp_path):
    code, out, err = cli("show", "smollm2", "36743", "--json", "--db", str(smollm2_db))
    assert code == 0, err
    info = json.loads(out)
    assert info["verdict"] == "glitch" and info["structure_stored"] is True
    detectors = [f["detector"] for f in info["findings"]]
    assert detectors == ["embedding-centroid", "repeat-probe", "verdict"]
    s = info["structure"]
    assert [36744, "ManagementPlaneProtection"] in s["contained_in"]["examples"]
    assert s["reachable_alone"] is True
    # its collapsed row sits on the other never-trained rows (14 of them within 3e-6 of
    # cosine 1, so which 8 are named is float32 rounding), none of them an ordinary token
    near = s["neighbours"]
    assert len(near) == 8 and near[-1]["cosine"] > 0.99
    verdicts = {n["verdict"] for n in near}
    assert "glitch" in verdicts and verdicts <= {"glitch", "suspect"}, near
    page = tmp_path / "r.html"
    code, out, err = cli("report", "smollm2", "-o", str(page), "--db", str(smollm2_db))
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    (mid,) = re.findall(r"<tr id='t(\d+)-36743'>", html)
    row = html[html.index(f"<tr id='t{mid}-36743'>"):]
    row = row[:row.index("</tr>")]
    assert "<details>" in row and "ManagementPlaneProtection" in row
    assert f"href='#t{mid}-{near[0]['id']}'" in row


def _complete(url: str, prompt: str, **extra) -> str:
    body = json.dumps({"prompt": prompt, "max_tokens": 4, "temperature": 0,
                       "repeat_penalty": 1.0, **extra}).encode()
    req = urllib.request.Request(url + "/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def test_exported_logit_bias_keeps_a_served_model_off_the_token(cli, llama_server,
                                                               harness_home):
    """The server's greedy answer to 'The capital of France is' starts with ' Paris'; with
    the exported logit_bias of a scan in which ' Paris' is a glitch token, it does not."""
    from harness.tokenizers.gguf import GGUFTokenizer
    from models.aliases import smollm2_gguf

    tok = GGUFTokenizer(smollm2_gguf())
    try:
        (paris,) = tok.encode(" Paris")
        db = harness_home / "paris.db"
        store_scan(open_db(f"sqlite:///{db}"), f"llamacpp:{smollm2_gguf()}", tok.vocab(),
                   {paris: ("glitch", 1e-6), 260: ("ok", 0.5)}, alias="smollm2")
    finally:
        tok.close()
    code, out, err = cli("export", "smollm2", "--format", "logit-bias", "--db", str(db))
    assert code == 0, err
    bias = json.loads(out)
    assert bias == {str(paris): -100}
    prompt = "The capital of France is"
    assert _complete(llama_server, prompt).startswith(" Paris")
    blocked = _complete(llama_server, prompt, logit_bias=bias)
    assert "Paris" not in blocked and blocked.strip(), blocked


def test_token_finder_agrees_with_llama_cpp_on_whole_texts(monkeypatch):
    """Cut, prefiltered and batched, on text full of trailing spaces, blank lines and
    indentation: the whitespace tokens (which a cut in the wrong place changes) and glitch
    tokens at the offsets llama.cpp gives when each text is tokenized whole."""
    import harness.token_finder

    monkeypatch.setattr(harness.token_finder, "GROUP_CHARS", 40)  # many cuts, small groups
    import random

    from harness.token_finder import TokenFinder
    from harness.tokenizers.gguf import GGUFTokenizer
    from models.aliases import smollm2_gguf

    tok = GGUFTokenizer(smollm2_gguf())
    try:
        raw = tok.vocab().raw
        watch = [raw.index(w) for w in (b"  \n", b" \n", b"\n\n", b"  ", b"\n", b".\n")
                 if w in raw] + list(PLANTS)
        rng = random.Random(1)
        words = ["foo", " bar", ".", "  ", " ", "\n", "\n\n", "\t", "\n  ", "x = 1;",
                 "PlaneProtection", " InstancePreprocess", "café", "🙂", "(a)", "#", "'b'"]
        texts = ["".join(rng.choice(words) for _ in range(rng.randrange(1, 300)))
                 for _ in range(40)]
        want = []
        for i, text in enumerate(texts):
            data, pos = text.encode("utf-8"), 0
            for t in tok.encode(text):
                if t in watch:
                    want.append((i, len(data[:pos].decode("utf-8", errors="ignore")), t))
                pos += len(raw[t])
        for prefilter in (True, False):
            finder = TokenFinder(tok, raw, watch, prefilter=prefilter)
            assert finder.cuttable
            got = sorted((h.text, h.offset, h.token_id) for h in finder.find(texts))
            assert got == sorted(want) and len(want) > 100
    finally:
        tok.close()
