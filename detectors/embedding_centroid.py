"""``embedding-centroid``: distance of each input-embedding row to the centroid of all rows.

Rumbelow & Watkins found GPT-J's glitch tokens (` SolidGoldMagikarp`, ` attRot`, unused bytes)
to be the tokens closest to the centroid of the whole embedding cloud; later write-ups (the one
on ` davidjl`) add that their embeddings decayed toward zero, so the row norm is stored as
evidence too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from detectors.static import duplicate_counts, findings_in_chunks, row_norms
from harness.backend import Capability
from harness.detector import Detector, Finding, ScanContext, robust_z
from harness.hookspecs import hookimpl


class EmbeddingCentroid(Detector):
    """Flags tokens whose input embedding sits unusually close to the centroid of all rows.

    score: Euclidean distance to the centroid (low is suspicious). Verdict ``suspect`` when
    the robust z-score of the distance (or, with ``indicator=norm``, of the row norm) is
    below ``-z``, when the token is in the lowest ``percentile`` percent, or when its row is
    an exact copy of another row (``duplicates``): a row no gradient ever moved from its
    initial value, as SmolLM2's never-used special tokens show.
    """

    name = "embedding-centroid"
    version = "1"
    description = "distance of each input-embedding row to the centroid (and its norm)"
    requires = frozenset({Capability.EMBEDDINGS})
    suspicious_when = "low"
    default = True  # in every scan that names no detectors
    defaults = {"z": 3.5, "indicator": "distance", "percentile": 0.0, "duplicates": True}

    def prepare(self, ctx: ScanContext) -> dict:
        if self.options["indicator"] not in ("distance", "norm"):
            from harness.errors import HarnessError

            raise HarnessError("embedding-centroid: indicator must be 'distance' or 'norm'")
        return dict(self.options)

    def run(self, ctx: ScanContext, token_ids: np.ndarray) -> Iterator[list[Finding]]:
        emb = ctx.backend.input_embeddings()
        centroid = emb.mean(axis=0, dtype=np.float64)
        norms = row_norms(emb)
        # |e - c|^2 = |e|^2 - 2 e.c + |c|^2, without materialising e - c
        sq = norms**2 - 2.0 * (emb @ centroid.astype(emb.dtype)) + float(centroid @ centroid)
        dist = np.sqrt(np.maximum(sq, 0.0))
        indicator = dist if self.options["indicator"] == "distance" else norms
        z = robust_z(indicator)
        flagged = z <= -float(self.options["z"])
        if self.options["percentile"] > 0:
            flagged |= indicator <= np.percentile(indicator, float(self.options["percentile"]))
        dups = duplicate_counts(emb)
        if self.options["duplicates"]:
            flagged |= dups > 0
        verdicts = np.where(flagged, "suspect", "ok")
        yield from findings_in_chunks(token_ids, dist, verdicts,
                                      {"norm": norms, "z": z, "duplicates": dups})


@hookimpl
def register_detectors(register):
    register(EmbeddingCentroid)
