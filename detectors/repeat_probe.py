"""``repeat-probe``: ask the model to repeat the token; a model that cannot has a glitch token.

White-box backends (``score``): the probability the model gives the token where its repeat
should start and over the next few greedy positions, maximised over the probe set's prompts
(Land & Bartolo's verification measure). Black-box backends (``generate`` only): the greedy
completion, compared with the token's text after normalising quotes, case and hyphenation
(seed 000's pattern matching).

Work is cut where it cannot change a verdict: prompts run cheapest first (fewest tokens per
probe after the shared prefix), and a token leaves the queue as soon as one prompt shows the
model repeating it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from harness.backend import Capability, GenerateRequest, ProbeRequest
from harness.detector import ERROR, GLITCH, OK, Detector, Finding, ScanContext
from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.probe import PromptPlan, find_probe_set, plan_prompt

_QUOTES = re.compile(r"[\"'`«»“”‘’„‹›\s\-_.]")


def normalise(text: str) -> str:
    """Seed 000's matching: drop quotes, whitespace and hyphens; ignore case."""
    return _QUOTES.sub("", text).casefold()


def repeats(token_text: str, completion: str) -> bool:
    """Does ``completion`` start with the token, up to quotes, case and hyphenation?"""
    want = normalise(token_text)
    if not want:  # whitespace or punctuation only: compare as written
        return bool(token_text) and token_text.strip() in completion
    return normalise(completion).startswith(want)


class RepeatProbe(Detector):
    """Verifies candidates by asking the model to repeat them.

    score: the token's highest probability at the repeat position and the next
    ``steps - 1`` greedy positions, over the prompts run (``logprob`` mode), or 1/0 for
    repeated or not (``text`` mode). Verdict ``glitch`` below ``threshold`` (0.01, as Land
    & Bartolo) on every prompt, or when no prompt's completion repeats it; ``ok`` otherwise.
    """

    name = "repeat-probe"
    version = "1"
    description = "asks the model to repeat each token (probe sets verify-3, repeat-12, n-shot)"
    requires = frozenset({Capability.GENERATE})
    suspicious_when = "low"
    behavioural = True
    verifies = True
    defaults = {"probes": "verify-3", "threshold": 0.01, "steps": 3, "mode": "auto",
                "order": "cost", "max_new_tokens": 12, "batch": 256}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.probe_set = find_probe_set(self.options["probes"])

    def prepare(self, ctx: ScanContext) -> dict:
        opts = dict(self.options)
        if opts["mode"] == "auto":
            opts["mode"] = ("logprob" if Capability.SCORE in ctx.backend.capabilities
                            else "text")
        if opts["mode"] not in ("logprob", "text"):
            raise HarnessError(f"repeat-probe mode must be auto, logprob or text, "
                               f"not {opts['mode']!r}")
        if opts["mode"] == "logprob" and Capability.SCORE not in ctx.backend.capabilities:
            raise HarnessError(f"backend {ctx.backend.name!r} cannot score: use mode=text")
        if opts["order"] not in ("cost", "given"):
            raise HarnessError("repeat-probe order must be cost or given")
        bos = ctx.backend.bos_ids()
        plans = [plan_prompt(t, lab, ctx.backend.encode)
                 for t, lab in zip(self.probe_set.templates, self.probe_set.labels, strict=True)]
        self.plans = [PromptPlan(p.label, tuple(bos) + p.prefix, p.tail, p.slots, p.text)
                      for p in plans]
        limit = ctx.backend.context_length()
        if limit is not None:
            fits = [p for p in self.plans
                    if len(p.prefix) + len(p.tail) + int(opts["steps"]) <= limit]
            if not fits:
                raise HarnessError(f"every prompt of probe set {opts['probes']!r} is longer "
                                   f"than the model's context ({limit} tokens)")
            opts["too_long"] = [p.label for p in self.plans if p not in fits]
            self.plans = fits
        if opts["order"] == "cost":  # cheapest first: fewest tokens per probe after the prefix
            self.plans.sort(key=lambda p: len(p.tail))
        opts["prompt_order"] = [p.label for p in self.plans]
        opts["templates_sha"] = hashlib.sha256(
            "\x00".join(self.probe_set.templates).encode()).hexdigest()[:16]
        self.mode = opts["mode"]
        return opts

    def run(self, ctx: ScanContext, token_ids: np.ndarray) -> Iterator[list[Finding]]:
        size = max(1, int(self.options["batch"]))
        for start in range(0, len(token_ids), size):
            batch = [int(t) for t in token_ids[start: start + size]]
            if self.mode == "logprob":
                yield self._logprob_batch(ctx, batch)
            else:
                yield self._text_batch(ctx, batch)

    def _cascade(self, batch: list[int], ask: Callable[[PromptPlan, list[int]], list],
                 repeated: Callable[[int, PromptPlan, Any], bool]
                 ) -> tuple[dict[int, str], dict[int, str]]:
        """Run the prompts in order on the tokens not yet decided; ``ask`` answers a prompt
        for some tokens (results with ``error``), ``repeated`` records an answer and says
        whether it shows the model repeating the token. Returns the deciding prompt per
        decided token and the last error per token that had one."""
        decided: dict[int, str] = {}
        errors: dict[int, str] = {}
        todo = list(batch)
        for plan in self.plans:
            if not todo:
                break
            still = []
            for t, res in zip(todo, ask(plan, todo), strict=True):
                if res.error:
                    errors[t] = res.error
                    still.append(t)
                elif repeated(t, plan, res):
                    decided[t] = plan.label
                else:
                    still.append(t)
            todo = still
        return decided, errors

    @staticmethod
    def _verdict(t: int, decided: dict[int, str], errors: dict[int, str],
                 evidence: dict) -> str:
        if t in decided:
            evidence["repeated_in"] = decided[t]
            return OK
        if t in errors:
            evidence["error"] = errors[t]
            return ERROR
        return GLITCH

    def _logprob_batch(self, ctx: ScanContext, batch: list[int]) -> list[Finding]:
        be = ctx.backend
        thr = float(self.options["threshold"])
        steps = int(self.options["steps"])
        probs: dict[int, dict[str, float]] = {t: {} for t in batch}
        greedy: dict[int, dict[str, list[int]]] = {t: {} for t in batch}

        def ask(plan: PromptPlan, todo: list[int]) -> list:
            return be.probe([ProbeRequest(plan.tail_for(t), t, steps, plan.prefix, thr)
                             for t in todo])

        def repeated(t: int, plan: PromptPlan, res: Any) -> bool:
            probs[t][plan.label] = res.max_prob
            greedy[t][plan.label] = res.ids
            return res.max_prob >= thr

        decided, errors = self._cascade(batch, ask, repeated)
        first = self.plans[0]
        n_bos = len(be.bos_ids())
        prompts = [first.full_ids(t)[n_bos:] for t in batch]
        again = be.encode_batch(be.decode_batch(prompts))
        reencodes = {t: list(a) == p for t, a, p in zip(batch, again, prompts, strict=True)}
        keys = [(t, lab) for t in batch for lab in greedy[t]]
        texts = dict(zip(keys, be.decode_batch([greedy[t][lab] for t, lab in keys]),
                         strict=True)) if keys else {}
        findings = []
        for t in batch:
            evidence = {"p": {k: round(v, 6) for k, v in probs[t].items()},
                        "completion": {lab: texts[(t, lab)] for lab in greedy[t]},
                        "reencodes": reencodes[t]}
            verdict = self._verdict(t, decided, errors, evidence)
            findings.append(Finding(t, max(probs[t].values(), default=math.nan), verdict,
                                    evidence))
        return findings

    def _text_batch(self, ctx: ScanContext, batch: list[int]) -> list[Finding]:
        be = ctx.backend
        texts = {t: ctx.vocab.text[t] for t in batch}
        completions: dict[int, dict[str, str]] = {t: {} for t in batch}
        bos = be.bos_ids()
        max_new = int(self.options["max_new_tokens"])

        def ask(plan: PromptPlan, todo: list[int]) -> list:
            prompts = be.encode_batch([plan.token_text(texts[t]) for t in todo])
            return be.generate([GenerateRequest(bos + p, max_new) for p in prompts])

        def repeated(t: int, plan: PromptPlan, res: Any) -> bool:
            completions[t][plan.label] = res.text
            return repeats(texts[t], res.text)

        decided, errors = self._cascade(batch, ask, repeated)
        score = {OK: 1.0, ERROR: None, GLITCH: 0.0}
        findings = []
        for t in batch:
            evidence: dict = {"completion": completions[t]}
            verdict = self._verdict(t, decided, errors, evidence)
            findings.append(Finding(t, score[verdict], verdict, evidence))
        return findings


@hookimpl
def register_detectors(register):
    register(RepeatProbe)
