"""``repeat-probe``: ask the model to repeat the token; a model that cannot has a glitch token.

White-box backends (``score``): the probability the model gives the token where its repeat
should start and over the next few greedy positions, maximised over the probe set's prompts
(Land & Bartolo's verification measure). Black-box backends (``generate`` only): the greedy
completion, compared with the token's text after normalising quotes, case and hyphenation
(Rumbelow & Watkins' pattern matching).

Work is cut where it does not change a verdict: prompts run cheapest first (fewest tokens per
probe after the shared prefix), and a token leaves the queue as soon as one prompt shows the
model repeating it. A glitch token never leaves early, so the long prompts have scouts: their
openings (16 of the 101 repeats, 2 of the 20 trials), read on the way through the prompt; a
token its scout leaves below ``scout_below`` (far under the threshold) stops there, and every
other token goes on from what the scout computed, at no extra cost.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np

from harness.backend import Capability, GenerateRequest, ProbeRequest, ProbeResult
from harness.detector import Detector, Finding, ScanContext
from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.probe_sets import PromptPlan, find_probe_set, plan_probe_set
from harness.verdicts import ERROR, GLITCH, OK

_QUOTES = re.compile(r"[\"'`«»“”‘’„‹›\s\-_.]")


def normalise(text: str) -> str:
    """Rumbelow & Watkins' matching: drop quotes, whitespace and hyphens; ignore case."""
    return _QUOTES.sub("", text).casefold()


def repeats(token_text: str, completion: str) -> bool:
    """Does ``completion`` start with the token, up to quotes, case and hyphenation?"""
    want = normalise(token_text)
    if not want:  # whitespace or punctuation only: compare as written
        return bool(token_text) and token_text.strip() in completion
    return normalise(completion).startswith(want)


class RepeatProbe(Detector):
    """Verifies tokens by asking the model to repeat them.

    score: the token's highest probability at the repeat position and the next
    ``steps - 1`` greedy positions, over the prompts run (``logprob`` mode), or 1/0 for
    repeated or not (``text`` mode). Verdict ``glitch`` below ``threshold`` (0.01, as Land
    & Bartolo) on every prompt, or when no prompt's completion repeats it; ``ok`` otherwise.
    """

    name = "repeat-probe"
    version = "2"
    description = "asks the model to repeat each token (probe sets verify-3, repeat-12, n-shot)"
    requires = frozenset({Capability.GENERATE})
    suspicious_when = "low"
    behavioural = True
    verifies = True
    default = True  # in every scan that names no detectors
    defaults = {"probes": "verify-3", "threshold": 0.01, "steps": 3, "mode": "auto",
                "order": "cost", "max_new_tokens": 12, "batch": 256, "scout_below": 1e-5}
    # the verdict of a token no prompt showed the model repeating
    unrepeated: ClassVar[str] = GLITCH
    # store each prompt's greedy completion and whether the first prompt re-encodes
    details: ClassVar[bool] = True

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.probe_set = find_probe_set(self.options["probes"])

    def prepare(self, ctx: ScanContext) -> dict:
        opts = dict(self.options)
        if opts["mode"] == "auto":
            opts["mode"] = ("logprob" if Capability.SCORE in ctx.backend.capabilities
                            else "text")
        if opts["mode"] not in ("logprob", "text"):
            raise HarnessError(f"{self.name} mode must be auto, logprob or text, "
                               f"not {opts['mode']!r}")
        if opts["mode"] == "logprob" and Capability.SCORE not in ctx.backend.capabilities:
            raise HarnessError(f"backend {ctx.backend.name!r} cannot score: use mode=text")
        if opts["order"] not in ("cost", "given"):
            raise HarnessError(f"{self.name} order must be cost or given")
        self.plans = plan_probe_set(self.probe_set, ctx.backend.encode, ctx.backend.bos_ids())
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
        scouts = [s for s in self.probe_set.scouts if s is not None]
        opts["templates_sha"] = hashlib.sha256(
            "\x00".join(self.probe_set.templates + tuple(scouts)).encode()).hexdigest()[:16]
        if opts["mode"] == "text" or not scouts:
            opts["scout_below"] = 0.0  # scouts read probabilities; text mode has none
        self.mode = opts["mode"]
        self.scout_below = float(opts["scout_below"])
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
                 repeated: Callable[[int, PromptPlan, Any], bool | None]
                 ) -> tuple[dict[int, str], dict[int, str]]:
        """Run the prompts in order on the tokens not yet decided; ``ask`` answers a prompt
        for some tokens (results with ``error``), ``repeated`` records an answer and says
        whether it shows the model repeating the token (True), or not (False), or not and
        no later prompt is to be asked (None). Returns the deciding prompt per decided
        token and the last error per token that had one."""
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
                elif (shown := repeated(t, plan, res)):
                    decided[t] = plan.label
                elif shown is False:
                    still.append(t)
            todo = still
        return decided, errors

    def _verdict(self, t: int, decided: dict[int, str], errors: dict[int, str],
                 evidence: dict) -> str:
        if t in decided:
            evidence["repeated_in"] = decided[t]
            return OK
        if t in errors:
            evidence["error"] = errors[t]
            return ERROR
        return self.unrepeated

    def _logprob_batch(self, ctx: ScanContext, batch: list[int]) -> list[Finding]:
        be = ctx.backend
        thr = float(self.options["threshold"])
        hopeless = float(self.options.get("hopeless_below", 0.0))
        steps = int(self.options["steps"])
        probs: dict[int, dict[str, float]] = {t: {} for t in batch}
        scout_p: dict[int, dict[str, float]] = {t: {} for t in batch}
        greedy: dict[int, dict[str, list[int]]] = {t: {} for t in batch}
        extra: dict[int, dict[str, Any]] = {t: {} for t in batch}

        def ask(plan: PromptPlan, todo: list[int]) -> list[ProbeResult]:
            checkpoint = plan.checkpoint if self.scout_below > 0 else None
            return be.probe([ProbeRequest(plan.tail_for(t), t, steps, plan.prefix, thr,
                                          checkpoint, self.scout_below) for t in todo])

        def repeated(t: int, plan: PromptPlan, res: ProbeResult) -> bool | None:
            if res.gave_up:  # its scout left it far below the threshold
                scout_p[t][plan.label] = res.max_prob
                return False
            probs[t][plan.label] = res.max_prob
            greedy[t][plan.label] = res.ids
            if res.max_prob < hopeless:
                return None
            return res.max_prob >= thr and self._settles(ctx, t, plan, res, extra[t])

        decided, errors = self._cascade(batch, ask, repeated)
        details = self._details(be, batch, greedy) if self.details else {}
        findings = []
        for t in batch:
            evidence: dict[str, Any] = {"p": {k: _round(v) for k, v in probs[t].items()}}
            if scout_p[t]:
                evidence["scout"] = {k: _round(v) for k, v in scout_p[t].items()}
            evidence.update(extra[t])
            evidence.update(details.get(t, {}))
            verdict = self._verdict(t, decided, errors, evidence)
            values = list(probs[t].values()) + list(scout_p[t].values())
            findings.append(Finding(t, max(values, default=math.nan), verdict, evidence))
        return findings

    def _settles(self, ctx: ScanContext, t: int, plan: PromptPlan, res: ProbeResult,
                 evidence: dict[str, Any]) -> bool:
        """Whether a prompt that put the token at or above the threshold shows the model
        repeating it (a subclass may ask more, and say why not in ``evidence``)."""
        return True

    def _details(self, be: Any, batch: list[int], greedy: dict[int, dict[str, list[int]]]
                 ) -> dict[int, dict[str, Any]]:
        """Each prompt's greedy completion as text, and whether the first prompt, decoded
        and encoded again, gives the same ids (a text API would see it that way)."""
        first = self.plans[0]
        n_bos = len(be.bos_ids())
        prompts = [first.full_ids(t)[n_bos:] for t in batch]
        again = be.encode_batch(be.decode_batch(prompts))
        keys = [(t, lab) for t in batch for lab in greedy[t]]
        texts = dict(zip(keys, be.decode_batch([greedy[t][lab] for t, lab in keys]),
                         strict=True)) if keys else {}
        return {t: {"completion": {lab: texts[(t, lab)] for lab in greedy[t]},
                    "reencodes": list(a) == p}
                for t, a, p in zip(batch, again, prompts, strict=True)}

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
        score = {OK: 1.0, ERROR: None, self.unrepeated: 0.0}
        findings = []
        for t in batch:
            evidence: dict = {"completion": completions[t]}
            verdict = self._verdict(t, decided, errors, evidence)
            findings.append(Finding(t, score[verdict], verdict, evidence))
        return findings


def _round(p: float) -> float:
    """Probabilities kept to 4 significant digits: tiny ones stay readable (3.2e-07)."""
    return float(f"{p:.4g}") if math.isfinite(p) else p


@hookimpl
def register_detectors(register):
    register(RepeatProbe)
