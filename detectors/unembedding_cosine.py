"""``unembedding-cosine``: Land & Bartolo (2024), "Fishing for Magikarp".

Remove the first principal component of the output-embedding (unembedding) matrix, take the
mean of a reference set of tokens known to be unused, and score every row by its cosine
distance to that mean: under-trained rows all drift the same way and sit close to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from detectors.static import duplicate_counts, findings_in_chunks, row_norms
from harness.backend import Capability
from harness.detector import Detector, Finding, ScanContext, robust_z
from harness.errors import HarnessError
from harness.hookspecs import hookimpl

UNUSED_NAME = re.compile(
    r"^(<\|?(unused|reserved)[\w-]*?\d+\|?>|\[unused\d+\]|<\|reserved_special_token_\d+\|>)$")
NEVER_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
RARE_LEAD = {0xF3, 0xF4}  # 4-byte lead bytes of planes 15-16 (private use): almost never seen
MIN_REFERENCE = 3


def reference_set(ctx: ScanContext, unemb: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The automatic reference set and the sources it came from.

    Primary sources: ``<unused…>``-named tokens, byte tokens for bytes that never occur in
    UTF-8 (0xC0, 0xC1, 0xF5–0xFF), rows past the tokenizer's size. When these give fewer than
    three rows (SmolLM2's byte-level vocabulary has none of them), fall back to rows that are
    exact duplicates of at least two others (never moved from their initial value) and to
    the byte tokens of the rarest 4-byte lead bytes 0xF3 and 0xF4.
    """
    vocab = ctx.vocab
    single = np.array([len(r) == 1 for r in vocab.raw])
    first = np.array([r[0] if r else -1 for r in vocab.raw])
    sources: dict[str, np.ndarray] = {
        "unused-named": np.array([bool(UNUSED_NAME.match(t)) for t in vocab.text]),
        "never-utf8-bytes": single & np.isin(first, list(NEVER_UTF8)),
        "padding-rows": vocab.padding.copy(),
    }
    chosen = [k for k, m in sources.items() if m.any()]
    mask = np.zeros(len(vocab), dtype=bool)
    for k in chosen:
        mask |= sources[k]
    if mask.sum() < MIN_REFERENCE:
        fallbacks = {
            "duplicate-rows": duplicate_counts(unemb) >= 2,
            "rare-lead-bytes": single & np.isin(first, list(RARE_LEAD)),
        }
        for k, m in fallbacks.items():
            if m.any():
                chosen.append(k)
                mask |= m
    return np.flatnonzero(mask), chosen


class UnembeddingCosine(Detector):
    """Cosine distance of each unembedding row to the mean of known-unused rows (low is
    suspicious), after removing the matrix's first principal component.

    Options: ``reference`` (``auto`` or comma-separated token ids), ``z`` (robust z-score
    threshold for ``suspect``), ``remove_pc`` (remove the first principal component).
    """

    name = "unembedding-cosine"
    version = "1"
    description = "cosine distance of unembedding rows to the mean of known-unused tokens"
    requires = frozenset({Capability.EMBEDDINGS})
    suspicious_when = "low"
    default = True  # in every scan that names no detectors
    defaults = {"reference": "auto", "z": 3.5, "remove_pc": True}

    def prepare(self, ctx: ScanContext) -> dict:
        self._unemb = ctx.backend.output_embeddings()
        ref = str(self.options["reference"]).strip()
        if ref == "auto":
            ids, sources = reference_set(ctx, self._unemb)
        else:
            try:
                ids = np.array(sorted({int(x) for x in ref.split(",") if x.strip()}))
            except ValueError:
                raise HarnessError("unembedding-cosine: reference must be 'auto' or "
                                   "comma-separated token ids") from None
            sources = ["given"]
            if ids.size and (ids.min() < 0 or ids.max() >= len(ctx.vocab)):
                raise HarnessError(f"unembedding-cosine: reference ids must be in "
                                   f"0..{len(ctx.vocab) - 1}")
        if ids.size == 0:
            raise HarnessError("unembedding-cosine: the reference set is empty; give one with "
                               "-o unembedding-cosine.reference=ID,ID,...")
        self._ref_ids = ids
        return {**self.options, "reference_source": sources, "reference_size": int(ids.size),
                "reference_ids": ids[:256].tolist(),
                "tied_embeddings": bool(ctx.backend.embeddings_tied())}

    def run(self, ctx: ScanContext, token_ids: np.ndarray) -> Iterator[list[Finding]]:
        u = self._unemb
        norms_sq = row_norms(u) ** 2
        proj = np.zeros(len(u))
        if self.options["remove_pc"]:
            mean = u.mean(axis=0, dtype=np.float64)
            gram = (u.T @ u).astype(np.float64) - len(u) * np.outer(mean, mean)
            pc = np.linalg.eigh(gram)[1][:, -1]
            proj = u @ pc.astype(u.dtype)
        else:
            pc = np.zeros(u.shape[1])
        ref_mean = u[self._ref_ids].mean(axis=0, dtype=np.float64)
        ref_mean = ref_mean - (ref_mean @ pc) * pc  # the reference mean, first PC removed
        # u' = u - (u.pc) pc;  u'.m' = u.m' (m' is orthogonal to pc);  |u'|^2 = |u|^2 - (u.pc)^2
        dots = u @ ref_mean.astype(u.dtype)
        denom = np.sqrt(np.maximum(norms_sq - proj**2, 1e-30)) * np.linalg.norm(ref_mean)
        cos_dist = 1.0 - dots / np.maximum(denom, 1e-30)
        z = robust_z(cos_dist)
        verdicts = np.where(z <= -float(self.options["z"]), "suspect", "ok")
        yield from findings_in_chunks(token_ids, cos_dist, verdicts, {"z": z})


@hookimpl
def register_detectors(register):
    register(UnembeddingCosine)
