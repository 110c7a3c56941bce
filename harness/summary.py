"""The "most suspicious tokens" ranking shown at the end of a scan."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy.engine import Engine

from harness import store
from harness.verdicts import ERROR, FLAGGED, SEVERITY


@dataclass
class RankedToken:
    token_id: int
    text: str
    category: str
    n_flagged: int
    suspicion: float  # mean percentile toward the glitchy end, 1.0 = most suspicious
    scores: dict[str, float | None]
    verdicts: dict[str, str]
    final: str | None = None  # the scan's final verdict, where one is stored


def top_tokens(engine: Engine, model_id: int, run_ids: dict[str, int], n: int = 25,
               final_run: int | None = None) -> list[RankedToken]:
    """The most suspicious tokens. With a final verdict (``final_run``): only the tokens
    something examined behaviourally (the verifier scored them) or flagged, ranked by final
    verdict (glitch, suspect, error, ok), then by the verifier's score (the final verdict's,
    its suspicious end first), then by how many detectors flag them and their mean
    suspicion percentile. Without one: every token, by flags and suspicion."""
    if not run_ids:
        return []
    with engine.connect() as conn:
        tokens = store.token_texts(conn, model_id)
        size = len(tokens)
        flagged = np.zeros(size, dtype=np.int64)
        suspicion = np.zeros(size)
        scores: dict[str, np.ndarray] = {}
        verdicts: dict[str, np.ndarray] = {}
        for det, run_id in run_ids.items():
            when = store.suspicious_when(conn, run_id)
            s, v = store.run_arrays(conn, run_id, size)
            key = np.where(np.isnan(s), np.inf, -s if when == "high" else s)
            rank = np.empty(size)
            rank[np.argsort(key, kind="stable")] = np.arange(size)
            suspicion += 1.0 - rank / max(size - 1, 1)
            flagged += np.isin(v, FLAGGED)
            scores[det], verdicts[det] = s, v
        final = np.full(size, "", dtype=object)
        verify_key = np.zeros(size)
        shown = np.ones(size, dtype=bool)
        if final_run is not None:
            final_score, final = store.run_arrays(conn, final_run, size)
            high = store.suspicious_when(conn, final_run) == "high"
            verify_key = np.where(np.isnan(final_score), np.inf,
                                  -final_score if high else final_score)
            shown = ~np.isnan(final_score) | (flagged > 0) | np.isin(final, (*FLAGGED, ERROR))
    suspicion /= len(run_ids)
    severity = np.array([SEVERITY.get(v, 0) for v in final])
    order = np.lexsort((-suspicion, -flagged, verify_key, -severity))
    order = order[shown[order]][:n]
    return [RankedToken(int(i), tokens[i][1], tokens[i][2], int(flagged[i]), float(suspicion[i]),
                        {d: (None if np.isnan(scores[d][i]) else float(scores[d][i]))
                         for d in run_ids},
                        {d: str(verdicts[d][i]) for d in run_ids},
                        str(final[i]) or None)
            for i in order]


def verdict_counts(engine: Engine, run_id: int) -> dict[str, int]:
    """How many of the run's findings carry each verdict."""
    with engine.connect() as conn:
        return store.verdict_counts(conn, run_id)
