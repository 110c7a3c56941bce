"""k-means of an embedding matrix in numpy, the adjusted Rand index, and the distances to
the centroid of the whole matrix: the arithmetic of ``harness clusters`` (after Rumbelow &
Watkins, 2023).

``kmeans`` is Lloyd's algorithm (assign every row to its nearest centroid, move every
centroid to the mean of its rows) started from k-means++, made fast the ways that do not
change its result:

* the assignment is one float32 matrix product per block of rows,
  ``|x|² − 2·x·cᵀ + |c|²``; the blocks are shared out to one thread per CPU, each with
  single-threaded BLAS, and applied in order (the result does not depend on the threads;
  on a machine other processes keep busy, a slow core delays one block, not every product
  as multi-threaded BLAS would);
* Elkan's bounds: each row keeps an upper bound on the distance to its own centroid and a
  lower bound on the distance to every other one; when the centroids move, the bounds move by
  as much (triangle inequality), and only the rows whose bounds no longer prove that their
  cluster is unchanged are measured again (after a check of the exact distance to their own
  centroid, once few rows fail: in 600 dimensions the bounds are loose, so that check pays
  off late, not early; when nearly every row fails, every row is measured, in stretches that
  need no gathering);
* the centroid sums follow the rows that changed cluster only (a ±1 one-hot matrix product),
  and the inertia (sum of squared distances) follows from those moves and the centroid shifts
  exactly, without a pass over the matrix.

The iterations stop when no row changes cluster, or when an iteration lowers the inertia by
no more than ``tol`` of it (default 1e-5), or after ``max_iter``. On the token embeddings of
real models k-means takes hundreds of iterations to reach a partition that no longer
changes (Gemma 3 270M: about 390) while the inertia improves by well under 0.1% after the
first few dozen: the rows near the boundaries keep trading places. The tolerance stops
there (the benchmark and the README give the numbers); ``tol=0`` runs to the end.

k-means++ draws its seeds from a random sample of the rows (``init_sample`` rows, by default
10,000 or 50 per cluster, whichever is more): each of the ``k`` draws is a pass over the
sample rather than over the whole matrix, and Lloyd's iterations move the centroids to the
whole matrix anyway.

Distances are computed in float32 (sums in float64), so two runs of the same seed give the
same labels on the same machine and BLAS, whatever the number of threads; a row at an exact
tie between two centroids may be placed differently than a float64 computation would place
it.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from harness.errors import HarnessError

DEFAULT_MAX_ITER = 300
DEFAULT_TOL = 1e-5  # stop when an iteration lowers the inertia by no more than this fraction
CHUNK_BYTES = 4 << 20  # elementwise work in chunks of about this many bytes (cache-sized)
BLOCK_BYTES = 64 << 20  # rows gathered for one matrix product: large, so that BLAS runs fast
BOUNDS_BYTES = 1 << 30  # the most memory Elkan's lower bounds (rows × k float32) may take
ONE_HOT_MAX_K = 256  # centroid sums by a one-hot matrix product up to this k, else sorted
TIGHTEN_BELOW = 0.6  # own-centroid check first only when fewer rows than this share fail
MEASURE_ALL = 0.9  # when more rows than this share are to be measured, measure every row


@dataclass
class KMeansResult:
    """One k-means run: each row's cluster and distance to its centroid, the centroids."""

    seed: int
    labels: np.ndarray  # (n,) int32: each row's cluster
    distances: np.ndarray  # (n,) float32: each row's Euclidean distance to its centroid
    centroids: np.ndarray  # (k, d) float32
    sizes: np.ndarray  # (k,) int64: rows per cluster (0 where a cluster ended up empty)
    inertia: float  # sum of squared distances to the centroids
    n_iter: int  # Lloyd iterations run (centroid updates)
    converged: bool  # no row changed cluster, or the inertia fell by less than the tolerance
    wall_s: float
    measured: int = 0  # rows whose distances to every centroid were computed, all iterations

    @property
    def k(self) -> int:
        """The number of clusters asked for."""
        return int(self.centroids.shape[0])


Progress = Callable[[int, int, float], None]  # (iteration, rows that changed cluster, inertia)


def check_k(k: int, n_rows: int) -> None:
    """Refuse a ``k`` that k-means cannot use on ``n_rows`` rows, with one clear line."""
    if k < 2:
        raise HarnessError(f"-k must be at least 2 (got {k})")
    if k > n_rows:
        raise HarnessError(f"-k {k:,} is larger than the vocabulary ({n_rows:,} tokens)")


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@cache
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the number of threads of the OpenBLAS numpy loaded, or None (another
    BLAS, or not found): looked up the way threadpoolctl does, in the process's mappings."""
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh
                            if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", ""):
            for prefix in ("scipy_openblas", "openblas"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                    return get, put
    return None


@contextmanager
def _blas_threads(n: int | None) -> Iterator[bool]:
    """Run with BLAS limited to ``n`` threads (None: as it is); yields whether it is."""
    control = _openblas() if n is not None else None
    if control is None:
        yield False
        return
    get, put = control
    before = get()
    put(n)
    try:
        yield True
    finally:
        put(before)


def _in_order(fn: Callable[..., Any], blocks: list[np.ndarray], args: tuple,
              pool: ThreadPoolExecutor | None) -> Iterator[tuple[np.ndarray, Any]]:
    """``(block, fn(block, *args))`` for each block, in order; computed ahead in ``pool``'s
    threads (a few blocks at a time: memory stays bounded), or here without a pool."""
    if pool is None:
        for b in blocks:
            yield b, fn(b, *args)
        return
    ahead: deque[tuple[np.ndarray, Future]] = deque()
    todo = iter(blocks)
    for b in itertools.islice(todo, 2 * pool._max_workers):
        ahead.append((b, pool.submit(fn, b, *args)))
    while ahead:
        b, fut = ahead.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            ahead.append((nxt, pool.submit(fn, nxt, *args)))
        yield b, fut.result()


def _rows_per(budget: int, width: int) -> int:
    return max(64, budget // (4 * max(width, 1)))


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _blocks(ids: np.ndarray, size: int) -> list[np.ndarray]:
    return [ids[i:i + size] for i in range(0, ids.size, size)]


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator,
                    sample: int | None = None) -> np.ndarray:
    """``k`` initial centroids (float64) by k-means++ (D² sampling, one candidate per draw)
    among ``sample`` rows of ``x`` drawn at random (all rows when ``sample`` is None or not
    smaller than the matrix)."""
    n = x.shape[0]
    if sample is not None and sample < n:
        rows = x[np.sort(rng.choice(n, size=sample, replace=False))]
    else:
        rows = x
    m = rows.shape[0]
    sq = _sq_norms(rows).astype(np.float64)
    first = int(rng.integers(m))
    chosen = [first]
    closest = np.maximum(sq - 2.0 * (rows @ rows[first]) + sq[first], 0.0)
    for _ in range(1, k):
        cum = np.cumsum(closest)
        if cum[-1] <= 0.0:  # fewer distinct rows than k: any row (a duplicate centroid)
            pick = int(rng.integers(m))
        else:
            pick = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), m - 1)
        chosen.append(pick)
        closest = np.minimum(closest, np.maximum(sq - 2.0 * (rows @ rows[pick]) + sq[pick],
                                                 0.0))
    return rows[chosen].astype(np.float64)


def _add_grouped(sums: np.ndarray, sizes: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                 sign: int) -> None:
    """Add (``sign`` 1) or take away (-1) ``rows`` to or from the sums and sizes of their
    clusters ``labels``: sorted by cluster, summed per cluster with one ``reduceat``."""
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    clusters = ordered[starts]
    sums[clusters] += sign * np.add.reduceat(rows[order], starts, axis=0).astype(np.float64)
    sizes[clusters] += sign * np.diff(np.r_[starts, ordered.size])


def _move_rows(sums: np.ndarray, sizes: np.ndarray, rows: np.ndarray, new: np.ndarray,
               old: np.ndarray | None) -> None:
    """Rows ``rows`` join clusters ``new`` (and leave clusters ``old``): the sums and sizes
    follow. With few clusters, one matrix product with a ±1 one-hot matrix (BLAS: several
    times faster than sorting); with many, sorted sums (the one-hot matrix grows with k)."""
    k = sums.shape[0]
    if k > ONE_HOT_MAX_K:
        _add_grouped(sums, sizes, new, rows, 1)
        if old is not None:
            _add_grouped(sums, sizes, old, rows, -1)
        return
    ids = np.arange(k, dtype=np.int32)[:, None]
    delta = (ids == new).astype(np.float32)
    if old is not None:
        delta -= ids == old
    sums += delta @ rows
    sizes += np.rint(delta.sum(axis=1)).astype(np.int64)


def _round_up(values: np.ndarray) -> np.ndarray:
    """float64 bound increments as float32, rounded away from zero (bounds stay bounds)."""
    v = values.astype(np.float32)
    return np.nextafter(v, np.float32(np.inf)) if v.size else v


class _State:
    """Lloyd's state: labels, Elkan's bounds, the centroids' sums and sizes, and the rows'
    buffer of each thread that measures them (allocated once: a fresh large array costs page
    faults)."""

    def __init__(self, x: np.ndarray, k: int, workers: int) -> None:
        n, d = x.shape
        self.x, self.k = x, k
        self.x_sq = _sq_norms(x)
        self.chunk = _rows_per(CHUNK_BYTES, max(d, k))
        self.block = min(n, _rows_per(BLOCK_BYTES, d + k))
        if workers > 1:  # blocks small enough to share out, large enough for BLAS
            self.block = min(self.block, max(1024, -(-n // (8 * workers))))
        self.bounded = n * k * 4 <= BOUNDS_BYTES  # else every row is measured every time
        self.labels = np.zeros(n, dtype=np.int32)
        self.upper = np.zeros(n, dtype=np.float32)  # >= the distance to its own centroid
        # <= the distance to each other centroid (its own: +inf)
        self.lower = np.zeros((n if self.bounded else 0, k), dtype=np.float32)
        self.sums = np.zeros((k, d), dtype=np.float64)
        self.sizes = np.zeros(k, dtype=np.int64)
        self.local = threading.local()  # each worker thread's row buffer
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="kmeans") \
            if workers > 1 else None
        self.measured = 0
        self.failing = 1.0  # the share of rows whose bounds failed in the last iteration
        self.inertia = 0.0  # sum of squared distances to the centroids, kept up to date

    def row_distances(self, c32: np.ndarray) -> np.ndarray:
        """Each row's exact distance to its centroid (on the difference, chunk by chunk)."""
        x, labels = self.x, self.labels
        dist = np.empty(x.shape[0], dtype=np.float32)
        for s in range(0, x.shape[0], self.chunk):
            e = min(s + self.chunk, x.shape[0])
            diff = x[s:e] - c32[labels[s:e]]
            dist[s:e] = np.sqrt(_sq_norms(diff))
        return dist

    def exact_inertia(self, c32: np.ndarray) -> None:
        """Set ``inertia`` from the exact distances (after moves it cannot follow)."""
        self.inertia = float((self.row_distances(c32).astype(np.float64) ** 2).sum())

    def candidates(self, c32: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
        """The rows whose cluster may have changed since the centroids moved by ``shift``
        (None: the first assignment, every row). One pass in cache-sized chunks (stretches
        of them in the worker threads): the bounds move by the shifts, and a row they no
        longer settle gets its exact distance to its own centroid (one row, one centroid)
        before it is sent to be measured against every centroid; in the first iterations,
        where most rows fail and that check spares few, they are sent straight away."""
        n = self.x.shape[0]
        if shift is None or not self.bounded:
            return np.arange(n)
        tighten = self.failing < TIGHTEN_BELOW
        parts = 4 * (self.pool._max_workers if self.pool is not None else 1)
        step = -(-n // (parts * self.chunk)) * self.chunk
        stretches = [np.array([s, min(s + step, n)]) for s in range(0, n, step)]
        found, failing = [], 0
        for _, (cand, fails) in _in_order(self._stretch, stretches, (c32, shift, tighten),
                                          self.pool):
            found.append(cand)
            failing += fails
        self.failing = failing / n
        return np.concatenate(found)

    def _stretch(self, bounds: np.ndarray, c32: np.ndarray, shift: np.ndarray,
                 tighten: bool) -> tuple[np.ndarray, int]:
        """``candidates`` over rows ``bounds[0]:bounds[1]``: (the rows, how many failed the
        bounds)."""
        found = []
        failing = 0
        for s in range(int(bounds[0]), int(bounds[1]), self.chunk):
            e = min(s + self.chunk, int(bounds[1]))
            lc, uc, ac = self.lower[s:e], self.upper[s:e], self.labels[s:e]
            lc -= shift  # every other centroid may have come this much closer
            lmin = lc.min(axis=1)
            uc += shift[ac]  # and its own moved away this much
            cand = np.flatnonzero(uc > lmin)
            failing += cand.size
            if cand.size and tighten:
                diff = self.x[s:e][cand]
                diff -= c32[ac[cand]]
                uc[cand] = np.sqrt(_sq_norms(diff))
                cand = cand[uc[cand] > lmin[cand]]
            if cand.size:
                found.append(cand + s)
        return (np.concatenate(found) if found else np.zeros(0, dtype=np.int64)), failing

    def measure(self, ids: np.ndarray, c_t: np.ndarray, c_sq: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Distances (m, k) of rows ``ids`` to every centroid (``c_t``: -2 × the centroids,
        transposed) and the nearest one. Safe to run in several threads at once."""
        m = ids.size
        if int(ids[-1]) - int(ids[0]) + 1 == m:  # a stretch of rows: no copy
            rows, rows_sq = self.x[ids[0]:ids[-1] + 1], self.x_sq[ids[0]:ids[-1] + 1]
        else:
            buf = getattr(self.local, "rows", None)
            if buf is None or buf.shape[0] < m:
                buf = self.local.rows = np.empty((max(m, self.block), self.x.shape[1]),
                                                 dtype=np.float32)
            rows = np.take(self.x, ids, axis=0, out=buf[:m], mode="clip")
            rows_sq = self.x_sq[ids]
        dist = rows @ c_t  # -2 x·c
        dist += c_sq
        dist += rows_sq[:, None]
        np.maximum(dist, 0.0, out=dist)
        np.sqrt(dist, out=dist)
        return dist, dist.argmin(axis=1).astype(np.int32)

    def assign(self, c32: np.ndarray, cand: np.ndarray, first: bool,
               update_sums: bool = True) -> int:
        """Measure rows ``cand`` against every centroid, move them to the nearest, keep the
        sums in step; how many changed cluster. The blocks are measured in worker threads
        (each block in one thread, BLAS single-threaded: a busy core slows one block, not
        every product) and applied here in order, so the result does not depend on the
        number of threads."""
        c_t = np.ascontiguousarray(-2.0 * c32.T)
        c_sq = _sq_norms(c32)
        if cand.size > MEASURE_ALL * self.x.shape[0]:  # stretches of rows need no gathering
            cand = np.arange(self.x.shape[0])
        changed = 0
        for ids, (dist, new) in _in_order(self.measure, _blocks(cand, self.block),
                                          (c_t, c_sq), self.pool):
            m = ids.size
            self.measured += m
            at = np.arange(m)
            nearest = dist[at, new]
            old = self.labels[ids]
            moved = np.ones(m, dtype=bool) if first else new != old
            if first:
                self.inertia += float((nearest.astype(np.float64) ** 2).sum())
            elif moved.any():  # what the moves took off the sum of squared distances
                before = dist[at[moved], old[moved]].astype(np.float64)
                self.inertia -= float((before ** 2 - nearest[moved].astype(np.float64) ** 2)
                                      .sum())
            if self.bounded:
                self.upper[ids] = nearest
                dist[at, new] = np.inf
                self.lower[ids] = dist
            if not moved.any():
                continue
            changed += int(moved.sum())
            if update_sums:  # the moved rows leave their old clusters' sums, join the new ones'
                _move_rows(self.sums, self.sizes, self.x[ids[moved]], new[moved],
                           None if first else old[moved])
            self.labels[ids] = new
        return changed

    def relocate_empty(self, centroids: np.ndarray, c32: np.ndarray) -> bool:
        """Give each empty cluster the row farthest from its centroid (among clusters of
        more than one row), as scikit-learn does; rows all alike leave a cluster empty.
        Whether any row moved."""
        x, labels, sizes, sums = self.x, self.labels, self.sizes, self.sums
        dist = self.row_distances(c32)  # one pass: empty clusters are rare
        order = np.argsort(-dist, kind="stable")
        taken, relocated = 0, False
        for j in np.flatnonzero(sizes == 0):
            while taken < order.size and (dist[order[taken]] <= 0.0
                                          or sizes[labels[order[taken]]] <= 1):
                taken += 1
            if taken >= order.size:
                break  # no row apart from its centroid is left: fewer distinct rows than k
            relocated = True
            row = int(order[taken])
            taken += 1
            old = int(labels[row])
            sums[old] -= x[row]
            sizes[old] -= 1
            centroids[old] = sums[old] / sizes[old]
            sums[j] = x[row]
            sizes[j] = 1
            centroids[j] = x[row]
            labels[row] = j
            self.upper[row] = 0.0  # it sits on its new centroid
            if self.bounded:
                self.lower[row] = 0.0  # nothing known of the others: measured next time
                self.lower[row, j] = np.inf
        return relocated


def kmeans(x: np.ndarray, k: int, seed: int = 0, *, max_iter: int = DEFAULT_MAX_ITER,
           tol: float = DEFAULT_TOL, init_sample: int | None = None,
           init: np.ndarray | None = None, progress: Progress | None = None,
           workers: int | None = None) -> KMeansResult:
    """k-means of the rows of ``x`` into ``k`` clusters (Lloyd's algorithm from k-means++,
    with Elkan's bounds; see the module's docstring).

    ``seed`` seeds k-means++ (the only random step). The iterations stop when no row changes
    cluster, when an iteration lowered the inertia (the sum of squared distances to the
    centroids, kept exact from the moves and the centroid shifts) by no more than ``tol``
    times the inertia, or after ``max_iter`` iterations; the labels returned are each row's
    nearest centroid among the centroids returned. ``init`` gives the initial centroids
    instead of k-means++. ``progress`` is called after each iteration with its number, how
    many rows changed cluster and the inertia. ``workers`` threads measure the rows (default:
    one per CPU this process may use), each with single-threaded BLAS.
    """
    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"k-means needs a 2-D matrix, got shape {x.shape}")
    n, d = x.shape
    check_k(k, n)
    if init is None:
        rng = np.random.default_rng(seed)
        sample = init_sample if init_sample is not None else max(10_000, 50 * k)
        centroids = kmeans_plusplus(x, k, rng, sample)
    else:
        centroids = np.array(init, dtype=np.float64)
        if centroids.shape != (k, d):
            raise ValueError(f"init has shape {centroids.shape}, expected {(k, d)}")
    workers = default_workers() if workers is None else max(1, int(workers))
    with _blas_threads(1 if workers > 1 else None) as limited:
        return _lloyd(x, k, seed, centroids, max_iter, tol, progress,
                      workers if limited else 1, t0)


def _lloyd(x: np.ndarray, k: int, seed: int, centroids: np.ndarray, max_iter: int, tol: float,
           progress: Progress | None, workers: int, t0: float) -> KMeansResult:
    state = _State(x, k, workers)
    try:
        return _iterate(state, seed, centroids, max_iter, tol, progress, t0)
    finally:
        if state.pool is not None:
            state.pool.shutdown()


def _iterate(state: _State, seed: int, centroids: np.ndarray, max_iter: int, tol: float,
             progress: Progress | None, t0: float) -> KMeansResult:
    shift: np.ndarray | None = None  # how far each centroid moved in the last update
    n_iter, converged = 0, False
    before = np.inf  # the inertia after the previous iteration
    while True:
        c32 = centroids.astype(np.float32)
        changed = state.assign(c32, state.candidates(c32, shift), first=shift is None)
        if shift is not None:
            if progress is not None:
                progress(n_iter, changed, state.inertia)
            if changed == 0 or before - state.inertia <= tol * state.inertia:
                converged = True
                break
        if n_iter >= max_iter:
            break
        before = state.inertia
        new_centroids = centroids.copy()
        full = state.sizes > 0
        new_centroids[full] = state.sums[full] / state.sizes[full, None]
        relocated = not full.all() and state.relocate_empty(new_centroids, c32)
        moved_by = np.sqrt(((new_centroids - centroids) ** 2).sum(axis=1))
        centroids = new_centroids
        shift = _round_up(moved_by)
        n_iter += 1
        if relocated:
            state.exact_inertia(centroids.astype(np.float32))
        else:  # moving a centroid to the mean of its rows takes off size × move²
            state.inertia -= float((state.sizes * moved_by ** 2).sum())
    return _finish(state, centroids, seed, n_iter, converged, t0)


def _finish(state: _State, centroids: np.ndarray, seed: int, n_iter: int, converged: bool,
            t0: float) -> KMeansResult:
    """Exact distances of each row to its centroid, and the cluster sizes, from the labels."""
    c32 = centroids.astype(np.float32)
    dist = state.row_distances(c32)
    sizes = np.bincount(state.labels, minlength=state.k).astype(np.int64)
    inertia = float((dist.astype(np.float64) ** 2).sum())
    return KMeansResult(seed, state.labels, dist, c32, sizes, inertia, n_iter, converged,
                        time.perf_counter() - t0, state.measured)


# --- agreement between labelings -------------------------------------------------------------


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1.0) / 2.0).sum())


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """The adjusted Rand index of two labelings of the same items (Hubert & Arabie 1985):
    1 for identical partitions whatever the label names, about 0 for independent ones."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"labelings of different shapes: {a.shape} and {b.shape}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    nb = int(bi.max()) + 1
    table = np.bincount(ai.astype(np.int64) * nb + bi, minlength=(int(ai.max()) + 1) * nb)
    index = _pairs(table)
    rows = _pairs(np.bincount(ai))
    cols = _pairs(np.bincount(bi))
    expected = rows * cols / (n * (n - 1) / 2.0)
    best = (rows + cols) / 2.0
    if best == expected:  # both all one cluster, or both all singletons: identical
        return 1.0
    return (index - expected) / (best - expected)


def pairwise_agreement(results: Sequence[KMeansResult]
                       ) -> tuple[float | None, list[tuple[int, int, float]]]:
    """Mean adjusted Rand index over every pair of runs, and (seed, seed, ARI) of each pair;
    None with fewer than two runs."""
    pairs = [(r.seed, q.seed, adjusted_rand_index(r.labels, q.labels))
             for r, q in itertools.combinations(results, 2)]
    mean = float(np.mean([p[2] for p in pairs])) if pairs else None
    return mean, pairs


# --- the centroid of the whole matrix --------------------------------------------------------


def centroid_distances(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the centroid of all rows (float64), each row's Euclidean distance to it (float64)),
    the distances computed on the differences, chunk by chunk (exact where the rows are
    nearly equal, as collapsed rows are)."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty 2-D matrix, got shape {x.shape}")
    centroid = x.sum(axis=0, dtype=np.float64) / x.shape[0]
    c32 = centroid.astype(np.float32)
    chunk = _rows_per(CHUNK_BYTES, x.shape[1])
    out = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], chunk):
        diff = x[s:s + chunk] - c32
        out[s:s + chunk] = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
    return centroid, out


def closest_rows(distances: np.ndarray, n: int) -> np.ndarray:
    """The indices of the ``n`` smallest ``distances``, smallest first (ties by index)."""
    n = min(n, distances.size)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(distances, n - 1)[:n] if n < distances.size else \
        np.arange(distances.size)
    return part[np.lexsort((part, distances[part]))]
