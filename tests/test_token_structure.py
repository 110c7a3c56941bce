"""Tokenizer-structure facts against brute force, and the scan summary's ranking (issue 14,
item 4: a black-box scan of three tokens lists those three, the glitch token first)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from harness import store
from harness.db import open_db
from harness.summary import top_tokens
from harness.token_structure import VocabBytes, facts, nearest_neighbours
from harness.vocab import Vocab
from tests.crafted_db import store_scan


def test_containing_tokens_match_brute_force():
    rng = np.random.default_rng(0)
    alphabet = [b"a", b"b", b"ab", b"\xc3", b"\xa9", b" "]
    raw = [b"".join(rng.choice(alphabet, size=rng.integers(1, 5))) for _ in range(400)]
    vb = VocabBytes(raw)
    for t in range(0, 400, 7):
        want = sorted(j for j, r in enumerate(raw) if raw[t] in r and len(r) > len(raw[t]))
        assert vb.containing(t).tolist() == want


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(300, 12)).astype(np.float32)
    emb[[5, 6, 7]] = emb[5]  # collapsed rows: each other's nearest, cosine 1
    emb[40:52] = emb[40]  # more collapsed rows than neighbours: the lowest ids are named
    near = nearest_neighbours(emb, [5, 100, 299, 45], k=4)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for t, got in near.items():
        sims = unit @ unit[t]
        sims[t] = -np.inf
        want = np.argsort(-sims, kind="stable")[:4]
        assert sorted(n for n, _ in got) == sorted(want.tolist())
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    assert {n for n, _ in near[5][:2]} == {6, 7} and near[5][0][1] == pytest.approx(1.0)
    assert [n for n, _ in near[45]] == [40, 41, 42, 43]


def test_facts_say_when_a_token_is_reached_only_inside_longer_ones():
    raw = [b"a", b"b", b"ab", b"abb", b"ba"]
    texts = [r.decode() for r in raw]

    def encode_batch(items):  # a tokenizer that never produces 'ab': it spells 'ab' a, b
        return [[0, 1] if s == "ab" else [texts.index(s)] for s in items]

    f = facts(raw, texts, [2, 3], encode_batch)
    assert f[2]["contained_in"] == {"count": 1, "examples": [[3, "abb"]]}
    assert f[2]["alone"] == [0, 1] and f[2]["reachable_alone"] is False
    assert f[2]["only_inside_longer"] is True
    assert f[3]["reachable_alone"] is True and f[3]["only_inside_longer"] is False


def _ranked_ids(engine, model_id, final_run):
    with engine.connect() as conn:
        runs = {r.detector: r.id for r in store.latest_done_runs(conn, model_id)
                if r.detector != "verdict"}
    return [r.token_id for r in top_tokens(engine, model_id, runs, 25, final_run=final_run)]


def test_summary_lists_only_examined_tokens_glitch_first(harness_home):
    """Issue 14, item 4: three probed tokens (static detectors skipped) are the table, the
    glitch one first, then the others by their repeat probability; then with a static
    detector's suspect, that one after the glitch."""
    letters = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(64)]
    vocab = Vocab(raw=[s.encode() for s in letters], text=letters,
                  special=np.zeros(64, bool), byte_token=np.zeros(64, bool))
    engine = open_db(f"sqlite:///{harness_home / 'rank.db'}")
    probed = {30: ("glitch", 1e-4), 10: ("ok", 0.9), 20: ("ok", 0.5)}
    model_id, final = store_scan(engine, "fake:x", vocab, probed, alias="x")
    assert _ranked_ids(engine, model_id, final) == [30, 20, 10]
    engine2 = open_db(f"sqlite:///{harness_home / 'rank2.db'}")
    model_id, final = store_scan(engine2, "fake:y", vocab, probed, alias="y",
                                 static={40: "suspect"})
    assert _ranked_ids(engine2, model_id, final) == [30, 40, 20, 10]


@pytest.fixture
def generate_only():
    from harness import plugins
    from tests.plugins import generate_only

    plugins.register_plugin(generate_only, name="generate-only-plugin")
    yield
    plugins.unregister_plugin(generate_only)


def test_black_box_scan_summary_shows_the_probed_tokens(cli, tiny_model_dir, harness_home,
                                                       generate_only):
    """As a new user through a black-box backend: `--tokens` and the default detectors
    (static ones skipped); the table lists exactly the probed tokens, by final verdict."""
    code, out, err = cli("scan", str(tiny_model_dir), "--backend", "generate-only",
                         "--tokens", "5,20,290", "--db", str(harness_home / "bb.db"))
    assert code == 0, err
    rows = [re.split(r"\s*│\s*", line.strip("│ ")) for line in out.splitlines()
            if re.match(r"^│\s*\d+\s*│", line)]
    assert sorted(int(r[0]) for r in rows) == [5, 20, 290]
    order = {"glitch": 0, "suspect": 1, "error": 2, "ok": 3}
    verdicts = [r[3] for r in rows]
    assert verdicts == sorted(verdicts, key=order.__getitem__)
