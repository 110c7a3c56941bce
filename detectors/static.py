"""Helpers shared by the static (embedding-matrix) detectors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from harness.detector import Finding

CHUNK = 16384


def findings_in_chunks(token_ids: np.ndarray, scores: np.ndarray, verdicts: np.ndarray,
                       evidence: dict[str, np.ndarray]) -> Iterator[list[Finding]]:
    """Turn per-token arrays (indexed by token id) into batches of findings for ``token_ids``."""
    for start in range(0, len(token_ids), CHUNK):
        ids = token_ids[start: start + CHUNK]
        s = scores[ids].tolist()
        v = verdicts[ids].tolist()
        ev = {k: np.round(a[ids].astype(float), 6).tolist() for k, a in evidence.items()}
        yield [Finding(int(t), s[j], v[j], {k: ev[k][j] for k in ev})
               for j, t in enumerate(ids.tolist())]


def row_norms(matrix: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))


def duplicate_counts(matrix: np.ndarray) -> np.ndarray:
    """For each row, how many other rows are bit-for-bit identical to it.

    Rows compare as opaque byte strings (one sort), so no float rounding can merge rows.
    """
    rows = np.ascontiguousarray(matrix)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return counts[inverse.ravel()] - 1
