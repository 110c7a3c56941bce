"""The arithmetic of `harness clusters`: k-means, the adjusted Rand index, the distances to
the centroid of the whole matrix, checked against textbook implementations and known values."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest

from harness import kmeans as km
from harness.clusters import stability
from harness.errors import HarnessError
from harness.kmeans import (
    adjusted_rand_index,
    centroid_distances,
    closest_rows,
    kmeans,
    kmeans_plusplus,
    pairwise_agreement,
)


def blobs(n_per: int, centres: np.ndarray, spread: float, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.normal(size=(n_per, centres.shape[1]))
                        for c in centres]).astype(np.float32)
    truth = np.repeat(np.arange(len(centres)), n_per)
    order = rng.permutation(len(x))
    return x[order], truth[order]


def lloyd(x: np.ndarray, init: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Lloyd in float64: every row against every centroid, every iteration, until
    no row changes cluster."""
    x = x.astype(np.float64)
    c = init.astype(np.float64).copy()
    labels = np.full(len(x), -1)
    for _ in range(max_iter):
        new = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
        if (new == labels).all():
            break
        labels = new
        for j in range(len(c)):
            if (labels == j).any():
                c[j] = x[labels == j].mean(axis=0)
    return labels, c


def ari_by_pairs(a, b) -> float:
    """The adjusted Rand index from its definition over every pair of items (Hubert & Arabie
    1985): the pair counts, not the contingency table."""
    n = len(a)
    both = sum(1 for i, j in itertools.combinations(range(n), 2)
               if a[i] == a[j] and b[i] == b[j])
    in_a = sum(1 for i, j in itertools.combinations(range(n), 2) if a[i] == a[j])
    in_b = sum(1 for i, j in itertools.combinations(range(n), 2) if b[i] == b[j])
    expected = in_a * in_b / comb(n, 2)
    best = (in_a + in_b) / 2
    return 1.0 if best == expected else (both - expected) / (best - expected)


# --- adjusted Rand index ---------------------------------------------------------------------


def test_ari_of_identical_and_relabelled_partitions_is_one():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 7, size=500)
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    perm = rng.permutation(7) + 100  # other names for the same clusters
    assert adjusted_rand_index(a, perm[a]) == pytest.approx(1.0)


def test_ari_known_values():
    # hand-computed: [0,0,1,1] vs [0,0,1,2]: 1 pair together in both, 2 in a, 1 in b, of 6;
    # expected 2*1/6 = 1/3, best 3/2: (1 - 1/3) / (3/2 - 1/3) = 4/7
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    # no pair together in both where each puts 2 pairs together: (0 - 2/3) / (2 - 2/3)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    # one cluster against all singletons: nothing to agree on beyond chance
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.0)


def test_ari_matches_the_pair_count_definition():
    rng = np.random.default_rng(2)
    for trial in range(20):
        n = int(rng.integers(5, 40))
        a = rng.integers(0, int(rng.integers(1, 6)), size=n)
        b = a.copy() if trial % 4 == 0 else rng.integers(0, int(rng.integers(1, 6)), size=n)
        b[: n // 3] = rng.integers(0, 4, size=n // 3)
        assert adjusted_rand_index(a, b) == pytest.approx(ari_by_pairs(a, b), abs=1e-12)


def test_ari_of_independent_labelings_is_near_zero():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 10, size=20_000), rng.integers(0, 10, size=20_000)
    assert abs(adjusted_rand_index(a, b)) < 0.01


def test_ari_refuses_labelings_of_different_lengths():
    with pytest.raises(ValueError):
        adjusted_rand_index([0, 1, 1], [0, 1])


# --- k-means -------------------------------------------------------------------------------


def test_kmeans_recovers_separated_blobs_under_every_seed():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(6, 24)) * 10
    x, truth = blobs(300, centres, 0.5)
    runs = [kmeans(x, 6, seed) for seed in range(3)]
    for r in runs:
        assert r.converged
        assert adjusted_rand_index(r.labels, truth) == pytest.approx(1.0)
        assert sorted(r.sizes.tolist()) == [300] * 6
        # each centroid is the mean of its rows
        for j in range(6):
            np.testing.assert_allclose(r.centroids[j], x[r.labels == j].mean(axis=0),
                                       rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r.distances,
                                   np.linalg.norm(x - r.centroids[r.labels], axis=1),
                                   rtol=1e-4, atol=1e-5)
        assert r.inertia == pytest.approx(float((r.distances.astype(float) ** 2).sum()))
    mean, pairs = pairwise_agreement(runs)
    assert mean == pytest.approx(1.0)
    assert [(a, b) for a, b, _ in pairs] == [(0, 1), (0, 2), (1, 2)]


@pytest.mark.parametrize("variant", ["default", "no bounds", "sorted sums", "always check own",
                                     "never check own"])
def test_kmeans_gives_lloyds_result_from_the_same_start(monkeypatch, variant):
    """Elkan's bounds, the own-centroid check and the incremental sums (one-hot or sorted)
    change the cost, not the result: from the same initial centroids the labels are those of
    textbook Lloyd (overlapping clusters, where many rows change cluster over many
    iterations)."""
    bounded = variant != "no bounds"
    setting = {"no bounds": ("BOUNDS_BYTES", 0), "sorted sums": ("ONE_HOT_MAX_K", 4),
               "always check own": ("TIGHTEN_BELOW", 2.0),
               "never check own": ("TIGHTEN_BELOW", -1.0)}.get(variant)
    if setting:
        monkeypatch.setattr(km, *setting)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1500, 10)).astype(np.float32)
    x[:500] += 1.5
    init = x[rng.choice(len(x), 12, replace=False)].astype(np.float64)
    want, want_c = lloyd(x, init, 500)
    got = kmeans(x, 12, init=init, tol=0.0, max_iter=500)
    assert got.converged and got.n_iter > 5
    assert adjusted_rand_index(got.labels, want) == pytest.approx(1.0)
    assert (got.labels == want).mean() == 1.0
    np.testing.assert_allclose(got.centroids, want_c, rtol=1e-4, atol=1e-4)
    if bounded:  # the bounds spared most of the distance computations
        assert got.measured < 0.6 * len(x) * (got.n_iter + 1)
    # the inertia kept up to date from the moves and shifts is the exact one
    seen = []
    kmeans(x, 12, init=init, tol=0.0, max_iter=500, progress=lambda i, c, j: seen.append(j))
    assert seen[-1] == pytest.approx(got.inertia, rel=1e-5)


def test_kmeans_is_deterministic_per_seed():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    a, b = kmeans(x, 20, seed=11), kmeans(x, 20, seed=11)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    c = kmeans(x, 20, seed=12)
    assert not np.array_equal(a.labels, c.labels)


def test_kmeans_plusplus_spreads_its_draws():
    """D² sampling puts one initial centroid in each of well-separated blobs (uniform draws
    would miss one of 8 blobs of equal size most of the time)."""
    centres = np.eye(8, 16) * 100
    x, truth = blobs(100, centres, 0.1, seed=7)
    for seed in range(5):
        init = kmeans_plusplus(x, 8, np.random.default_rng(seed))
        nearest = np.linalg.norm(init[:, None, :] - centres[None], axis=2).argmin(axis=1)
        assert sorted(nearest.tolist()) == list(range(8))
    sampled = kmeans_plusplus(x, 8, np.random.default_rng(0), sample=200)
    assert sampled.shape == (8, 16)
    assert all((np.abs(x - c).sum(axis=1) < 1e-4).any() for c in sampled)  # rows of x


def test_empty_clusters_get_the_farthest_rows():
    """Two initial centroids on one row: one cluster is empty after the first assignment
    and takes the row farthest from its centroid; every cluster ends up used."""
    rng = np.random.default_rng(8)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    x, truth = blobs(50, centres, 0.3, seed=8)
    init = np.stack([x[0], x[0], x[1]]).astype(np.float64)
    r = kmeans(x, 3, init=init)
    assert (r.sizes > 0).all()
    assert adjusted_rand_index(r.labels, truth) == pytest.approx(1.0)
    assert rng is not None


def test_fewer_distinct_rows_than_k_leaves_clusters_empty_without_failing():
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32), 4, axis=0)
    r = kmeans(x, 5, seed=0)
    assert r.labels.shape == (12,) and r.labels.max() < 5
    assert int((r.sizes > 0).sum()) == 3 and int(r.sizes.sum()) == 12
    assert np.isfinite(r.centroids).all()
    assert r.inertia == pytest.approx(0.0, abs=1e-6)
    # identical rows share a cluster
    assert len(set(r.labels[:4].tolist())) == 1


def test_identical_rows_share_a_cluster():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2000, 8)).astype(np.float32)
    collapsed = [3, 500, 501, 1999]
    x[collapsed] = 0.01
    for seed in range(3):
        r = kmeans(x, 30, seed)
        assert len(set(r.labels[collapsed].tolist())) == 1


def test_max_iter_and_tolerance_stop_early():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4000, 12)).astype(np.float32)
    one = kmeans(x, 40, seed=0, max_iter=1)
    assert one.n_iter == 1 and not one.converged
    loose = kmeans(x, 40, seed=0, tol=1.0)
    full = kmeans(x, 40, seed=0, tol=0.0, max_iter=1000)
    assert loose.converged and full.converged
    assert loose.n_iter < full.n_iter
    # the labels returned go with the centroids returned
    np.testing.assert_array_equal(
        loose.labels,
        np.linalg.norm(x[:, None] - loose.centroids[None], axis=2).argmin(axis=1))


@pytest.mark.parametrize("k", [0, 1, 101])
def test_k_out_of_range_is_refused(k):
    x = np.zeros((100, 4), dtype=np.float32)
    with pytest.raises(HarnessError, match="-k"):
        kmeans(x, k)


def test_k_equal_to_the_rows_puts_each_row_alone():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    r = kmeans(x, 40, seed=0)
    assert sorted(r.sizes.tolist()) == [1] * 40
    assert r.inertia == pytest.approx(0.0, abs=1e-6)


# --- the centroid of the whole matrix, and stability ---------------------------------------


def test_centroid_distances_and_the_closest_rows():
    rng = np.random.default_rng(12)
    x = (rng.normal(size=(5000, 20)) + 3.0).astype(np.float32)
    mean = x.astype(np.float64).mean(axis=0)
    x[[17, 4000, 99]] = (mean + np.array([[1e-3], [2e-3], [5e-4]])).astype(np.float32)
    centroid, dist = centroid_distances(x)
    np.testing.assert_allclose(centroid, x.astype(np.float64).mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(dist, np.linalg.norm(x.astype(np.float64) - centroid, axis=1),
                               rtol=1e-5, atol=1e-5)
    assert closest_rows(dist, 3).tolist() == [99, 17, 4000]
    ties = np.array([2.0, 1.0, 1.0, 3.0, 1.0])
    assert closest_rows(ties, 4).tolist() == [1, 2, 4, 0]
    assert closest_rows(ties, 10).tolist() == [1, 2, 4, 0, 3]


def test_stability_is_one_for_repeated_clusters_and_low_for_reshuffled_ones():
    rng = np.random.default_rng(13)
    centres = rng.normal(size=(4, 10)) * 20
    x, _ = blobs(100, centres, 0.5, seed=13)
    runs = [kmeans(x, 4, s) for s in range(3)]
    for st in stability(runs):
        np.testing.assert_allclose(st, 1.0)
    assert stability(runs[:1]) == [None]
    noise = rng.normal(size=(400, 10)).astype(np.float32)
    shuffled = [kmeans(noise, 4, s) for s in range(3)]
    assert min(float(np.nanmean(s)) for s in stability(shuffled)) < 0.95


def test_the_result_does_not_depend_on_the_worker_threads(monkeypatch):
    """Blocks measured in several threads are applied in order: the same labels, centroids
    and inertia with one thread or four, and BLAS gets its thread count back."""
    monkeypatch.setattr(km, "BLOCK_BYTES", 64 * 1024)  # many blocks, so threads interleave
    rng = np.random.default_rng(14)
    x = rng.normal(size=(6000, 24)).astype(np.float32)
    control = km._openblas()
    before = control[0]() if control else None
    one = kmeans(x, 30, seed=2, workers=1)
    four = kmeans(x, 30, seed=2, workers=4)
    np.testing.assert_array_equal(one.labels, four.labels)
    np.testing.assert_array_equal(one.centroids, four.centroids)
    assert one.inertia == four.inertia and one.n_iter == four.n_iter
    if control:
        assert control[0]() == before
