"""Scans through the CLI on the tiny model: detectors, storage, reuse, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.db import open_db
from harness.runner import scan
from tests.conftest import PLANTED, TINY_ROWS
from tests.dbs import query as rows


def test_scan_stores_model_tokens_runs_findings(cli, tiny_model_dir, db_url):
    code, out, err = cli("scan", str(tiny_model_dir), "--top", "8")
    assert code == 0, err
    db = db_url
    assert rows(db, "SELECT count(*) FROM tokens") == [(TINY_ROWS,)]
    assert rows(db, "SELECT detector, status FROM runs ORDER BY id") == [
        ("embedding-centroid", "done"), ("unembedding-cosine", "done"),
        ("repeat-screen", "done"), ("repeat-probe", "done"), ("verdict", "done")]
    counts = rows(db, "SELECT count(*) FROM findings GROUP BY run_id ORDER BY run_id")
    # the static detectors, the screen and the verdict cover every token; the verifier
    # exactly the tokens the screen did not settle and the tokens a static detector flagged
    n_verified = counts[3][0]
    assert counts == [(TINY_ROWS,), (TINY_ROWS,), (TINY_ROWS,), (n_verified,), (TINY_ROWS,)]
    want = rows(db, "SELECT DISTINCT token_id FROM findings WHERE run_id IN (1, 2, 3) "
                    "AND verdict != 'ok' ORDER BY token_id")
    assert rows(db, "SELECT token_id FROM findings WHERE run_id = 4 ORDER BY token_id") == want
    assert f"every token screened; {n_verified} verified" in out
    assert rows(db, "SELECT count(*) FROM final_verdicts") == [(TINY_ROWS,)]
    flagged = rows(db, "SELECT token_id FROM latest_findings WHERE detector = "
                   "'embedding-centroid' AND verdict = 'suspect'")
    assert {t for (t,) in flagged} >= set(PLANTED)
    # the planted rows head the printed table
    table_ids = [int(line.split()[1]) for line in out.splitlines()
                 if line.startswith("│") and line.split()[1].isdigit()]
    assert set(table_ids[: len(PLANTED)]) == set(PLANTED)
    assert rows(db, "SELECT count(*) FROM latest_verdicts") == [(TINY_ROWS,)]


def test_budget_mode_verifies_the_static_candidates_only(cli, tiny_model_dir, db_url):
    code, out, err = cli("scan", str(tiny_model_dir), "--candidates", "0.02")
    assert code == 0, err
    db = db_url
    assert rows(db, "SELECT detector FROM runs ORDER BY id") == [
        ("embedding-centroid",), ("unembedding-cosine",), ("repeat-screen",),
        ("repeat-probe",), ("verdict",)]
    counts = rows(db, "SELECT count(*) FROM findings GROUP BY run_id ORDER BY run_id")
    n_cand = counts[3][0]
    assert counts == [(TINY_ROWS,), (TINY_ROWS,), (n_cand,), (n_cand,), (TINY_ROWS,)]
    assert len(PLANTED) <= n_cand < TINY_ROWS // 4
    assert f"behavioural detectors ran on {n_cand} tokens" in out
    probed = {t for (t,) in rows(db, "SELECT token_id FROM findings WHERE run_id = 4")}
    assert probed >= set(PLANTED)


def test_an_extra_detector_run_keeps_the_verified_glitch_tokens(cli, tiny_model_dir,
                                                                db_url):
    code, _, err = cli("scan", str(tiny_model_dir))
    assert code == 0, err
    db = db_url
    glitch = rows(db, "SELECT token_id FROM glitch_tokens ORDER BY token_id")
    assert glitch
    for extra in (["-d", "repeated-sequence", "--full"], ["-d", "embedding-centroid"],
                  ["-d", "repeat-probe", "--tokens", "1,2,3"]):
        code, _, err = cli("scan", str(tiny_model_dir), *extra)
        assert code == 0, err
        assert rows(db, "SELECT token_id FROM glitch_tokens ORDER BY token_id") == glitch
    # the verdict now holds repeated-sequence too, and every run's latest finding
    (opts,) = rows(db, "SELECT options_json FROM runs WHERE detector = 'verdict' "
                       "ORDER BY id DESC LIMIT 1")[0]
    assert set(json.loads(opts)["runs"]) == {"embedding-centroid", "unembedding-cosine",
                                             "repeat-screen", "repeat-probe",
                                             "repeated-sequence"}


def test_unembedding_cosine_with_given_reference_finds_the_rest(cli, tiny_model_dir,
                                                              db_url):
    ref = ",".join(map(str, PLANTED[:2]))
    code, _, err = cli("scan", str(tiny_model_dir), "-d", "unembedding-cosine",
                       "-o", f"unembedding-cosine.reference={ref}")
    assert code == 0, err
    db = db_url
    got = rows(db, "SELECT token_id FROM findings WHERE verdict = 'suspect'")
    assert {t for (t,) in got} >= set(PLANTED[2:])
    (opts,) = rows(db, "SELECT options_json FROM runs")[0]
    assert json.loads(opts)["reference_source"] == ["given"]


def test_second_scan_reuses_runs_and_fresh_reruns(cli, tiny_model_dir, db_url):
    assert cli("scan", str(tiny_model_dir))[0] == 0
    code, out, _ = cli("scan", str(tiny_model_dir))
    assert out.count("stored run reused") == 5
    db = db_url
    assert rows(db, "SELECT count(*) FROM runs") == [(5,)]
    assert rows(db, "SELECT count(*) FROM models") == [(1,)]
    cli("scan", str(tiny_model_dir), "--fresh")
    assert rows(db, "SELECT count(*) FROM runs") == [(10,)]
    # changed options make a new run, the old one stays; the final verdict, which reads
    # every detector's latest run, is recorded again
    cli("scan", str(tiny_model_dir), "-d", "embedding-centroid", "-o", "embedding-centroid.z=2")
    assert rows(db, "SELECT detector FROM runs WHERE id > 10") == [("embedding-centroid",),
                                                                   ("verdict",)]
    cli("scan", str(tiny_model_dir), "-d", "embedding-centroid", "-o", "embedding-centroid.z=2")
    assert rows(db, "SELECT count(*) FROM runs") == [(12,)]


def test_interrupted_run_resumes_without_repeating_batches(tiny_model_dir, db_url,
                                                           monkeypatch):
    """Kill a detector after its first committed batch; the next scan does only the rest."""
    import detectors.static as static

    monkeypatch.setattr(static, "CHUNK", 100)
    engine = open_db(db_url)
    calls = []
    real = static.findings_in_chunks

    def dying(token_ids, *a, **k):
        calls.append(len(token_ids))
        for i, batch in enumerate(real(token_ids, *a, **k)):
            if i == 1 and len(calls) == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr("detectors.embedding_centroid.findings_in_chunks", dying)
    with pytest.raises(KeyboardInterrupt):
        scan(str(tiny_model_dir), engine, ["embedding-centroid"])
    db = db_url
    assert rows(db, "SELECT status FROM runs") == [("running",)]
    assert rows(db, "SELECT count(*) FROM findings") == [(100,)]
    result = scan(str(tiny_model_dir), engine, ["embedding-centroid"])
    assert result.outcomes[0].status == "resumed"
    assert calls == [TINY_ROWS, TINY_ROWS - 100]  # the second call skipped finished tokens
    assert rows(db, "SELECT status FROM runs") == [("done",)]
    assert rows(db, "SELECT count(*) FROM findings") == [(TINY_ROWS,)]
    # identical to an uninterrupted run
    fresh = scan(str(tiny_model_dir), engine, ["embedding-centroid"], fresh=True)
    a = rows(db, f"SELECT token_id, score, verdict FROM findings WHERE run_id = "
                 f"{result.outcomes[0].run_id} ORDER BY token_id")
    b = rows(db, f"SELECT token_id, score, verdict FROM findings WHERE run_id = "
                 f"{fresh.outcomes[0].run_id} ORDER BY token_id")
    assert a == b


@pytest.mark.parametrize("args, message", [
    (("scan", "no-such-model"), "unknown model 'no-such-model'"),
    (("scan", "openai-community/gpt2"), "hf:openai-community/gpt2"),
    (("scan", "/nonexistent/model.gguf"), "no model file or folder"),
    (("scan", "smollm2", "-d", "bogus"), "unknown detector 'bogus'"),
    (("scan", "smollm2", "-o", "nodot=1"), "bad option"),
    (("scan", "smollm2", "--backend", "nope"), "unknown backend 'nope'"),
])
def test_bad_input_is_one_line_exit_2(cli, args, message):
    code, out, err = cli(*args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err


@pytest.mark.parametrize("args, usage, message", [
    (("frobnicate",), "Usage: harness [OPTIONS] COMMAND", "No such command 'frobnicate'"),
    (("scan", "--no-such-flag"), "Usage: harness scan [OPTIONS]",
     "No such option: --no-such-flag"),
    (("compare",), "Usage: harness compare [OPTIONS]", "Missing argument 'models'"),
    (("sql",), "Usage: harness sql [OPTIONS]", "Missing argument 'query'"),
    (("scan", "smollm2", "--top", "abc"), "Usage: harness scan [OPTIONS]",
     "Invalid value for '--top'"),
    (("db", "nope"), "Usage: harness db [OPTIONS] COMMAND", "No such command 'nope'"),
    # a backend's option given as a flag of its own: the hint names the backend and the form
    (("scan", "smollm2", "--threads", "4"), "Usage: harness scan [OPTIONS]",
     "--threads is an option of backend llamacpp: write -b threads=VALUE"),
])
def test_command_line_mistakes_give_the_usage_line_and_the_reason(cli, args, usage, message):
    """An unknown command or option, a missing argument, a value of the wrong type: the
    usage line, then the reason in one line; exit 2, no traceback."""
    code, out, err = cli(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(usage), err
    assert lines[1].startswith("error: ") and message in lines[1], err
    assert out == ""


def test_bad_gguf_files_are_one_line(cli, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    code, _, err = cli("scan", str(bad))
    assert code == 2 and "is not a GGUF file" in err
    import gguf

    # a valid header and metadata whose tensor data is cut off
    w = gguf.GGUFWriter(str(tmp_path / "full.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.ones((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 4000])
    code, _, err = cli("scan", str(tmp_path / "cut.gguf"))
    assert code == 2 and "truncated" in err, err
    assert err.strip().count("\n") == 0


def test_option_of_wrong_type_is_one_line(cli, tiny_model_dir):
    code, _, err = cli("scan", str(tiny_model_dir), "-o", "embedding-centroid.z=lots")
    assert code == 2 and "not a valid float" in err
