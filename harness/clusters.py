"""``harness clusters``: k-means of a model's embedding matrices over several seeds, stored,
and the summary that the command and the report show (Rumbelow & Watkins' other half).

Rumbelow & Watkins found GPT's glitch tokens while clustering the token embeddings with k-means: one
strange cluster held the weird tokens, the clusters were robust to the random initialisation
of the centroids, and the tokens nearest the centroid of the whole embedding cloud were the
weird ones. ``cluster_model`` repeats that on any model a backend gives embeddings for: the
input matrix (and the output matrix where it is not tied to the input), ``k`` clusters, one
k-means per seed (``harness.kmeans``), the seeds' agreement as the mean pairwise adjusted
Rand index, each token's cluster stored, each cluster's size, distance to the global
centroid and stability across seeds stored, each token's distance to the global centroid
stored. ``load_summary`` reads one clustering back for display, joined with the model's
final verdicts (the ``verdict`` pseudo-detector's latest run) where a scan stored them.

Rows past the tokenizer's size (padding rows, ``Vocab.padding``) are not tokens and are left
out, as Rumbelow & Watkins left out GPT-J's 143 ``<|extratoken_xx|>`` rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from harness import store
from harness.backend import Backend, Capability
from harness.errors import HarnessError
from harness.kmeans import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    KMeansResult,
    centroid_distances,
    check_k,
    kmeans,
    pairwise_agreement,
)
from harness.refs import ResolvedRef
from harness.runner import Reporter, open_model, store_model
from harness.verdicts import GLITCH, SUSPECT
from harness.vocab import token_repr

DEFAULT_K = 100  # Rumbelow & Watkins do not say which k; 100 clusters of ~500-2,600 tokens
DEFAULT_SEEDS = 3
DEFAULT_TOP = 20  # rows of the closest-to-centroid table
MEMBERS = 5  # member tokens shown per cluster (the nearest its centroid)
MATRICES = ("auto", "input", "output", "both")


@dataclass
class SeedRun:
    """How one seed's k-means went."""

    seed: int
    n_iter: int
    converged: bool
    inertia: float
    wall_s: float
    empty: int  # clusters left empty (fewer distinct rows than k)


@dataclass
class MatrixClustering:
    """One matrix clustered under every seed, as stored."""

    clustering_id: int
    matrix: str
    rows: int
    dim: int
    k: int
    seeds: list[SeedRun]
    agreement: float | None
    pairs: list[tuple[int, int, float]]  # (seed, seed, adjusted Rand index)
    wall_s: float


@dataclass
class ClustersRun:
    """What ``cluster_model`` did: the model, the matrices clustered, notes for the user."""

    model_id: int
    label: str
    ref: ResolvedRef
    n_tokens: int
    load_s: float
    tied: bool
    matrices: list[MatrixClustering] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_matrices(choice: str, tied: bool) -> tuple[list[str], list[str]]:
    """The matrices to cluster for ``--matrix choice`` (``auto``: the input matrix, and the
    output matrix where it is not tied), and notes for the user."""
    if choice not in MATRICES:
        raise HarnessError(f"--matrix must be one of {', '.join(MATRICES)}, not {choice!r}")
    if choice == "input":
        return ["input"], []
    if choice == "output":
        return ["output"], (["the embeddings are tied: the output matrix is the input "
                             "matrix"] if tied else [])
    if tied:
        return ["input"], ["the embeddings are tied: the output matrix is the input matrix, "
                           "clustered once as 'input'"]
    return ["input", "output"], []


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as a list, refused (one clear line) when empty, negative or repeated."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise HarnessError("give at least one seed")
    if any(s < 0 for s in seeds):
        raise HarnessError(f"seeds must be non-negative (got {min(seeds)})")
    if len(set(seeds)) != len(seeds):
        raise HarnessError(f"seeds repeat: {', '.join(map(str, seeds))}")
    return seeds


def stability(results: Sequence[KMeansResult]) -> list[np.ndarray | None]:
    """Per run, per cluster: the mean over the other runs of the cluster's best Jaccard index
    with one of that run's clusters (1: the same tokens found again under every other seed);
    None for a single run. Empty clusters get NaN."""
    if len(results) < 2:
        return [None] * len(results)
    out = []
    for r in results:
        k = r.k
        best = np.zeros(k)
        for q in results:
            if q is r:
                continue
            table = np.bincount(r.labels.astype(np.int64) * q.k + q.labels,
                                minlength=k * q.k).reshape(k, q.k)
            union = r.sizes[:, None] + q.sizes[None, :] - table
            with np.errstate(invalid="ignore", divide="ignore"):
                best += np.where(union > 0, table / np.maximum(union, 1), 0.0).max(axis=1)
        score = best / (len(results) - 1)
        score[r.sizes == 0] = np.nan
        out.append(score)
    return out


def _matrix(backend: Backend, which: str) -> np.ndarray:
    try:
        return backend.input_embeddings() if which == "input" else backend.output_embeddings()
    except NotImplementedError as exc:
        raise HarnessError(f"backend {backend.name!r} gives no {which} embedding matrix "
                           f"({exc})") from None


def cluster_matrix(x: np.ndarray, k: int, seeds: Sequence[int], *,
                   max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
                   reporter: Reporter | None = None, label: str = "k-means"
                   ) -> tuple[list[KMeansResult], np.ndarray, np.ndarray]:
    """k-means of ``x`` under each seed; also the centroid of ``x`` and each row's distance
    to it."""
    reporter = reporter or Reporter()
    check_k(k, x.shape[0])
    results = []
    for seed in seeds:
        advance = reporter.start(f"{label}, seed {seed}", max_iter)
        done = [0]

        def step(it: int, changed: int, inertia: float, advance=advance, done=done) -> None:
            advance(it - done[0])
            done[0] = it

        results.append(kmeans(x, k, seed, max_iter=max_iter, tol=tol, progress=step))
        advance(max_iter - done[0])
    centroid, dist = centroid_distances(x)
    return results, centroid, dist


def store_clustering(engine: Engine, model_id: int, matrix: str, token_ids: np.ndarray,
                     results: Sequence[KMeansResult], centroid: np.ndarray,
                     dist: np.ndarray, options: dict[str, Any],
                     wall_s: float) -> MatrixClustering:
    """Store one matrix's clustering (every seed's labels, the clusters, the distances to
    the global centroid) in one transaction."""
    agreement, pairs = pairwise_agreement(results)
    stable = stability(results)
    seeds = [SeedRun(r.seed, r.n_iter, r.converged, r.inertia, r.wall_s,
                     int((r.sizes == 0).sum())) for r in results]
    opts = {**options, "runs": {str(s.seed): {k: v for k, v in asdict(s).items() if k != "seed"}
                                for s in seeds},
            "pairs": [[a, b, ari] for a, b, ari in pairs]}
    k = results[0].k
    with engine.begin() as conn:
        cid = store.insert_clustering(conn, model_id=model_id, matrix=matrix, k=k,
                                      seeds=[r.seed for r in results], agreement=agreement,
                                      options=opts, wall_s=wall_s)
        for r, st in zip(results, stable, strict=True):
            store.insert_token_clusters(conn, cid, r.seed, token_ids, r.labels, r.distances)
            to_global = np.sqrt(((r.centroids.astype(np.float64) - centroid) ** 2).sum(axis=1))
            store.insert_cluster_centroids(conn, cid, r.seed, r.sizes, to_global, st)
        store.insert_centroid_distances(conn, cid, token_ids, dist)
    return MatrixClustering(cid, matrix, int(len(token_ids)), int(centroid.shape[0]), k, seeds,
                            agreement, pairs, wall_s)


def cluster_model(model: str, engine: Engine, *, k: int = DEFAULT_K,
                  seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)), matrix: str = "auto",
                  backend: str | None = None, backend_options: dict[str, Any] | None = None,
                  max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
                  reporter: Reporter | None = None) -> ClustersRun:
    """Load ``model``, store it (and its vocabulary) as ``harness scan`` does when it is not
    stored yet, and store a k-means clustering of its embedding matrices (see the module's
    docstring). Bad input (``k`` < 2 or larger than the vocabulary, a backend without
    embeddings, bad seeds) raises ``HarnessError`` before anything is computed."""
    from harness.plugins import registry

    reporter = reporter or Reporter()
    if k < 2:
        check_k(k, k)
    seeds = check_seeds(seeds)
    if max_iter < 1:
        raise HarnessError(f"--max-iter must be at least 1 (got {max_iter})")
    if not tol >= 0:
        raise HarnessError(f"--tol must be zero or positive (got {tol})")
    if matrix not in MATRICES:
        plan_matrices(matrix, False)
    reg = registry()
    ref, be, load_s = open_model(model, reg, backend, backend_options, reporter)
    try:
        if Capability.EMBEDDINGS not in be.capabilities:
            raise HarnessError(f"backend {be.name!r} gives no embedding matrices: load the "
                               "model with a backend that does (`harness plugins` lists them)")
        vocab = be.vocab()
        token_ids = np.flatnonzero(~np.asarray(vocab.padding, dtype=bool))
        check_k(k, len(token_ids))
        tied = bool(be.embeddings_tied())
        names, notes = plan_matrices(matrix, tied)
        model_id, _, _ = store_model(engine, ref, be, vocab, reporter)
        run = ClustersRun(model_id, ref.alias or ref.ref, ref, len(token_ids), load_s, tied,
                          notes=notes)
        if len(token_ids) < len(vocab):
            run.notes.append(f"{len(vocab) - len(token_ids):,} padding rows past the tokenizer "
                             "are left out")
        for name in names:
            t1 = time.perf_counter()
            with reporter.status(f"reading the {name} embedding matrix"):
                emb = _matrix(be, name)
            if emb.ndim != 2 or emb.shape[0] < len(vocab):
                raise HarnessError(f"the {name} embedding matrix has shape {emb.shape}, fewer "
                                   f"rows than the {len(vocab):,} tokens")
            x = np.ascontiguousarray(emb[token_ids], dtype=np.float32)
            if not np.isfinite(x).all():
                raise HarnessError(f"the {name} embedding matrix holds NaN or infinite values")
            results, centroid, dist = cluster_matrix(
                x, k, seeds, max_iter=max_iter, tol=tol, reporter=reporter,
                label=f"k-means of the {name} matrix")
            options = {"max_iter": max_iter, "tol": tol, "init": "k-means++",
                       "backend": be.name, "padding_rows_left_out": len(vocab) - len(token_ids)}
            with reporter.status("storing the clusters"):
                run.matrices.append(store_clustering(
                    engine, model_id, name, token_ids, results, centroid, dist, options,
                    time.perf_counter() - t1))
        return run
    finally:
        be.close()


# --- reading a clustering back: what the command and the report show -------------------------


@dataclass
class ClusterView:
    """One cluster of the reference seed, as shown."""

    cluster: int
    size: int
    centroid_distance: float  # of its centroid to the centroid of the whole matrix
    stability: float | None
    glitch: int
    suspect: int
    members: list[tuple[int, str]] = field(default_factory=list)  # (id, token_repr)

    @property
    def flagged_share(self) -> float:
        """The share of its tokens whose final verdict is glitch or suspect."""
        return (self.glitch + self.suspect) / self.size if self.size else 0.0


@dataclass
class ClusteringSummary:
    """One stored clustering, read back and joined with the model's final verdicts."""

    clustering: store.StoredClustering
    seed: int  # the reference seed (the first)
    verdict_run: int | None  # the final-verdict run the counts come from (None: unscanned)
    clusters: list[ClusterView]  # every cluster, most notable first (see ``notable``)
    glitch_cluster: int | None  # the cluster holding the most glitch (else suspect) tokens
    glitch_kind: str | None  # glitch | suspect | None
    glitch_members: list[tuple[int, str, str]]  # (id, token_repr, verdict) of that cluster
    closest: list[store.CentroidNeighbour]
    glitch_total: int = 0  # glitch tokens of the model (final verdicts)

    def as_dict(self) -> dict[str, Any]:
        """Everything, as JSON-ready values."""
        c = self.clustering
        return {
            "clustering_id": c.id, "matrix": c.matrix, "k": c.k, "seeds": c.seeds,
            "agreement": c.agreement, "pairs": c.options.get("pairs", []),
            "runs": c.options.get("runs", {}), "wall_s": c.wall_s,
            "reference_seed": self.seed, "verdict_run": self.verdict_run,
            "glitch_cluster": self.glitch_cluster, "glitch_kind": self.glitch_kind,
            "glitch_members": [{"token_id": t, "token": s, "verdict": v}
                               for t, s, v in self.glitch_members],
            "clusters": [{"cluster": v.cluster, "size": v.size,
                          "centroid_distance": v.centroid_distance,
                          "stability": v.stability, "glitch": v.glitch, "suspect": v.suspect,
                          "members": [{"token_id": t, "token": s} for t, s in v.members]}
                         for v in self.clusters],
            "closest_to_centroid": [{"token_id": n.token_id, "token": token_repr(n.text, n.raw),
                                     "distance": n.distance, "cluster": n.cluster,
                                     "verdict": n.verdict} for n in self.closest],
        }


def notable(views: list[ClusterView]) -> list[ClusterView]:
    """Clusters ordered so the strange ones come first: most glitch tokens, then most suspect
    tokens, then the centroid nearest the centroid of the whole matrix."""
    return sorted(views, key=lambda v: (-v.glitch, -v.suspect, v.centroid_distance, v.cluster))


def load_summary(engine: Engine, model_id: int, clustering_id: int, top: int = DEFAULT_TOP,
                 members: int = MEMBERS, shown: int | None = None) -> ClusteringSummary:
    """Read clustering ``clustering_id`` of model ``model_id`` back: its clusters under the
    first seed with their final-verdict counts, the members nearest each centroid (of the
    first ``shown`` notable clusters; all when None), the cluster holding the glitch tokens
    and the ``top`` tokens nearest the centroid of the whole matrix."""
    with engine.connect() as conn:
        c = store.clustering_by_id(conn, clustering_id)
        seed = c.seeds[0]
        verdict_run = store.latest_verdict_run(conn, model_id)
        rows = store.cluster_rows(conn, c.id, seed, verdict_run)
        views = notable([ClusterView(r.cluster, r.size, r.centroid_distance, r.stability,
                                     r.verdicts.get(GLITCH, 0), r.verdicts.get(SUSPECT, 0))
                         for r in rows])
        picked = views if shown is None else views[:shown]
        near = store.cluster_members(conn, model_id, c.id, seed, [v.cluster for v in picked],
                                     members)
        for v in picked:
            v.members = [(t, token_repr(x, raw)) for t, x, raw in near.get(v.cluster, [])]
        kind, where = None, None
        glitch_total = sum(v.glitch for v in views)
        for verdict, count in ((GLITCH, lambda v: v.glitch), (SUSPECT, lambda v: v.suspect)):
            if any(count(v) for v in views):
                kind = verdict
                where = max(views, key=lambda v: (count(v), count(v) / max(v.size, 1),
                                                  -v.cluster)).cluster
                break
        glitch_members = []
        if where is not None and verdict_run is not None:
            glitch_members = [(t, token_repr(x, raw), v) for t, x, raw, v in
                              store.cluster_tokens_with_verdict(
                                  conn, model_id, c.id, seed, where, verdict_run,
                                  (GLITCH, SUSPECT))]
        closest = store.closest_to_centroid(conn, model_id, c.id, seed, top, verdict_run)
    return ClusteringSummary(c, seed, verdict_run, views, where, kind, glitch_members,
                             closest, glitch_total)


def latest_summaries(engine: Engine, model_id: int, top: int = DEFAULT_TOP,
                     shown: int | None = None) -> list[ClusteringSummary]:
    """``load_summary`` of the model's latest clustering of each matrix (none stored: [])."""
    with engine.connect() as conn:
        latest = store.latest_clusterings(conn, model_id)
    return [load_summary(engine, model_id, c.id, top, shown=shown) for c in latest]
