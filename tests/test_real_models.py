"""The real models shipped in PyPI packages: SmolLM2-135M-Instruct and Gemma 3 270M.

The first run converts each GGUF to safetensors in the user cache (about 30 s and 80 s here);
later runs load the cached conversion.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from harness.db import open_db
from harness.runner import scan

pytestmark = pytest.mark.real_model

# SmolLM2's collapsed rows: never-used special tokens and a few code fragments, all sharing
# (nearly) one embedding row.
SMOLLM2_DUPLICATES = {5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 36743, 36744, 45175, 48047}


def query(db, sql, *params):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def smollm2_db(tmp_path_factory):
    """The whole pipeline, with 20 candidates per static detector to keep it short."""
    db = tmp_path_factory.mktemp("smollm2") / "results.db"
    result = scan("smollm2", open_db(f"sqlite:///{db}"), candidates=20)
    assert [o.status for o in result.outcomes] == ["done"] * 4
    assert result.verdict is not None and result.verdict.status == "done"
    assert len(SMOLLM2_DUPLICATES) < result.candidates <= 80
    return db


@pytest.fixture(scope="module")
def smollm2():
    from backends.hf import HFBackend
    from models.aliases import smollm2_gguf

    return HFBackend(smollm2_gguf())


def test_smollm2_is_a_working_model(smollm2):
    from harness.backend import GenerateRequest, ScoreRequest

    prompt = smollm2.encode("The capital of France is")
    (gen,) = smollm2.generate([GenerateRequest(prompt, max_new_tokens=3)])
    assert gen.text.startswith(" Paris"), gen.text
    paris, banana = smollm2.encode(" Paris"), smollm2.encode(" banana")
    res = smollm2.score([ScoreRequest(prompt + paris[:1], [len(prompt)], paris[:1]),
                         ScoreRequest(prompt + banana[:1], [len(prompt)], banana[:1])])
    assert res[0].logprobs[0] > -1.0 > -8.0 > res[1].logprobs[0]


def test_smollm2_vocab(smollm2):
    vocab = smollm2.vocab()
    assert len(vocab) == 49152
    assert smollm2.embeddings_tied()
    assert vocab.special[[0, 1, 2]].all()
    assert smollm2.fingerprint().source.startswith("gguf-sha256:")


def test_smollm2_collapsed_rows_are_found(smollm2_db):
    flagged = {t for (t,) in query(smollm2_db, "SELECT token_id FROM latest_findings WHERE "
                                   "detector = 'embedding-centroid' AND verdict = 'suspect'")}
    assert flagged == SMOLLM2_DUPLICATES
    dup = query(smollm2_db, "SELECT json_extract(evidence_json, '$.duplicates') FROM "
                "latest_findings WHERE detector = 'embedding-centroid' AND token_id = 36743")
    assert dup[0][0] >= 2


def test_smollm2_unembedding_cosine_reference_and_verdicts(smollm2_db):
    (opts,) = query(smollm2_db, "SELECT options_json FROM runs "
                    "WHERE detector = 'unembedding-cosine'")[0]
    import json

    opts = json.loads(opts)
    # SmolLM2 has no <unused> tokens and no byte tokens for 0xC0, 0xC1, 0xF5-0xFF.
    assert opts["reference_source"] == ["duplicate-rows", "rare-lead-bytes"]
    suspects = {t for (t,) in query(smollm2_db, "SELECT token_id FROM latest_findings WHERE "
                                    "detector = 'unembedding-cosine' AND verdict = 'suspect'")}
    assert suspects >= SMOLLM2_DUPLICATES
    assert 50 < len(suspects - set(opts["reference_ids"])) < 1000
    common = query(smollm2_db, "SELECT text, verdict FROM latest_findings WHERE text IN "
                   "(' the', ' and', '.', ',', ' of') AND detector = 'unembedding-cosine'")
    assert len(common) == 5 and all(v == "ok" for _, v in common)


@pytest.fixture(scope="module")
def gemma_db(tmp_path_factory):
    from harness.refs import resolve
    from harness.runner import registry

    db = tmp_path_factory.mktemp("gemma") / "results.db"
    engine = open_db(f"sqlite:///{db}")
    ref = resolve("gemma3-270m", registry())
    assert ref.target.endswith("gemma-3-270m-q4_k_m.gguf")
    unused = [6 + i for i in range(100)]  # <unused0> .. <unused99>
    result = scan("gemma3-270m", engine, registry().default_static(), detector_options={
        "unembedding-cosine": {"reference": ",".join(map(str, unused))}})
    assert [o.status for o in result.outcomes] == ["done", "done"]
    return db


def test_gemma_unused_tokens_are_never_trained(gemma_db):
    rows = query(gemma_db, "SELECT token_id, text, category, score, verdict, detector "
                 "FROM latest_findings")
    by_det: dict[str, dict[int, tuple]] = {}
    for tid, text, cat, score, verdict, det in rows:
        by_det.setdefault(det, {})[tid] = (text, cat, score, verdict)
    cos = by_det["unembedding-cosine"]
    assert len(cos) == 262144
    held_out = [t for t, (text, *_rest) in cos.items() if text.startswith("<unused") and t >= 106]
    assert len(held_out) > 6000
    assert all(cos[t][1] == "special" for t in held_out)
    # the unused tokens not in the reference set are found by their unembedding rows
    found = np.mean([cos[t][3] == "suspect" for t in held_out])
    assert found > 0.95, found
    normal = [v for v in cos.values() if v[1] == "normal"]
    assert np.mean([v[3] == "suspect" for v in normal]) < 0.05
    # and they sit close to the centroid of the input embeddings
    cen = by_det["embedding-centroid"]
    ids = np.array(sorted(cen))
    dist = np.array([cen[t][2] for t in ids])
    pct = dist.argsort().argsort() / len(dist)
    unused_pct = pct[np.isin(ids, held_out)]
    assert np.mean(unused_pct < 0.05) > 0.7


def test_smollm2_scan_ends_with_verified_verdicts(smollm2_db, cli, tmp_path):
    final = dict(query(smollm2_db, "SELECT token_id, verdict FROM final_verdicts"))
    assert len(final) == 49152
    glitch = {t for t, v in final.items() if v == "glitch"}
    # every collapsed row is a candidate, and the model cannot repeat any of them
    assert glitch >= SMOLLM2_DUPLICATES
    probe = dict(query(smollm2_db, "SELECT token_id, verdict FROM latest_findings "
                       "WHERE detector = 'repeat-probe'"))
    assert glitch == {t for t, v in probe.items() if v == "glitch"}
    assert final[260] == "ok"  # ' the': not a candidate, flagged by nothing
    truth = tmp_path / "truth.txt"
    truth.write_text("# SmolLM2's collapsed rows\n"
                     + "\n".join(map(str, sorted(SMOLLM2_DUPLICATES))) + "\n")
    code, out, err = cli("evaluate", "smollm2", "--truth", str(truth), "--db", str(smollm2_db),
                         "--json")
    assert code == 0, err
    import json

    ev = json.loads(out)
    assert ev["true_positives"] == len(SMOLLM2_DUPLICATES) and ev["recall"] == 1.0
    assert ev["false_positives"] == len(glitch - SMOLLM2_DUPLICATES)
    assert ev["precision"] == pytest.approx(len(SMOLLM2_DUPLICATES) / len(glitch))


def test_smollm2_repeats_a_healthy_token_and_not_a_collapsed_one(smollm2):
    from detectors.repeat_probe import RepeatProbe
    from harness.detector import ScanContext

    ctx = ScanContext(backend=smollm2, vocab=smollm2.vocab(), categories=np.array([]))
    the = smollm2.encode(" the")
    assert the == [260]
    det = RepeatProbe()
    det.prepare(ctx)
    (findings,) = det.run(ctx, np.array([260, 36743, 5]))
    got = {f.token_id: f for f in findings}
    assert got[260].verdict == "ok" and got[260].score > 0.3
    assert got[36743].verdict == "glitch" and got[36743].score < 0.001
    assert got[5].verdict == "glitch"
    # a glitch token ran through every prompt; each is recorded with its greedy completion
    assert set(got[36743].evidence["p"]) == {"assistant-explain", "repeats", "input-output"}
    assert set(got[36743].evidence["completion"]) == set(got[36743].evidence["p"])
    assert got[260].evidence["reencodes"] is True


def test_smollm2_copies_ordinary_tokens_in_the_second_copy(smollm2):
    from detectors.repeated_sequence import RepeatedSequence
    from harness.detector import ScanContext

    ordinary = np.arange(1000, 1250)  # common BPE merges
    ctx = ScanContext(backend=smollm2, vocab=smollm2.vocab(), categories=np.array([]),
                      scope=ordinary)
    det = RepeatedSequence()
    det.prepare(ctx)
    (found,) = det.run(ctx, ordinary)
    first, second = found.evidence["first"], found.evidence["second"]
    # the "Under-trained and unused tokens" article saw about -7 for the first copy and -1
    # for the second on GPT-2 small
    assert np.median(first) < -6 and np.median(second) > -2.5, (np.median(first),
                                                                 np.median(second))
    assert np.mean(second > first + 3) > 0.9
    assert np.mean(found.verdicts == "ok") > 0.95
