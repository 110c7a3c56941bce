"""Time `harness clusters`' k-means (harness/kmeans.py) on the real offline models' input
embedding matrices, against a naive baseline run side by side.

For each model: the whole token embedding matrix (SmolLM2: 49,152 × 576, Gemma 3 270M:
262,144 × 640), k-means with k = 100 under each seed, wall and CPU seconds per seed, the
iterations, whether it converged, and the seeds' agreement (mean pairwise adjusted Rand
index).

The naive baseline is textbook Lloyd written one target at a time in a plain Python loop:
each row's distances to the centroids (numpy over the centroids), its argmin, then each
centroid's sum accumulated row by row; k-means++ likewise, row by row. A full run of it would
take hours on these matrices, so it runs on a random sample of rows for a few iterations
from the same initial centroids as the vectorised code on that sample (whose labels it must
reproduce), and its time per row and iteration is extrapolated to the whole matrix: one
iteration, and the whole run (its k-means++ start plus as many iterations as the vectorised
run took). The extrapolation is printed as such.

    .venv/bin/python benchmarks/kmeans_speed.py [smollm2 gemma3-270m] [--seeds 3] [-k 100]
        [--to-the-end smollm2]

``--to-the-end`` models are also clustered with ``tol=0`` (until no row changes cluster):
iterations, seconds, the seeds' agreement then, and how far each seed's partition and inertia
are from those at the default tolerance.

Writes benchmarks/results/kmeans_speed.json and prints a table. The machine's load average
before and after each model is recorded: other processes on a 2-core machine slow it down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from harness.kmeans import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    adjusted_rand_index,
    kmeans,
    kmeans_plusplus,
    pairwise_agreement,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "kmeans_speed.json"


def token_rows(model: str, backend: str | None) -> np.ndarray:
    """The model's input embedding rows of its tokens (padding rows left out), float32, as
    `harness clusters` reads them."""
    from harness.plugins import registry
    from harness.refs import resolve
    from harness.runner import load_backend

    reg = registry()
    be = load_backend(resolve(model, reg, backend), reg)
    try:
        keep = ~np.asarray(be.vocab().padding, dtype=bool)
        return np.ascontiguousarray(be.input_embeddings()[: keep.size][keep], dtype=np.float32)
    finally:
        be.close()


# --- the naive baseline: one row at a time ---------------------------------------------------


def naive_plusplus_step(x: np.ndarray, closest: list[float], centre: np.ndarray) -> None:
    """One k-means++ draw's update, row by row: each row's distance to the new centre."""
    for i in range(len(x)):
        d = float(((x[i] - centre) ** 2).sum())
        if d < closest[i]:
            closest[i] = d


def naive_lloyd(x: np.ndarray, centroids: np.ndarray, iterations: int
                ) -> tuple[np.ndarray, float]:
    """Textbook Lloyd, one row at a time; the labels after ``iterations`` assignments (the
    last one after the last update) and the seconds per iteration."""
    k, d = centroids.shape
    c = centroids.astype(np.float64).copy()
    labels = np.zeros(len(x), dtype=np.int64)
    t0 = time.perf_counter()
    for it in range(iterations):
        for i in range(len(x)):  # assignment: one target at a time
            labels[i] = int(((c - x[i]) ** 2).sum(axis=1).argmin())
        if it == iterations - 1:
            break
        sums = np.zeros((k, d))
        counts = [0] * k
        for i in range(len(x)):  # update: each row added to its centroid's sum
            sums[labels[i]] += x[i]
            counts[labels[i]] += 1
        for j in range(k):
            if counts[j]:
                c[j] = sums[j] / counts[j]
    return labels, (time.perf_counter() - t0) / iterations


def naive_baseline(x: np.ndarray, k: int, sample: int, iterations: int, n_iter_full: float,
                   seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = x[np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))]
    init = kmeans_plusplus(rows, k, np.random.default_rng(seed))
    labels, per_iter = naive_lloyd(rows, init, iterations)
    # the vectorised code from the same start, for as many iterations: the same labels
    fast = kmeans(rows, k, init=init, max_iter=iterations - 1, tol=0.0)
    same = float((fast.labels == labels).mean())
    closest = [float("inf")] * len(rows)
    t0 = time.perf_counter()
    naive_plusplus_step(rows, closest, rows[0])
    per_draw = time.perf_counter() - t0
    scale = len(x) / len(rows)
    est_iter = per_iter * scale
    est_init = per_draw * scale * (k - 1)
    return {"sample_rows": len(rows), "iterations_timed": iterations,
            "per_row_iteration_us": round(per_iter / len(rows) * 1e6, 2),
            "estimated_iteration_s": round(est_iter, 1),
            "estimated_kmeanspp_s": round(est_init, 1),
            "estimated_run_s": round(est_init + est_iter * (n_iter_full + 1), 1),
            "labels_equal_to_vectorised_on_sample": same,
            "ari_with_vectorised_on_sample": adjusted_rand_index(fast.labels, labels),
            "extrapolated": True}


def to_the_end(x: np.ndarray, k: int, seeds: list[int], default: list) -> dict:
    """The same seeds with ``tol=0`` (until no row changes cluster): how many iterations,
    how long, and whether the seeds agree more than at the default tolerance."""
    runs = [kmeans(x, k, seed, tol=0.0, max_iter=2000) for seed in seeds]
    agreement, pairs = pairwise_agreement(runs)
    return {"seeds": [{"seed": r.seed, "wall_s": round(r.wall_s, 2), "n_iter": r.n_iter,
                       "converged": r.converged, "inertia": round(r.inertia, 3),
                       "ari_with_default_tol": adjusted_rand_index(r.labels, d.labels),
                       "inertia_gain_over_default_tol": round(1 - r.inertia / d.inertia, 6)}
                      for r, d in zip(runs, default, strict=True)],
            "agreement_mean_ari": agreement, "pairs": [[a, b, ari] for a, b, ari in pairs]}


def bench(model: str, k: int, seeds: list[int], backend: str | None, sample: int,
          iterations: int, converge: bool) -> dict:
    t0 = time.perf_counter()
    x = token_rows(model, backend)
    load_s = time.perf_counter() - t0
    print(f"{model}: {x.shape[0]:,} × {x.shape[1]} rows loaded in {load_s:.1f} s", flush=True)
    runs, results = [], []
    load_before = os.getloadavg()
    for seed in seeds:
        c0 = time.process_time()
        r = kmeans(x, k, seed)
        cpu = time.process_time() - c0
        results.append(r)
        runs.append({"seed": seed, "wall_s": round(r.wall_s, 2), "cpu_s": round(cpu, 2),
                     "n_iter": r.n_iter, "converged": r.converged,
                     "inertia": round(r.inertia, 3),
                     "rows_measured_per_row": round(r.measured / x.shape[0], 1),
                     "load_avg_1min_after": round(os.getloadavg()[0], 2)})
        print(f"  seed {seed}: {r.wall_s:.1f} s wall, {cpu:.1f} s CPU, {r.n_iter} iterations, "
              f"converged {r.converged}, load {os.getloadavg()[0]:.1f}", flush=True)
    agreement, pairs = pairwise_agreement(results)
    n_iter = float(np.mean([r.n_iter for r in results]))
    wall = [r["wall_s"] for r in runs]
    naive = naive_baseline(x, k, sample, iterations, n_iter)
    per_iter_fast = sum(wall) / sum(r.n_iter + 1 for r in results)
    out = {"rows": int(x.shape[0]), "dim": int(x.shape[1]), "k": k,
           "max_iter": DEFAULT_MAX_ITER, "tol": DEFAULT_TOL, "seeds": runs,
           "per_seed_wall_s_mean": round(float(np.mean(wall)), 2),
           "per_seed_wall_s_max": round(float(np.max(wall)), 2),
           "agreement_mean_ari": agreement,
           "pairs": [[a, b, ari] for a, b, ari in pairs],
           "load_avg_before": [round(v, 2) for v in load_before],
           "load_avg_after": [round(v, 2) for v in os.getloadavg()],
           "naive": naive,
           "speedup_per_iteration": round(naive["estimated_iteration_s"] / per_iter_fast, 1),
           "speedup_per_run": round(naive["estimated_run_s"] / float(np.mean(wall)), 1)}
    if converge:
        out["to_the_end"] = end = to_the_end(x, k, seeds, results)
        print(f"  to the end (tol 0): iterations "
              f"{[r['n_iter'] for r in end['seeds']]}, seconds "
              f"{[r['wall_s'] for r in end['seeds']]}, agreement "
              f"{end['agreement_mean_ari']:.3f}", flush=True)
    print(f"  agreement (mean ARI) {agreement:.3f}; naive: {naive['per_row_iteration_us']} µs "
          f"per row and iteration on {naive['sample_rows']:,} rows (labels equal: "
          f"{naive['labels_equal_to_vectorised_on_sample']:.3f}), extrapolated "
          f"{naive['estimated_run_s']:,.0f} s per run: {out['speedup_per_run']}× slower",
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3-270m"])
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--sample", type=int, default=2000, help="rows of the naive baseline")
    ap.add_argument("--iterations", type=int, default=3, help="naive iterations timed")
    ap.add_argument("--to-the-end", nargs="*", default=["smollm2"], metavar="MODEL",
                    help="models also run with tol=0, until no row changes cluster")
    args = ap.parse_args()
    results = {}
    if OUT.exists():
        results = json.loads(OUT.read_text()).get("models", {})
    for model in args.models:
        results[model] = bench(model, args.k, list(range(args.seeds)), args.backend,
                               args.sample, args.iterations, model in args.to_the_end)
    env = {"cpus": os.cpu_count(), "machine": platform.machine(),
           "python": platform.python_version(), "numpy": np.__version__,
           "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
           "note": "2-core machine shared with other processes: see each model's load "
                   "averages; the naive baseline is extrapolated from a sample of rows"}
    OUT.write_text(json.dumps({"environment": env, "models": results}, indent=2) + "\n")
    print(f"\n{'model':<14}{'rows':>9}{'s/seed':>9}{'max':>8}{'iters':>7}{'ARI':>7}"
          f"{'naive s/run (est.)':>20}{'×':>7}")
    for name, r in results.items():
        iters = "/".join(str(s["n_iter"]) for s in r["seeds"])
        print(f"{name:<14}{r['rows']:>9,}{r['per_seed_wall_s_mean']:>9.1f}"
              f"{r['per_seed_wall_s_max']:>8.1f}{iters:>7}{r['agreement_mean_ari'] or 0:>7.3f}"
              f"{r['naive']['estimated_run_s']:>20,.0f}{r['speedup_per_run']:>7}")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
