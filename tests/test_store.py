"""The storage layer (harness.store) and the views, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness import store
from harness.db import open_db
from tests.dbs import is_postgres, query


@pytest.fixture
def engine(db_url):
    engine = open_db(db_url)
    yield engine
    engine.dispose()


def _model(conn, name: str, n: int = 4) -> int:
    model_id = store.insert_model(conn, ref=f"x:{name}", alias=name, backend="x",
                                  fingerprint=f"fp-{name}", tokenizer_hash="th", vocab_size=n,
                                  meta={"name": name})
    store.insert_tokens(conn, model_id, [bytes([65 + i]) for i in range(n)],
                        [chr(65 + i) for i in range(n)], ["normal"] * n, [None] * n)
    return model_id


def _run(conn, model_id: int, detector: str, findings: list[tuple], when: str = "low") -> int:
    run_id = store.insert_run(conn, model_id=model_id, detector=detector, detector_version="1",
                              harness_version="t", suspicious_when=when, options={"a": 1},
                              options_key="k", status="running")
    store.insert_findings(conn, run_id, findings)
    store.finish_run(conn, run_id, "done", None, 0.1)
    return run_id


def test_a_model_is_stored_once_per_fingerprint(engine):
    with engine.begin() as conn:
        first = _model(conn, "a")
        again = store.insert_model(conn, ref="x:other", alias=None, backend="x",
                                   fingerprint="fp-a", tokenizer_hash="th", vocab_size=4,
                                   meta={})
        assert again == first == store.model_id_by_fingerprint(conn, "fp-a")
        assert store.token_categories(conn, first) == ["normal"] * 4
        assert store.model_by_id(conn, first).label == "a"


def test_findings_are_stored_once_and_read_back(engine):
    with engine.begin() as conn:
        model_id = _model(conn, "a")
        run_id = _run(conn, model_id, "d", [(0, 0.5, "ok", "{}"), (2, None, "suspect", "{}")])
        store.insert_findings(conn, run_id, [(0, 9.0, "glitch", "{}"), (1, 0.1, "ok", "{}")])
    with engine.connect() as conn:
        ids, scores, verdicts = store.run_findings(conn, run_id)
        assert ids.tolist() == [0, 1, 2] and verdicts.tolist() == ["ok", "ok", "suspect"]
        assert scores[0] == 0.5 and np.isnan(scores[2])  # the first finding of token 0 stays
        s, v = store.run_arrays(conn, run_id, 4)
        assert v.tolist() == ["ok", "ok", "suspect", ""] and np.isnan(s[3])
        assert store.verdict_counts(conn, run_id) == {"ok": 2, "suspect": 1}
        assert store.count_findings(conn, run_id, "suspect") == 1
        assert store.token_ids_with_verdict(conn, [run_id], ["suspect"]).tolist() == [2]
        assert store.most_suspicious_token_ids(conn, run_id, 2) == [1, 0]
        assert store.most_suspicious_token_ids(conn, run_id, 2, flagged_only=True) == [2]


def test_bulk_rows_go_in_the_callers_transaction(engine):
    """Findings go in through the driver's own cursor on SQLite: they still commit or roll
    back with the caller's transaction, also on a connection that has not begun one yet."""
    with engine.begin() as conn:
        run_id = _run(conn, _model(conn, "a"), "d", [])
    with pytest.raises(RuntimeError), engine.begin() as conn:
        store.insert_findings(conn, run_id, [(0, 0.5, "ok", "{}")])
        raise RuntimeError
    with engine.connect() as conn:
        store.insert_findings(conn, run_id, [(1, 0.5, "ok", "{}")])
        conn.rollback()
    with engine.connect() as conn:
        assert store.count_findings(conn, run_id) == 0
        ids, scores, verdicts = store.run_findings(conn, run_id)
        assert len(ids) == len(scores) == len(verdicts) == 0
        store.insert_findings(conn, run_id, [(2, None, "suspect", "{}")])
        conn.commit()
    with engine.connect() as conn:
        assert store.count_findings(conn, run_id) == 1


def test_the_latest_runs_and_the_model_scanned_last(engine):
    with engine.begin() as conn:
        a, b = _model(conn, "a"), _model(conn, "b")
        _run(conn, a, "d", [(0, 0.1, "ok", "{}")])
        newer = _run(conn, a, "d", [(0, 0.2, "suspect", "{}")], when="high")
        # a third model of the same alias with no run at all: the scanned one wins (PostgreSQL
        # sorts NULL first in a descending order, SQLite last)
        store.set_model_alias(conn, b, "a")
        c = store.insert_model(conn, ref="x:c", alias="a", backend="x", fingerprint="fp-c",
                               tokenizer_hash="th", vocab_size=0, meta={})
    with engine.connect() as conn:
        (latest,) = store.latest_done_runs(conn, a)
        assert (latest.id, latest.suspicious_when) == (newer, "high")
        assert store.suspicious_when(conn, newer) == "high"
        assert store.find_model(conn, "a") == (a, "a")
        assert store.find_model(conn, "fp-c") == (c, "a")
        assert store.find_model(conn, "nothing") is None


def test_the_verdict_views_agree_on_both_databases(engine, db_url):
    with engine.begin() as conn:
        model_id = _model(conn, "a")
        _run(conn, model_id, "det-b", [(0, 1.0, "suspect", "{}"), (1, 1.0, "ok", "{}")])
        _run(conn, model_id, "det-a", [(0, 1.0, "glitch", "{}"), (1, 1.0, "error", "{}")])
        _run(conn, model_id, "verdict", [
            (0, 0.01, "glitch", json.dumps({"flagged_by": ["det-a", "det-b"]})),
            (1, 0.9, "ok", json.dumps({"flagged_by": []}))])
    got = query(db_url, "SELECT token_id, verdict, n_flagged, flagged_by FROM latest_verdicts "
                        "ORDER BY token_id")
    (t0, v0, n0, by0), (t1, v1, n1, by1) = got
    assert (t0, v0, n0, sorted(by0.split(","))) == (0, "glitch", 3, ["det-a", "det-b", "verdict"])
    assert (t1, v1, n1, by1) == (1, "error", 0, None)
    assert query(db_url, "SELECT token_id FROM flagged_tokens") == [(0,)]
    final = query(db_url, "SELECT token_id, verdict, repeat_prob, flagged_by FROM "
                          "final_verdicts ORDER BY token_id")
    assert [(t, v, p, json.loads(b)) for t, v, p, b in final] == [
        (0, "glitch", 0.01, ["det-a", "det-b"]), (1, "ok", 0.9, [])]
    assert query(db_url, "SELECT token_id, text FROM glitch_tokens") == [(0, "A")]


def test_text_with_nul_on_postgresql(engine, db_url):
    """PostgreSQL's text cannot hold U+0000: a token text with one is stored with ␀ instead;
    the raw bytes keep the truth. SQLite keeps it as it is."""
    with engine.begin() as conn:
        model_id = store.insert_model(conn, ref="x:n", alias=None, backend="x", fingerprint="n",
                                      tokenizer_hash="th", vocab_size=1, meta={})
        store.insert_tokens(conn, model_id, [b"\x00"], ["\x00"], ["byte"], [None])
    want = "\u2400" if is_postgres(db_url) else "\x00"
    assert query(db_url, "SELECT raw, text FROM tokens") == [(b"\x00", want)]
