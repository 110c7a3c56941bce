"""`harness clusters` on the tiny GPT-2 and on fake backends: what is stored (read back with
plain SQL), what is printed, the output matrix of untied models, bad input as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness import plugins, store
from harness.backend import Capability
from harness.db import open_db
from harness.hookspecs import hookimpl
from harness.kmeans import adjusted_rand_index
from harness.verdicts import FINAL, GLITCH, OK, SUSPECT
from tests.conftest import PLANTED, TINY_VOCAB
from tests.dbs import query


def labels_by_sql(db: str, clustering_id: int, seed: int) -> np.ndarray:
    rows = query(db, "SELECT token_id, cluster FROM token_clusters WHERE clustering_id = ? "
                     "AND seed = ? ORDER BY token_id", clustering_id, seed)
    return np.array([c for _, c in rows])


def test_clusters_are_stored_and_read_back_by_sql(cli, tiny_model_dir, db_url):
    code, out, err = cli("clusters", str(tiny_model_dir), "-k", "8", "--seeds", "2", "--json")
    assert code == 0, err
    got = json.loads(out)
    (c,) = got["clusterings"]
    assert got["tokens"] == TINY_VOCAB and got["tied"] is True
    assert any("padding rows" in n for n in got["notes"])
    assert query(db_url, "SELECT id, matrix, k, seeds_json FROM clusterings") == [
        (c["clustering_id"], "input", 8, "[0, 1]")]
    # every token (not the 4 padding rows) once per seed
    assert query(db_url, "SELECT seed, count(*), min(token_id), max(token_id) FROM "
                         "token_clusters GROUP BY seed ORDER BY seed") == [
        (0, TINY_VOCAB, 0, TINY_VOCAB - 1), (1, TINY_VOCAB, 0, TINY_VOCAB - 1)]
    cid = c["clustering_id"]
    a, b = labels_by_sql(db_url, cid, 0), labels_by_sql(db_url, cid, 1)
    # the stored agreement is the adjusted Rand index of the stored labels
    (agreement,) = query(db_url, "SELECT agreement FROM clusterings")[0]
    assert agreement == pytest.approx(adjusted_rand_index(a, b))
    assert c["agreement"] == pytest.approx(agreement)
    # the collapsed rows share one cluster under each seed
    for labels in (a, b):
        assert len(set(labels[list(PLANTED)].tolist())) == 1
    # cluster sizes agree with the token rows; each cluster's distance column is its own
    sizes = query(db_url, "SELECT seed, cluster, size FROM cluster_centroids ORDER BY seed, "
                          "cluster")
    counted = query(db_url, "SELECT seed, cluster, count(*) FROM token_clusters GROUP BY seed, "
                            "cluster ORDER BY seed, cluster")
    assert [r for r in sizes if r[2]] == counted
    assert len(sizes) == 16
    assert query(db_url, "SELECT count(*) FROM token_clusters WHERE distance < 0") == [(0,)]
    # the tokens nearest the centroid of the whole matrix: the collapsed rows, in the table
    # and in the database
    nearest = query(db_url, "SELECT token_id FROM centroid_distances ORDER BY distance, "
                            "token_id LIMIT 6")
    assert {t for (t,) in nearest} == set(PLANTED)
    assert {r["token_id"] for r in c["closest_to_centroid"][:6]} == set(PLANTED)
    assert len(c["closest_to_centroid"]) == 20
    assert c["verdict_run"] is None and c["glitch_cluster"] is None
    assert len(c["clusters"]) == 8 and all(len(v["members"]) <= 5 for v in c["clusters"])


def _store_verdicts(db: str, model_id: int, glitch: set[int], suspect: set[int]) -> None:
    """A final-verdict run as a scan would leave it (the tiny model cannot be made to fail
    the repeat probe on chosen tokens)."""
    engine = open_db(db)
    with engine.begin() as conn:
        run = store.insert_run(conn, model_id=model_id, detector=FINAL, detector_version="2",
                               harness_version="test", suspicious_when="low", options={},
                               options_key="test", status="done", finished=True, wall_s=0.0)
        store.insert_findings(conn, run, [
            (t, 0.5, GLITCH if t in glitch else SUSPECT if t in suspect else OK, "{}")
            for t in range(TINY_VOCAB + 4)])
    engine.dispose()


def test_the_cluster_holding_the_glitch_tokens_is_named(cli, tiny_model_dir, harness_home):
    db = f"sqlite:///{harness_home / 'verdicts.db'}"
    code, _, err = cli("clusters", str(tiny_model_dir), "-k", "6", "--seeds", "1", "--db", db)
    assert code == 0, err
    (model_id,) = query(db, "SELECT id FROM models")[0]
    _store_verdicts(db, model_id, set(PLANTED), {5, 6, 7})
    code, out, err = cli("clusters", str(tiny_model_dir), "-k", "6", "--seed", "3", "--db", db,
                         "--top", "8")
    assert code == 0, err
    assert query(db, "SELECT count(*), max(seeds_json) FROM clusterings") == [(2, "[3]")]
    (cid,) = query(db, "SELECT max(id) FROM clusterings")[0]
    (cluster,) = query(db, "SELECT DISTINCT cluster FROM token_clusters WHERE clustering_id = "
                           "? AND token_id = ?", cid, PLANTED[0])[0]
    assert f"the glitch tokens: 6 of 6 in cluster {cluster} " in out
    assert "one seed: no agreement" in out
    assert "Tokens closest to the centroid of the input matrix" in out
    code, out, _ = cli("clusters", str(tiny_model_dir), "-k", "6", "--seed", "3", "--db", db,
                       "--json")
    (c,) = json.loads(out)["clusterings"]
    assert c["glitch_cluster"] == cluster and c["glitch_kind"] == GLITCH
    assert {m["token_id"] for m in c["glitch_members"] if m["verdict"] == GLITCH} == \
        set(PLANTED)
    first = c["clusters"][0]  # the most glitch tokens first
    assert first["cluster"] == cluster and first["glitch"] == 6
    assert sum(v["suspect"] for v in c["clusters"]) == 3
    assert [r["verdict"] for r in c["closest_to_centroid"][:6]] == [GLITCH] * 6


# --- matrices: input, output, tied -----------------------------------------------------------


class Untied:
    """A fake backend plugin whose output matrix differs from its input matrix: each has
    its own collapsed rows."""

    INPUT_COLLAPSED = (3, 4, 5)
    OUTPUT_COLLAPSED = (40, 41, 42, 43)

    @hookimpl
    def register_backends(self, register):
        from tests.plugins.fake_backend import FakeBackend

        outer = self

        class UntiedBackend(FakeBackend):
            name = "untied"

            def __init__(self, target: str, **options) -> None:
                super().__init__(target, **options)
                rng = np.random.default_rng(0)
                self._emb = rng.normal(size=(64, 16)).astype(np.float32)
                self._emb[list(outer.INPUT_COLLAPSED)] = 0.001
                self._out = rng.normal(size=(64, 16)).astype(np.float32)
                self._out[list(outer.OUTPUT_COLLAPSED)] = -0.002

            def output_embeddings(self) -> np.ndarray:
                return self._out

            def embeddings_tied(self) -> bool:
                return False

        class NoEmbeddings(UntiedBackend):
            name = "no-embeddings"
            capabilities = frozenset({Capability.VOCAB})

        register("untied", UntiedBackend)
        register("no-embeddings", NoEmbeddings)


@pytest.fixture
def untied():
    plugin = Untied()
    plugins.register_plugin(plugin, name="untied-plugin")
    yield plugin
    plugins.unregister_plugin(plugin)


def test_an_untied_model_gets_both_matrices_clustered(cli, untied, harness_home):
    code, out, err = cli("clusters", "untied:m", "-k", "4", "--seeds", "2", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["tied"] is False
    by_matrix = {c["matrix"]: c for c in got["clusterings"]}
    assert set(by_matrix) == {"input", "output"}
    nearest_in = {r["token_id"] for r in by_matrix["input"]["closest_to_centroid"][:3]}
    nearest_out = {r["token_id"] for r in by_matrix["output"]["closest_to_centroid"][:4]}
    assert nearest_in == set(untied.INPUT_COLLAPSED)
    assert nearest_out == set(untied.OUTPUT_COLLAPSED)
    db = f"sqlite:///{harness_home / 'results.db'}"
    assert query(db, "SELECT matrix, count(*) FROM clusterings JOIN token_clusters ON "
                     "clustering_id = id GROUP BY matrix ORDER BY matrix") == [
        ("input", 128), ("output", 128)]
    code, out, err = cli("clusters", "untied:m", "-k", "4", "--matrix", "output", "--json")
    assert code == 0, err
    assert [c["matrix"] for c in json.loads(out)["clusterings"]] == ["output"]


def test_a_tied_model_is_clustered_once(cli, tiny_model_dir, harness_home):
    code, out, err = cli("clusters", str(tiny_model_dir), "-k", "3", "--seeds", "1",
                         "--matrix", "both", "--top", "0", "--clusters", "0")
    assert code == 0, err
    assert "tied: the output matrix is the input matrix" in " ".join(out.split())
    assert "input embeddings (300 × 32), k = 3" in out
    assert "output embeddings" not in out


# --- bad input: one line, exit 2, nothing stored -------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["-k", "1"], "-k must be at least 2 (got 1)"),
    (["-k", "65"], "-k 65 is larger than the vocabulary (64 tokens)"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--seeds", "2", "--seed", "4"], "give --seeds N or --seed S"),
    (["--seed", "4", "--seed", "4"], "seeds repeat: 4, 4"),
    (["--seed", "-1"], "seeds must be non-negative"),
    (["--matrix", "diagonal"], "--matrix must be one of auto, input, output, both"),
    (["--max-iter", "0"], "--max-iter must be at least 1"),
    (["--top", "-1"], "--top and --clusters must be zero or more"),
])
def test_bad_input_is_one_clear_line(cli, untied, harness_home, args, message):
    code, out, err = cli("clusters", "untied:m", *args)
    assert code == 2, (out, err)
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert message in err
    assert not (harness_home / "results.db").exists() or \
        query(f"sqlite:///{harness_home / 'results.db'}",
              "SELECT count(*) FROM clusterings") == [(0,)]


def test_a_backend_without_embeddings_and_an_unknown_model_are_one_line(cli, untied):
    code, _, err = cli("clusters", "no-embeddings:m", "-k", "4")
    assert code == 2 and err.strip().count("\n") == 0
    assert "backend 'no-embeddings' gives no embedding matrices" in err
    code, _, err = cli("clusters", "no-such-model", "-k", "4")
    assert code == 2 and err.strip().count("\n") == 0
    assert "unknown model 'no-such-model'" in err


# --- the report ------------------------------------------------------------------------------


def test_the_report_shows_the_clusters_and_the_closest_to_centroid_table(
        cli, tiny_model_dir, harness_home, tmp_path):
    import re

    db = f"sqlite:///{harness_home / 'report.db'}"
    code, _, err = cli("scan", str(tiny_model_dir), "-d", "embedding-centroid", "--db", db)
    assert code == 0, err
    page = tmp_path / "before.html"
    code, _, err = cli("report", str(tiny_model_dir), "--db", db, "-o", str(page))
    assert code == 0, err
    assert "No clustering stored" in page.read_text()
    (model_id,) = query(db, "SELECT id FROM models")[0]
    _store_verdicts(db, model_id, set(PLANTED), {7})
    code, _, err = cli("clusters", str(tiny_model_dir), "-k", "5", "--seeds", "2", "--db", db)
    assert code == 0, err
    page = tmp_path / "report.html"
    code, _, err = cli("report", str(tiny_model_dir), "--db", db, "-o", str(page))
    assert code == 0, err
    text = page.read_text()
    (cid, agreement) = query(db, "SELECT id, agreement FROM clusterings")[0]
    assert "k-means clusters of the input embeddings" in text
    assert f"<b>{agreement:.3f}</b>" in text
    (cluster,) = query(db, "SELECT cluster FROM token_clusters WHERE clustering_id = ? AND "
                           "seed = 0 AND token_id = ?", cid, PLANTED[0])[0]
    size = query(db, "SELECT size FROM cluster_centroids WHERE clustering_id = ? AND seed = 0 "
                     "AND cluster = ?", cid, cluster)[0][0]
    assert f"6 of 6 in cluster <b>{cluster}</b> ({size:,} tokens" in text
    table = re.search(r"<table class='clusters'.*?</table>", text, re.S).group(0)
    first = re.search(r"<tr class='glitch-cluster'><td class='num'>(\d+)</td>"
                      r"<td class='num'>([\d,]+)</td>", table)
    assert first is not None and int(first.group(1)) == cluster
    assert table.split("<tbody>")[1].startswith("<tr class='glitch-cluster'>")
    centroid = re.search(r"<table class='centroid'.*?</table>", text, re.S).group(0)
    ids = [int(i) for i in re.findall(r"<tr><td class='num'>\d+</td><td class='num'>(\d+)</td>",
                                      centroid)]
    nearest = [t for (t,) in query(db, "SELECT token_id FROM centroid_distances WHERE "
                                       "clustering_id = ? ORDER BY distance, token_id LIMIT 20",
                                   cid)]
    assert ids == nearest and set(ids[:6]) == set(PLANTED)
    assert centroid.count("v-glitch") == 6
    assert text.count("data:image/png;base64,") >= 2  # the cluster sizes drawn
