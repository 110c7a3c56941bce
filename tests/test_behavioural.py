"""Behavioural detectors on the tiny GPT-2: prompt building, the fast probe path against the
generic one, resume, the final verdict and `harness evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.backend import Backend, ProbeRequest, ScoreRequest
from harness.db import open_db
from harness.detector import ScanContext
from harness.probe_sets import ProbeSet, plan_prompt
from harness.runner import scan
from tests.conftest import PLANTED, TINY_ROWS
from tests.dbs import is_postgres
from tests.dbs import query as rows


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from backends.hf import HFBackend

    return HFBackend(str(tiny_model_dir), batch_tokens=256)


def test_prompts_carry_the_token_id_in_every_slot(tiny):
    from probes import N_SHOT, VERIFY_3

    for probe_set in (VERIFY_3, N_SHOT):
        for template, label in zip(probe_set.templates, probe_set.labels, strict=True):
            plan = plan_prompt(template, label, tiny.encode)
            ids = plan.full_ids(123)
            assert ids.count(123) == template.count("{token}") == len(plan.slots)
            assert ids[: len(plan.prefix)] == list(plan.prefix)
            # the text around the slots survives: decoding shows the template's words
            assert template.split("{token}")[0].strip()[:20] in tiny.decode(plan.prefix)


def test_probe_set_templates_are_checked():
    with pytest.raises(ValueError, match="must end with"):
        ProbeSet("bad", "no repeat mark", templates=("say {token}",))
    with pytest.raises(ValueError, match="labels"):
        ProbeSet("bad", "", templates=("{token}{repeat}",), labels=("a", "b"))


def test_fast_probe_matches_the_generic_one(tiny):
    """Prefix cache, equal-length batches and dropped rows give what plain generate + score
    give on the whole prompt."""
    plan = plan_prompt("Input: cat, Output: cat. Input: {token}, Output: {repeat}", "t",
                       tiny.encode)
    tokens = list(range(0, TINY_ROWS, 7))
    fast = tiny.probe([ProbeRequest(plan.tail_for(t), t, 3, plan.prefix) for t in tokens])
    slow = Backend.probe(tiny, [ProbeRequest(plan.full_ids(t), t, 3) for t in tokens])
    for f, s in zip(fast, slow, strict=True):
        assert f.error is None and s.error is None
        n = len(s.probs)  # generate stops at end-of-text
        assert f.ids[:n] == s.ids[:n]
        np.testing.assert_allclose(f.probs[:n], s.probs, rtol=1e-4, atol=1e-7)
    # stop_at: a row whose target reached it decodes no further
    stopped = tiny.probe([ProbeRequest(plan.tail_for(t), t, 3, plan.prefix, stop_at=0.0)
                          for t in tokens[:5]])
    assert all(len(r.probs) == 1 for r in stopped)


def test_score_reads_only_the_requested_positions_correctly(tiny):
    import torch

    ids = tiny.encode("The quick brown fox jumps over the lazy dog.")
    positions = [2, 5, len(ids)]
    targets = [ids[1], 17, 3]
    (res,) = tiny.score([ScoreRequest(ids, positions, targets)])
    with torch.inference_mode():
        full = torch.log_softmax(tiny.model(torch.tensor([ids])).logits[0].float(), -1)
    want = [full[p - 1, t].item() for p, t in zip(positions, targets, strict=True)]
    np.testing.assert_allclose(res.logprobs, want, rtol=1e-5)


def test_repeat_probe_text_mode_normalises_like_rumbelow_and_watkins():
    from detectors.repeat_probe import repeats

    assert repeats(" SolidGoldMagikarp", '"SolidGoldMagikarp" back to you')
    assert repeats("hello", "H-E-L-L-O")
    assert repeats(" petertodd", "'Petertodd'")
    assert not repeats(" SolidGoldMagikarp", "'distribute'")
    assert not repeats(" davidjl", "I can't hear you.")


def test_the_screen_settles_only_where_the_model_begins_spelling_the_token():
    from detectors.repeat_screen import begins_spelling

    assert begins_spelling(b" solely", b" sol")  # the copy, in pieces
    assert begins_spelling(b" solely", b" ")  # a space first, then the word
    assert begins_spelling(b" Solely", b"sole")  # up to case and the leading space
    assert begins_spelling(b"--solely", b"sol")
    assert not begins_spelling(b" solely", b"only")  # another word: SmolLM2's answer
    assert not begins_spelling(b"ividual", b" individual")  # the fragment completed
    assert not begins_spelling(b'."', b"_")  # punctuation, answered with other punctuation
    assert not begins_spelling(b"abc", b"")


def test_repeat_probe_text_mode_on_a_white_box_model(cli, tiny_model_dir, db_url):
    code, out, err = cli("scan", str(tiny_model_dir), "-d", "repeat-probe", "--tokens",
                         "5,20,290", "-o", "repeat-probe.mode=text", "-o",
                         "repeat-probe.probes=repeat-12")
    assert code == 0, err
    db = db_url
    found = rows(db, "SELECT token_id, score, verdict, evidence_json FROM findings f "
                     "JOIN runs r ON r.id = f.run_id WHERE r.detector = 'repeat-probe' "
                     "ORDER BY token_id")
    assert [t for t, *_ in found] == [5, 20, 290]
    for _, score, verdict, evidence in found:
        ev = json.loads(evidence)
        assert (verdict, score) in (("ok", 1.0), ("glitch", 0.0))
        assert ev["completion"] and all(isinstance(c, str) for c in ev["completion"].values())
    (opts,) = rows(db, "SELECT options_json FROM runs WHERE detector = 'repeat-probe'")[0]
    assert json.loads(opts)["mode"] == "text"


def test_full_runs_behavioural_detectors_on_every_token(cli, tiny_model_dir, db_url):
    code, out, err = cli("scan", str(tiny_model_dir), "--full", "-d",
                         "embedding-centroid,repeated-sequence")
    assert code == 0, err
    assert "behavioural detectors ran on every token" in out
    db = db_url
    assert rows(db, "SELECT detector, count(*) FROM latest_findings GROUP BY 1 ORDER BY 1") == [
        ("embedding-centroid", TINY_ROWS), ("repeated-sequence", TINY_ROWS),
        ("verdict", TINY_ROWS)]
    (opts,) = rows(db, "SELECT options_json FROM runs WHERE detector = 'repeated-sequence'")[0]
    assert json.loads(opts)["scope"] == "all"
    assert json.loads(opts)["threshold"] == pytest.approx(-np.log(TINY_ROWS), abs=1e-3)


def test_final_verdict_follows_the_verifier(cli, tiny_model_dir, db_url):
    assert cli("scan", str(tiny_model_dir))[0] == 0
    db = db_url
    final = dict(rows(db, "SELECT token_id, verdict FROM final_verdicts"))
    probe = dict(rows(db, "SELECT token_id, verdict FROM latest_findings "
                          "WHERE detector = 'repeat-probe'"))
    seq = dict(rows(db, "SELECT token_id, verdict FROM latest_findings "
                        "WHERE detector = 'repeated-sequence'"))
    static = {t for (t,) in rows(db, "SELECT token_id FROM latest_findings WHERE detector IN "
                                     "('embedding-centroid', 'unembedding-cosine') "
                                     "AND verdict = 'suspect'")}
    assert len(final) == TINY_ROWS
    for t, v in final.items():
        if probe.get(t) == "glitch":
            assert v == "glitch"
        elif probe.get(t) == "ok":
            assert v == ("suspect" if seq.get(t) == "suspect" else "ok")
        else:
            assert v == ("suspect" if t in static else "ok")
    # a random 2-layer model repeats nothing: every probed token is a glitch
    assert set(probe) >= set(PLANTED)
    assert rows(db, "SELECT count(*) FROM glitch_tokens") == [(len(probe),)]
    # each token's evidence names the detectors whose latest finding flagged it, or none
    flagged: dict[int, list[str]] = {}
    for t, det in rows(db, "SELECT token_id, detector FROM latest_findings WHERE verdict IN "
                           "('glitch', 'suspect') AND detector != 'verdict'"):
        flagged.setdefault(t, []).append(det)
    by = dict(rows(db, "SELECT token_id, flagged_by FROM final_verdicts"))
    assert len(by) == TINY_ROWS and flagged
    assert {t: sorted(json.loads(x)) for t, x in by.items() if json.loads(x)} == \
        {t: sorted(d) for t, d in flagged.items()}


@pytest.mark.parametrize("detector, module", [
    ("repeat-probe", "detectors.repeat_probe"),
    ("repeated-sequence", "detectors.repeated_sequence"),
])
def test_behavioural_run_resumes_without_repeating_batches(tiny_model_dir, db_url,
                                                           monkeypatch, detector, module):
    import importlib

    mod = importlib.import_module(module)
    if detector == "repeated-sequence":
        monkeypatch.setattr(mod, "SEQUENCES_PER_BLOCK", 2)
    options = {"repeat-probe": {"batch": 40}} if detector == "repeat-probe" else {}
    cls = {"repeat-probe": "RepeatProbe", "repeated-sequence": "RepeatedSequence"}[detector]
    real_run = getattr(mod, cls).run
    seen: list[list[int]] = []

    def dying(self, ctx, token_ids):
        for batch in real_run(self, ctx, token_ids):
            ids = [f.token_id for f in batch] if isinstance(batch, list) \
                else batch.token_ids.tolist()
            seen.append(ids)
            if len(seen) == 2 and dying.kill:  # the second batch, in one block or two
                raise KeyboardInterrupt
            yield batch

    dying.kill = True
    monkeypatch.setattr(getattr(mod, cls), "run", dying)
    engine = open_db(db_url)
    tokens = list(range(0, TINY_ROWS, 2))
    with pytest.raises(KeyboardInterrupt):
        scan(str(tiny_model_dir), engine, [detector], tokens=tokens, detector_options=options)
    db = db_url
    committed = rows(db, f"SELECT count(*) FROM findings f JOIN runs r ON r.id = f.run_id "
                         f"WHERE r.detector = '{detector}'")[0][0]
    assert committed == len(seen[0])  # the first batch was committed, the second was not
    dying.kill = False
    done_first = set(seen[0])
    seen.clear()
    result = scan(str(tiny_model_dir), engine, [detector], tokens=tokens,
                  detector_options=options)
    outcome = [o for o in result.outcomes if o.detector == detector][0]
    assert outcome.status == "resumed"
    assert not done_first & {t for batch in seen for t in batch}  # nothing redone
    fresh = scan(str(tiny_model_dir), engine, [detector], tokens=tokens, fresh=True,
                 detector_options=options)
    again = [o for o in fresh.outcomes if o.detector == detector][0]

    def findings(run_id):
        # PostgreSQL rounds numeric only, not double precision
        score = "round(CAST(score AS numeric), 5)" if is_postgres(db) else "round(score, 5)"
        return rows(db, f"SELECT token_id, {score}, verdict FROM findings "
                        f"WHERE run_id = {run_id} ORDER BY token_id")

    assert findings(outcome.run_id) == findings(again.run_id)
    assert len(findings(outcome.run_id)) == len(tokens)


def test_evaluate_scores_stored_verdicts(cli, tiny_model_dir, db_url, tmp_path):
    assert cli("scan", str(tiny_model_dir))[0] == 0
    db = db_url
    glitch = {t for (t,) in rows(db, "SELECT token_id FROM glitch_tokens")}
    truth = tmp_path / "truth.txt"
    absent = "never-a-token-here"
    truth.write_text("\n".join(map(str, PLANTED)) + f"\n{absent}\n# a comment\n\n")
    code, out, err = cli("evaluate", str(tiny_model_dir), "--truth", str(truth), "--json")
    assert code == 0, err
    ev = json.loads(out)
    assert ev["truth"] == len(PLANTED) + 1 and ev["not_in_vocab"] == [repr(absent)]
    assert ev["true_positives"] == len(set(PLANTED) & glitch)
    assert ev["false_positives"] == len(glitch - set(PLANTED))
    assert ev["recall"] == pytest.approx(len(set(PLANTED) & glitch) / len(PLANTED))
    code, out, _ = cli("evaluate", str(tiny_model_dir), "--truth", str(truth))
    assert code == 0 and "precision" in out and "recall" in out


@pytest.mark.parametrize("args, message", [
    (("evaluate", "nothing-scanned", "--truth", "repeat-12"), "no stored scan"),
    (("evaluate", "x", "--truth", "/no/such/file"), "neither a file nor a probe set"),
    (("evaluate", "x", "--truth", "n-shot"), "no list of known tokens"),
    (("evaluate", "x", "--truth", "repeat-12", "--positive", "maybe"), "--positive"),
    (("scan", "smollm2", "--tokens", "1,two"), "comma-separated token ids"),
    (("scan", "smollm2", "--candidates", "0"), "--candidates must be positive"),
    (("scan", "smollm2", "-o", "repeat-probe.probes=nope"), "unknown probe set 'nope'"),
])
def test_bad_behavioural_input_is_one_line(cli, args, message):
    code, _, err = cli(*args)
    assert code == 2, err
    assert message in err and err.strip().count("\n") == 0, err


def test_known_gpt2_list_is_complete():
    from probes import REPEAT_12

    known = dict(REPEAT_12.known_tokens)
    assert len(known) == 141
    assert known[43453] == " SolidGoldMagikarp" and known[23282] == " davidjl"
    assert known[188] == "\x00"


def test_scan_context_scope_defaults_to_the_vocabulary(tiny):
    vocab = tiny.vocab()
    ctx = ScanContext(backend=tiny, vocab=vocab, categories=np.array([]))
    assert len(ctx.scope_ids()) == len(vocab)


@pytest.fixture
def generate_only():
    from harness import plugins
    from tests.plugins import generate_only

    plugins.register_plugin(generate_only, name="generate-only-plugin")
    yield
    plugins.unregister_plugin(generate_only)


def test_black_box_backend_gets_text_matching(cli, tiny_model_dir, db_url,
                                              generate_only):
    # no embeddings, so no static detector can pick budget-mode candidates: one clear line
    code, _, err = cli("scan", str(tiny_model_dir), "--backend", "generate-only",
                       "--candidates", "0.02")
    assert code == 2 and "--tokens" in err and err.strip().count("\n") == 0, err
    # the default still examines every token: the screen compares greedy text too
    code, out, err = cli("scan", str(tiny_model_dir), "--backend", "generate-only")
    assert code == 0, err
    db = db_url
    runs = dict(rows(db, "SELECT detector, status FROM runs ORDER BY id"))
    assert runs == {"embedding-centroid": "skipped", "unembedding-cosine": "skipped",
                    "repeat-screen": "done", "repeat-probe": "done", "verdict": "done"}
    screened = rows(db, "SELECT count(*) FROM latest_findings WHERE detector = "
                        "'repeat-screen'")
    unsettled = rows(db, "SELECT token_id FROM latest_findings WHERE detector = "
                         "'repeat-screen' AND verdict != 'ok' ORDER BY token_id")
    verified = rows(db, "SELECT token_id FROM latest_findings WHERE detector = "
                        "'repeat-probe' ORDER BY token_id")
    assert screened == [(TINY_ROWS,)] and unsettled == verified
    code, out, err = cli("scan", str(tiny_model_dir), "--backend", "generate-only",
                         "--tokens", "5,20,290", "-d", "repeat-probe")
    assert code == 0, err
    (opts,) = rows(db, "SELECT options_json FROM runs WHERE detector = 'repeat-probe'")[0]
    assert json.loads(opts)["mode"] == "text"
    found = rows(db, "SELECT token_id, verdict, evidence_json FROM latest_findings "
                     "WHERE detector = 'repeat-probe' ORDER BY token_id")
    assert [t for t, *_ in found] == [5, 20, 290]
    assert rows(db, "SELECT count(*) FROM final_verdicts") == [(TINY_ROWS,)]
    assert all(json.loads(e)["completion"] for *_, e in found)


@pytest.fixture
def flaky():
    from harness import plugins
    from tests.plugins import flaky

    plugins.register_plugin(flaky, name="flaky-plugin")
    flaky.FAIL.clear()
    flaky.ASKED.clear()
    yield flaky
    plugins.unregister_plugin(flaky)


def test_failed_tokens_are_stored_as_errors_and_retried_alone(tiny_model_dir, db_url,
                                                              flaky):
    """A token whose requests fail gets an `error` finding with the reason, never a gap; the
    next scan asks again for exactly those tokens and the verdict follows."""
    db = db_url
    engine = open_db(db)
    tokens = list(range(20, 60))
    flaky.FAIL.update({25, 33, 47})
    first = scan(f"flaky:{tiny_model_dir}", engine, ["repeat-probe"], tokens=tokens)
    (probe,) = [o for o in first.outcomes if o.detector == "repeat-probe"]
    assert probe.status == "done"
    got = rows(db, f"SELECT token_id, verdict, evidence_json FROM findings "
                   f"WHERE run_id = {probe.run_id} ORDER BY token_id")
    assert [t for t, _, _ in got] == tokens  # every token accounted for
    errors = {t: json.loads(e)["error"] for t, v, e in got if v == "error"}
    assert errors == {25: "HTTP 429: rate limited", 33: "HTTP 429: rate limited",
                      47: "HTTP 429: rate limited"}
    final = dict(rows(db, f"SELECT token_id, verdict FROM findings "
                          f"WHERE run_id = {first.verdict.run_id}"))
    assert {t for t, v in final.items() if v == "error"} == {25, 33, 47}

    flaky.FAIL.clear()
    flaky.ASKED.clear()
    again = scan(f"flaky:{tiny_model_dir}", engine, ["repeat-probe"], tokens=tokens)
    (retry,) = [o for o in again.outcomes if o.detector == "repeat-probe"]
    assert retry.status == "retried" and retry.run_id == probe.run_id
    assert set(flaky.ASKED) == {25, 33, 47}
    verdicts = dict(rows(db, f"SELECT token_id, verdict FROM findings "
                             f"WHERE run_id = {probe.run_id}"))
    assert len(verdicts) == len(tokens) and "error" not in verdicts.values()
    final = dict(rows(db, f"SELECT token_id, verdict FROM findings "
                          f"WHERE run_id = {again.verdict.run_id}"))
    assert "error" not in final.values()
    # a third scan has nothing left to do
    flaky.ASKED.clear()
    third = scan(f"flaky:{tiny_model_dir}", engine, ["repeat-probe"], tokens=tokens)
    assert [o.status for o in third.outcomes if o.detector == "repeat-probe"] == ["reused"]
    assert flaky.ASKED == []
