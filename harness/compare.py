"""Compare the glitch tokens of several scanned models.

Tokens are aligned by id where two models share a tokenizer (equal tokenizer hash) and by
their raw bytes where they do not. For every detector the models have in common, and for
the final verdict, a comparison gives per model the flagged count; per pair of models the
shared tokens, the overlap of their flagged sets, the Jaccard index and the Spearman rank
correlation of the scores over the shared tokens; and the tokens flagged in every model or in
one model only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from harness import store
from harness.errors import HarnessError
from harness.verdicts import FINAL, FLAGGED, GLITCH


@dataclass
class Side:
    """One model's tokens and the findings of the runs being compared."""

    name: str
    model_id: int
    tokenizer_hash: str
    raw: list[bytes]
    text: list[str]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    verdicts: dict[str, np.ndarray] = field(default_factory=dict)
    suspicious_when: dict[str, str] = field(default_factory=dict)

    def flagged(self, detector: str) -> np.ndarray:
        """Tokens the detector calls glitchy: ``glitch`` for the final verdict, ``glitch`` or
        ``suspect`` for a detector."""
        wanted = (GLITCH,) if detector == FINAL else FLAGGED
        return np.isin(self.verdicts[detector], wanted)


def load_side(engine: Engine, name: str, model_id: int, runs: dict[str, int]) -> Side:
    """Read a model's tokens and the findings of ``runs`` (detector name -> run id)."""
    with engine.connect() as conn:
        thash = store.model_by_id(conn, model_id).tokenizer_hash
        rows = store.token_bytes(conn, model_id)
        side = Side(name, model_id, thash, [r for r, _ in rows], [t for _, t in rows])
        n = len(rows)
        for det, run_id in runs.items():
            side.scores[det], side.verdicts[det] = store.run_arrays(conn, run_id, n)
            side.suspicious_when[det] = store.suspicious_when(conn, run_id)
    return side


def align(a: Side, b: Side) -> tuple[np.ndarray, np.ndarray, str]:
    """Index pairs of the tokens two models share: by id when they share a tokenizer, else by
    raw bytes (padding rows, which have none, are left out; of several tokens with the same
    bytes the lowest id counts)."""
    if a.tokenizer_hash == b.tokenizer_hash:
        n = min(len(a.raw), len(b.raw))
        idx = np.arange(n)
        return idx, idx, "id"
    where_b: dict[bytes, int] = {}
    for j, raw in enumerate(b.raw):  # a hash join on the bytes
        if raw:
            where_b.setdefault(raw, j)
    ia, ib, seen = [], [], set()
    for i, raw in enumerate(a.raw):
        j = where_b.get(raw) if raw else None
        if j is not None and raw not in seen:
            seen.add(raw)
            ia.append(i)
            ib.append(j)
    return np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64), "raw bytes"


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho (average ranks for ties) over the pairs where both are finite."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return None
    rx, ry = _ranks(x[ok]), _ranks(y[ok])
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    values, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    return average[inverse]


@dataclass
class Comparison:
    """Everything ``harness compare`` prints, as plain data (``as_dict`` for JSON)."""

    models: list[str]
    detectors: list[str]
    counts: dict[str, dict[str, dict[str, int]]]  # detector -> model -> verdict -> count
    pairs: list[dict[str, Any]]
    in_all: dict[str, list[dict[str, Any]]]
    only_in: dict[str, dict[str, list[dict[str, Any]]]]

    def as_dict(self) -> dict[str, Any]:
        return {"models": self.models, "detectors": self.detectors, "counts": self.counts,
                "pairs": self.pairs, "flagged_in_all": self.in_all,
                "flagged_in_one_only": self.only_in}


def compare(sides: list[Side], top: int = 20) -> Comparison:
    """Compare the flagged tokens of ``sides`` (at least two) detector by detector."""
    if len(sides) < 2:
        raise HarnessError("compare needs at least two models")
    common = [d for d in sides[0].verdicts if all(d in s.verdicts for s in sides[1:])]
    detectors = [d for d in common if d != FINAL] + ([FINAL] if FINAL in common else [])
    if not detectors:
        raise HarnessError("the models have no detector run in common: scan them with the "
                           "same detectors")
    counts = {d: {s.name: _count(s.verdicts[d]) for s in sides} for d in detectors}
    pairs = []
    for a, b in combinations(sides, 2):
        ia, ib, how = align(a, b)
        for d in detectors:
            fa, fb = a.flagged(d)[ia], b.flagged(d)[ib]
            both, either = int((fa & fb).sum()), int((fa | fb).sum())
            sa, sb = a.scores[d][ia], b.scores[d][ib]
            pairs.append({
                "detector": d, "model_a": a.name, "model_b": b.name, "aligned_by": how,
                "shared_tokens": int(len(ia)), "flagged_a": int(a.flagged(d).sum()),
                "flagged_b": int(b.flagged(d).sum()), "flagged_a_shared": int(fa.sum()),
                "flagged_b_shared": int(fb.sum()), "both": both,
                "jaccard": both / either if either else None,
                "spearman": rank_correlation(sa, sb),
            })
    in_all, only_in = {}, {}
    for d in detectors:
        in_all[d], only_in[d] = _sets(sides, d, top)
    return Comparison([s.name for s in sides], detectors, counts, pairs, in_all, only_in)


def _count(verdicts: np.ndarray) -> dict[str, int]:
    values, n = np.unique(verdicts[verdicts != ""].astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, n, strict=True)}


def _sets(sides: list[Side], d: str, top: int
          ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Tokens flagged in every model, and per model those flagged there only (among tokens
    every model has), most suspicious first by the first model's score."""
    base = sides[0]
    maps = [align(base, s) for s in sides[1:]]
    present = np.ones(len(base.raw), dtype=bool)
    where = []
    for ia, ib, _ in maps:
        m = np.full(len(base.raw), -1)
        m[ia] = ib
        where.append(m)
        present &= m >= 0
    ids0 = np.nonzero(present)[0]
    flags = [base.flagged(d)[ids0]] + [s.flagged(d)[w[ids0]] for s, w in
                                       zip(sides[1:], where, strict=True)]
    flags = np.array(flags)

    def entry(k: int) -> dict[str, Any]:
        t0 = int(ids0[k])
        ids = [t0] + [int(w[t0]) for w in where]
        return {"text": base.text[t0], "token_ids": dict(zip([s.name for s in sides], ids,
                                                              strict=True)),
                "scores": {s.name: _finite(s.scores[d][i]) for s, i in zip(sides, ids,
                                                                           strict=True)}}

    def order(ks: np.ndarray, side: Side, index: np.ndarray) -> np.ndarray:
        s = side.scores[d][index[ks]]
        key = np.where(np.isfinite(s), -s if side.suspicious_when[d] == "high" else s, np.inf)
        return ks[np.argsort(key, kind="stable")]

    index0 = ids0
    all_k = order(np.nonzero(flags.all(axis=0))[0], base, index0)[:top]
    only: dict[str, list[dict[str, Any]]] = {}
    for m, side in enumerate(sides):
        ks = np.nonzero(flags[m] & (flags.sum(axis=0) == 1))[0]
        index = ids0 if m == 0 else where[m - 1][ids0]
        only[side.name] = [entry(int(k)) for k in order(ks, side, index)[:top]]
    return [entry(int(k)) for k in all_k], only


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
