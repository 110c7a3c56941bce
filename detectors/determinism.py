"""``determinism``: ask the same repeat prompt several times at temperature 0 and count the
distinct answers.

Rumbelow & Watkins saw glitch tokens break determinism at temperature 0 in OpenAI's API: the same
prompt gave different completions. Greedy decoding should answer the same way every time, so
more than one distinct answer is a sign that the model sits on a knife's edge between
continuations (or that the server batches requests in ways that change the numbers). Every
trial is its own ``generate`` request; on local backends the trials run in batches of a
different composition (the token sits at another place among other tokens), since batch
shape is what changes floating-point results there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np

from harness.backend import Capability, GenerateRequest
from harness.detector import Detector, Finding, ScanContext
from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.probe_sets import find_probe_set, plan_prompt
from harness.verdicts import ERROR, OK, SUSPECT


class Determinism(Detector):
    """Counts the distinct greedy completions of one repeat prompt over ``trials`` requests.

    score: the number of distinct answers (1 is deterministic). Verdict ``suspect`` above 1;
    ``error`` when a trial failed (a resumed scan asks again).
    """

    name = "determinism"
    version = "1"
    description = "asks one repeat prompt N times at temperature 0; counts distinct answers"
    requires = frozenset({Capability.GENERATE})
    suspicious_when = "high"
    behavioural = True
    defaults = {"probes": "repeat-12", "prompt": 0, "trials": 5, "max_new_tokens": 8,
                "batch": 64}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        templates = find_probe_set(self.options["probes"])
        index = int(self.options["prompt"])
        if not 0 <= index < len(templates.templates):
            raise HarnessError(f"probe set {templates.name!r} has prompts 0.."
                               f"{len(templates.templates) - 1}, not {index}")
        self.template, self.label = templates.templates[index], templates.labels[index]
        if int(self.options["trials"]) < 2:
            raise HarnessError("determinism needs trials of at least 2")

    def prepare(self, ctx: ScanContext) -> dict:
        self.plan = plan_prompt(self.template, self.label, ctx.backend.encode,
                                ctx.backend.bos_ids())
        return {**self.options, "prompt_label": self.label}

    def run(self, ctx: ScanContext, token_ids: np.ndarray) -> Iterator[list[Finding]]:
        size = max(1, int(self.options["batch"]))
        for start in range(0, len(token_ids), size):
            yield self._batch(ctx, [int(t) for t in token_ids[start: start + size]])

    def _batch(self, ctx: ScanContext, batch: list[int]) -> list[Finding]:
        trials = int(self.options["trials"])
        max_new = int(self.options["max_new_tokens"])
        answers: dict[int, list[str]] = {t: [] for t in batch}
        errors: dict[int, str] = {}
        for k in range(trials):
            shift = (k * len(batch)) // trials
            order = batch[shift:] + batch[:shift]  # a different neighbourhood each trial
            results = ctx.backend.generate([GenerateRequest(self.plan.full_ids(t), max_new)
                                            for t in order])
            for t, res in zip(order, results, strict=True):
                if res.error:
                    errors[t] = res.error
                else:
                    answers[t].append(res.text)
        findings = []
        for t in batch:
            counts = Counter(answers[t])
            evidence = {"answers": dict(counts.most_common())}
            if t in errors:
                evidence["error"] = errors[t]
                evidence["failed_trials"] = trials - len(answers[t])
                findings.append(Finding(t, None, ERROR, evidence))
            else:
                findings.append(Finding(t, float(len(counts)),
                                        SUSPECT if len(counts) > 1 else OK, evidence))
        return findings


@hookimpl
def register_detectors(register):
    register(Determinism)
