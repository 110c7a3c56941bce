"""``elicit``: can an optimised prompt make the model say the token?

Rumbelow & Watkins' prompt generation turned into a verifier: for each token in scope, a prompt of
``positions`` real tokens is optimised by gradient descent in the embedding space to make the
model produce that token (``harness.elicitation``; the token itself may not appear in the
prompt unless ``allow_target``). A token whose best prompt, over ``restarts`` seeds, stays
below ``threshold`` is ``glitch``: unspeakable in a far stronger sense than failing three
fixed repeat prompts. Many tokens share one optimisation batch (``batch`` tokens, times the
restarts, per batch), and a token's restarts stop together once one of them reaches
``stop_at``.

Not a default detector (it costs seconds per token on a CPU), and not a verifier: in the
final verdict it counts as another behavioural detector, so its ``glitch`` on a token
``repeat-probe`` verified ``ok`` makes that token ``suspect``, and it never clears a
``repeat-probe`` glitch. Where the ``against`` detector (repeat-probe) called a token glitch
and the prompt elicits it, the evidence says so (``elicited_despite``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from harness import store
from harness.backend import Capability
from harness.detector import Detector, Finding, ScanContext
from harness.elicitation import ElicitOptions, ElicitRow, elicit, prompt_candidates
from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.verdicts import GLITCH, OK


class Elicit(Detector):
    """Verifies tokens by optimising a prompt to make the model say each one.

    score: the token's highest probability after the best prompt found (by a plain forward
    pass of the projected prompt), over the restarts. Verdict ``glitch`` below ``threshold``
    (0.01, the repeat verifier's), ``ok`` otherwise.
    """

    name = "elicit"
    version = "1"
    description = ("optimises a prompt by gradient descent to make the model say each token "
                   "(Rumbelow & Watkins' prompt generation); glitch when even that fails")
    requires = frozenset({Capability.GRADIENTS, Capability.SCORE})
    suspicious_when = "low"
    behavioural = True
    # threshold: the repeat verifier's 0.01; a token stops at twice that (stop_at), which is
    # all its verdict needs, and its evidence's probability is then a lower bound
    defaults = {"positions": 8, "steps": 50, "swaps": 16, "restarts": 1, "lr": 0.3,
                "reg": 0.1, "threshold": 0.01, "stop_at": 0.02, "seed": 0, "batch": 128,
                "prompt_tokens": "normal", "allow_target": False, "against": "repeat-probe"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        self.elicit_options = ElicitOptions(
            positions=int(o["positions"]), steps=int(o["steps"]), lr=float(o["lr"]),
            reg=float(o["reg"]), swaps=int(o["swaps"]), stop_at=float(o["stop_at"]),
            allow_target=bool(o["allow_target"]), prompt_tokens=str(o["prompt_tokens"]))
        self.elicit_options.check()
        if int(o["restarts"]) < 1:
            raise HarnessError("elicit needs at least one restart")
        if not 0 < float(o["threshold"]) <= 1:
            raise HarnessError(f"elicit threshold must be in (0, 1], not {o['threshold']}")
        self._pending: dict[int, list[dict[str, Any]]] = {}

    def prepare(self, ctx: ScanContext) -> dict[str, Any]:
        self.candidates = prompt_candidates(ctx.categories, self.options["prompt_tokens"])
        against = str(self.options["against"])
        self.against = ctx.verdicts_of(against) if ctx.verdicts_of and against else None
        return {**self.options, "prompt_candidates": len(self.candidates)}

    def run(self, ctx: ScanContext, token_ids: np.ndarray) -> Iterator[list[Finding]]:
        size = max(1, int(self.options["batch"]))
        for start in range(0, len(token_ids), size):
            yield self._batch(ctx, [int(t) for t in token_ids[start: start + size]])

    def _batch(self, ctx: ScanContext, batch: list[int]) -> list[Finding]:
        be = ctx.backend
        o = self.options
        restarts, seed = int(o["restarts"]), int(o["seed"])
        rows = [ElicitRow([t], seed=seed + r, restart=r, group=t)
                for t in batch for r in range(restarts)]
        found = elicit(be, rows, self.candidates, self.elicit_options)
        texts = be.decode_batch([f.prompt_ids for f in found])
        thr = float(o["threshold"])
        run_options = {k: o[k] for k in ("lr", "reg", "swaps", "stop_at", "prompt_tokens",
                                          "allow_target", "threshold")}
        findings = []
        for k, t in enumerate(batch):
            mine = list(range(k * restarts, (k + 1) * restarts))
            best = max(mine, key=lambda i: found[i].probability)
            p = found[best].probability
            verdict = GLITCH if p < thr else OK
            evidence: dict[str, Any] = {
                "p": _round(p), "prompt_ids": found[best].prompt_ids, "prompt": texts[best],
                "restart": found[best].row.restart, "steps": found[best].steps}
            if restarts > 1:
                evidence["restarts_p"] = [_round(found[i].probability) for i in mine]
            name = str(o["against"])
            if self.against is not None and self.against[t]:
                evidence[name] = self.against[t]
                if self.against[t] == GLITCH and verdict == OK:
                    evidence["elicited_despite"] = name
            findings.append(Finding(t, p, verdict, evidence))
            self._pending[t] = [{
                "target_ids": [t], "target_text": ctx.vocab.text[t], "restart": i - mine[0],
                "seed": found[i].row.seed, "n_positions": len(found[i].prompt_ids),
                "steps": found[i].steps, "prompt_ids": found[i].prompt_ids,
                "prompt_text": texts[i], "probability": found[i].probability,
                "wall_s": found[i].wall_s, "options": run_options} for i in mine]
        return findings

    def store_extra(self, conn: Any, model_id: int, run_id: int, batch: Any) -> None:
        """Each restart of each token of the batch as a row of ``elicitations``."""
        rows = []
        for f in batch:
            for r in self._pending.pop(f.token_id, []):
                rows.append({**r, "model_id": model_id, "run_id": run_id,
                             "session": f"run-{run_id}:{json.dumps(r['target_ids'])}"})
        store.insert_elicitations(conn, rows)


def _round(p: float) -> float:
    """Probabilities kept to 4 significant digits (tiny ones stay readable)."""
    return float(f"{p:.4g}")


@hookimpl
def register_detectors(register):
    register(Elicit)
