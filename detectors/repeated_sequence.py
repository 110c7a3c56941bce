"""``repeated-sequence``: can the model copy the token out of a repeated random sequence?

The experiment of the article "Under-trained and unused tokens": a sequence of random
vocabulary tokens followed by the same sequence again. Induction lets a model predict the
second copy almost perfectly (mean log-probability about -1 against -7 for the first copy on
GPT-2); a token the model cannot copy keeps a low log-probability in the second copy.

Every token of the run's scope is placed in ``contexts`` different random sequences, fixed by
``seed``. Tokens are dealt into blocks that are self-contained (a block's sequences hold only
its own tokens), so a resumed run recomputes exactly the blocks it had not finished and ends
with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from harness.backend import Capability, ScoreRequest
from harness.detector import Detector, FindingArrays, ScanContext
from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.verdicts import ERROR, OK, SUSPECT

SEQUENCES_PER_BLOCK = 64


class RepeatedSequence(Detector):
    """Mean log-probability of each token in the second copy of repeated random sequences.

    score: that mean (low is suspicious); evidence: the first copy's mean too, and the gain.
    Verdict ``suspect`` when the second-copy mean is below ``threshold``; the default,
    ``chance``, is ln(1 / vocabulary size): copying the token no better than a uniform guess.
    """

    name = "repeated-sequence"
    version = "1"
    description = "log-probability of each token in the second copy of a repeated random sequence"
    requires = frozenset({Capability.SCORE})
    suspicious_when = "low"
    behavioural = True
    defaults = {"length": 25, "contexts": 3, "seed": 0, "threshold": "chance"}

    def prepare(self, ctx: ScanContext) -> dict:
        if int(self.options["length"]) < 2 or int(self.options["contexts"]) < 1:
            raise HarnessError("repeated-sequence needs length >= 2 and contexts >= 1")
        opts = dict(self.options)
        if opts["threshold"] == "chance":
            opts["threshold"] = round(-math.log(len(ctx.vocab)), 4)
        try:
            opts["threshold"] = float(opts["threshold"])
        except ValueError:
            raise HarnessError("repeated-sequence threshold must be a log-probability or "
                               f"'chance', not {opts['threshold']!r}") from None
        self.threshold = opts["threshold"]
        return opts

    def blocks(self, scope: np.ndarray) -> list[np.ndarray]:
        """The scope dealt into self-contained blocks, in a fixed random order."""
        order = np.random.default_rng(int(self.options["seed"])).permutation(scope)
        size = int(self.options["length"]) * SEQUENCES_PER_BLOCK
        return [order[k: k + size] for k in range(0, len(order), size)]

    def run(self, ctx: ScanContext, token_ids: np.ndarray) -> Iterator[FindingArrays]:
        todo = set(token_ids.tolist())
        for b, block in enumerate(self.blocks(ctx.scope_ids())):
            if todo.isdisjoint(block.tolist()):
                continue
            yield self._block(ctx, b, block)

    def _sequences(self, b: int, block: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(sequence, which slots are scored) for every context of the block."""
        length, seed = int(self.options["length"]), int(self.options["seed"])
        out = []
        for r in range(int(self.options["contexts"])):
            rng = np.random.default_rng([seed, b, r])
            perm = block if r == 0 else rng.permutation(block)
            n_seq = -(-len(perm) // length)
            fill = n_seq * length - len(perm)
            # the last sequence is topped up with other tokens of the block, not scored twice
            padded = np.concatenate([perm, rng.choice(block, fill)]) if fill else perm
            scored = np.arange(len(padded)) < len(perm)
            out.extend(zip(padded.reshape(n_seq, length), scored.reshape(n_seq, length),
                           strict=True))
        return out

    def _block(self, ctx: ScanContext, b: int, block: np.ndarray) -> FindingArrays:
        be = ctx.backend
        length = int(self.options["length"])
        bos = be.bos_ids()
        off = len(bos)
        seqs = self._sequences(b, block)
        requests = []
        for seq, _ in seqs:
            ids = bos + seq.tolist() * 2
            first = list(range(max(off, 1), off + length))
            second = list(range(off + length, off + 2 * length))
            requests.append(ScoreRequest(ids, first + second,
                                         [ids[p] for p in first + second]))
        results = be.score(requests)
        index = {int(t): k for k, t in enumerate(block)}
        sums = np.zeros((2, len(block)))
        counts = np.zeros((2, len(block)))
        failed = np.zeros(len(block), dtype=bool)
        for (seq, scored), req, res in zip(seqs, requests, results, strict=True):
            rows = np.array([index[int(t)] for t in seq])
            if res.error:
                failed[rows[scored]] = True
                continue
            lp = np.asarray(res.logprobs)
            n_first = len(req.positions) - length
            first_slots = np.arange(length - n_first, length)
            keep = scored[first_slots]
            np.add.at(sums[0], rows[first_slots][keep], lp[:n_first][keep])
            np.add.at(counts[0], rows[first_slots][keep], 1)
            np.add.at(sums[1], rows[scored], lp[n_first:][scored])
            np.add.at(counts[1], rows[scored], 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            first_mean, second_mean = sums / counts
        verdicts = np.where(second_mean < self.threshold, SUSPECT, OK)
        verdicts = np.where(failed | ~np.isfinite(second_mean), ERROR, verdicts)
        return FindingArrays(token_ids=block.astype(np.int64), scores=second_mean,
                             verdicts=verdicts,
                             evidence={"first": first_mean, "second": second_mean,
                                       "gain": second_mean - first_mean})


@hookimpl
def register_detectors(register):
    register(RepeatedSequence)
