"""Helpers shared by the static (embedding-matrix) detectors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from harness.detector import FindingArrays

CHUNK = 16384


def findings_in_chunks(token_ids: np.ndarray, scores: np.ndarray, verdicts: np.ndarray,
                       evidence: dict[str, np.ndarray]) -> Iterator[FindingArrays]:
    """Slice per-token arrays (indexed by token id) into batches for ``token_ids``."""
    for start in range(0, len(token_ids), CHUNK):
        ids = token_ids[start: start + CHUNK]
        yield FindingArrays(ids, scores[ids], verdicts[ids],
                            {k: a[ids] for k, a in evidence.items()})


def row_norms(matrix: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))


def duplicate_counts(matrix: np.ndarray) -> np.ndarray:
    """For each row, how many other rows are bit-for-bit identical to it.

    Rows are hashed by an integer mix of their bit patterns (exact, unlike a float dot
    product), then rows with equal hashes are compared byte for byte.
    """
    rows = np.ascontiguousarray(matrix)
    bits = rows.view(np.uint32) if rows.dtype.itemsize == 4 else rows.view(np.uint16)
    weights = np.random.default_rng(0).integers(1, 2**63, size=bits.shape[1], dtype=np.uint64)
    keys = np.empty(len(rows), dtype=np.uint64)
    for start in range(0, len(rows), 8192):
        chunk = bits[start: start + 8192].astype(np.uint64)
        keys[start: start + 8192] = (chunk * weights).sum(axis=1)  # wraps mod 2**64
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    result = np.zeros(len(rows), dtype=np.int64)
    candidates = np.flatnonzero(counts[inverse.ravel()] > 1)
    if candidates.size:  # few rows: compare them as opaque byte strings
        sub = np.ascontiguousarray(bits[candidates])
        exact = sub.view(np.dtype((np.void, sub.dtype.itemsize * sub.shape[1]))).ravel()
        _, inv, cnt = np.unique(exact, return_inverse=True, return_counts=True)
        result[candidates] = cnt[inv.ravel()] - 1
    return result
