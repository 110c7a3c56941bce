"""`harness compare`: two config-built GPT-2s that share a tokenizer (aligned by id), a model
with another tokenizer (aligned by raw bytes), the SQL views, and every output format."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

from harness.compare import _ranks, rank_correlation
from tests.conftest import PLANTED, TINY_ROWS
from tests.dbs import query as rows

MOVED = (120, 121, 122)  # rows collapsed in the second model only


@pytest.fixture(scope="module")
def sibling_dir(tiny_model_dir, tmp_path_factory):
    """The tiny GPT-2 with the same tokenizer, rows PLANTED[:3] trained back to normal and rows
    MOVED collapsed instead: some glitch tokens shared, some not."""
    import torch
    from transformers import GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-sibling")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    model = GPT2LMHeadModel.from_pretrained(out)
    with torch.no_grad():
        w = model.transformer.wte.weight
        gen = torch.Generator().manual_seed(1)
        w[list(PLANTED[:3])] = torch.randn(3, w.shape[1], generator=gen) * w.std()
        w[list(MOVED)] = 0.0005
    model.save_pretrained(out)
    return out


STATIC = "embedding-centroid,unembedding-cosine"


def test_shared_tokenizer_aligns_by_id(cli, tiny_model_dir, sibling_dir, db_url):
    db = db_url
    code, out, err = cli("compare", str(tiny_model_dir), str(sibling_dir), "-d", STATIC,
                         "--db", db, "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["detectors"] == ["embedding-centroid", "unembedding-cosine"]
    (pair,) = [p for p in result["pairs"] if p["detector"] == "embedding-centroid"]
    assert pair["aligned_by"] == "id" and pair["shared_tokens"] == TINY_ROWS
    flagged = {m: {t for (t,) in rows(db, f"""
        SELECT f.token_id FROM findings f JOIN runs r ON r.id = f.run_id
        WHERE r.model_id = {m} AND r.detector = 'embedding-centroid'
          AND f.verdict IN ('glitch', 'suspect')""")} for m in (1, 2)}
    assert set(PLANTED) <= flagged[1] and set(MOVED) <= flagged[2]
    assert pair["flagged_a"] == len(flagged[1]) and pair["flagged_b"] == len(flagged[2])
    assert pair["both"] == len(flagged[1] & flagged[2])
    assert pair["jaccard"] == pytest.approx(len(flagged[1] & flagged[2])
                                            / len(flagged[1] | flagged[2]))
    assert -1 <= pair["spearman"] <= 1
    in_all = {e["token_ids"][result["models"][0]]
              for e in result["flagged_in_all"]["embedding-centroid"]}
    assert in_all == flagged[1] & flagged[2] or len(in_all) == 15  # --top caps the list
    only_b = {e["token_ids"][result["models"][1]]
              for e in result["flagged_in_one_only"]["embedding-centroid"][result["models"][1]]}
    assert set(MOVED) <= only_b
    # the same comparison in SQL, through the shared_tokens view
    (shared,) = rows(db, "SELECT count(*) FROM shared_tokens WHERE model_a = 1 AND model_b = 2")
    assert shared[0] == TINY_ROWS


def test_compare_reuses_stored_runs_and_scans_what_is_missing(cli, tiny_model_dir,
                                                              sibling_dir, db_url):
    db = db_url
    assert cli("scan", str(tiny_model_dir), "-d", STATIC, "--db", db)[0] == 0
    code, _, err = cli("compare", str(tiny_model_dir), str(sibling_dir), "-d", STATIC,
                       "--db", db, "--format", "csv")
    assert code == 0, err
    runs = rows(db, "SELECT model_id, detector, count(*) FROM runs GROUP BY model_id, detector "
                    "ORDER BY model_id, detector")
    assert runs == [(1, "embedding-centroid", 1), (1, "unembedding-cosine", 1),
                    (2, "embedding-centroid", 1), (2, "unembedding-cosine", 1)]
    # --stored compares without loading anything; both now have their runs
    code, out, err = cli("compare", str(tiny_model_dir), str(sibling_dir), "-d", STATIC,
                         "--db", db, "--stored", "--format", "csv")
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert {r["detector"] for r in table} == {"embedding-centroid", "unembedding-cosine"}
    code, _, err = cli("compare", str(tiny_model_dir), "nothing-stored", "--db", db, "--stored")
    assert code == 2 and "no stored scan of 'nothing-stored'" in err


def test_final_verdicts_compare_and_verdict_pairs_view(cli, tiny_model_dir, sibling_dir,
                                                       db_url):
    db = db_url
    code, out, err = cli("compare", str(tiny_model_dir), str(sibling_dir), "--db", db,
                         "--format", "markdown", "--candidates", "12")
    assert code == 0, err
    assert "## final verdict (glitch)" in out and "| model A | model B |" in out
    pairs = rows(db, "SELECT verdict_a, verdict_b FROM verdict_pairs "
                     "WHERE model_a = 1 AND model_b = 2")
    assert len(pairs) == TINY_ROWS
    both = sum(a == b == "glitch" for a, b in pairs)
    final = out[out.index("## final verdict"):]
    (line,) = [x for x in final.splitlines() if x.startswith("| ") and "| id |" in x]
    assert line.split("|")[7].strip() == str(both)


def test_other_tokenizer_aligns_by_raw_bytes(cli, tiny_model_dir, fake_plugin, db_url):
    db = db_url
    code, out, err = cli("compare", str(tiny_model_dir), "fake:seed", "-d", STATIC,
                         "--db", db, "--format", "json")
    assert code == 0, err
    pair = json.loads(out)["pairs"][0]
    assert pair["aligned_by"] == "raw bytes"
    # the fake vocabulary is letters: "a".."z", "aa".."zz", "aaa"...; the tiny BPE has the
    # single letters of its corpus among them
    common = rows(db, """SELECT count(DISTINCT a.raw) FROM tokens a JOIN tokens b
                         ON a.raw = b.raw AND b.model_id = 2 WHERE a.model_id = 1
                         AND length(a.raw) > 0""")[0][0]
    assert pair["shared_tokens"] == common > 10
    (view,) = rows(db, "SELECT count(DISTINCT raw) FROM shared_tokens "
                       "WHERE model_a = 1 AND model_b = 2")
    assert view[0] == common


def test_compare_input_errors_are_one_line(cli, tiny_model_dir):
    code, _, err = cli("compare", str(tiny_model_dir))
    assert code == 2 and "at least two models" in err
    code, _, err = cli("compare", "a", "b", "--format", "yaml")
    assert code == 2 and "--format must be one of" in err
    code, _, err = cli("compare", str(tiny_model_dir), "no-such-model")
    assert code == 2 and "unknown model 'no-such-model'" in err


def test_rank_correlation():
    assert _ranks(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    x = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    assert rank_correlation(x, x ** 3) == pytest.approx(1.0)
    assert rank_correlation(x, -x) == pytest.approx(-1.0)
    assert rank_correlation(x[:2], x[:2]) is None
