"""``repeat-screen``: the cheap first stage that looks at every token of the vocabulary.

Short prompts that keep the quoted repeat context (probe set ``screen``): a list of words each
written twice in quotes, ending with the token under test and the quote that closes it; the
token repeated six times; a copying device shown two trials. Each is one forward pass of a few
new tokens after a shared prefix and one probability read, asked only for the tokens the ones
before leave unsettled. A token the model repeats with probability at least ``threshold`` is
settled (``ok``); every other token is ``suspect`` and a scan sends it on to the verifier
(``repeat-probe``), whose verdict is the final word. A token a prompt leaves below
``hopeless_below`` is asked no more of them: it goes to the verifier either way (on a Gemma 3
sample, at least 217 of the 497 tokens the first two left, most of them never-trained rows,
skipped the last prompt).

A probability is not enough where the model's likeliest next token is another word: SmolLM2,
shown a list of copied words ending in `` solely``, gives the copy 0.11 but ``only`` more, and
verification finds `` solely`` a glitch token (0.0014 at most). With ``greedy_spells`` the
first prompt settles a token only where the model's greedy token is the token or begins
spelling it (a shorter token its text starts with, up to case, quotes, whitespace and hyphens);
otherwise the evidence's ``said`` keeps what the model said instead and the next prompt is
asked. Only the first: in a list of copied words the copy is the one sensible continuation,
while after six repeats the line may end and a copying device may complete a word fragment
(on SmolLM2 the rule on every prompt left 919 more ordinary tokens to verification; on the
first alone it sends 1,480 on to the next prompt, and 170 of them to verification).

Nor is the first prompt's probability worth as much as a later one's: a list of copied words
makes a copy likely, and a weak glitch token can read well there (SmolLM2's ``apeake``: 0.036
in the list, its likeliest answer, against 0.0070 at most in Land & Bartolo's prompts). The
first prompt settles a token only at or above ``first_threshold`` (0.05); below it the next
prompt is asked, at ``threshold``.
"""

from __future__ import annotations

from typing import Any

from detectors.repeat_probe import RepeatProbe, normalise
from harness.backend import ProbeResult
from harness.detector import ScanContext
from harness.hookspecs import hookimpl
from harness.probe_sets import PromptPlan
from harness.verdicts import SUSPECT


class RepeatScreen(RepeatProbe):
    """First stage of a whole-vocabulary scan: settles the tokens the model plainly repeats.

    score: the token's probability at the repeat position, maximised over the screen's
    prompts (asked in the given order, a token leaving once one of them settles it). Verdict
    ``ok`` at or above ``threshold`` (in the first prompt at or above ``first_threshold``, and
    only where the model's greedy token begins spelling the token: ``greedy_spells``), else
    ``suspect`` (to be verified).
    """

    name = "repeat-screen"
    version = "4"
    description = "first stage: settles the tokens the model plainly repeats in short prompts"
    verifies = False
    screens = True
    # settling needs twice the verifier's 0.01: a short prompt can show a token repeated
    # that the long ones do not (seen on Gemma 3: 0.018 after six repeats, 0.009 after 101)
    default = True  # in every scan that names no detectors
    defaults = {**RepeatProbe.defaults, "probes": "screen", "threshold": 0.02, "steps": 1,
                "order": "given", "batch": 2048, "scout_below": 0.0, "hopeless_below": 1e-5,
                "first_threshold": 0.05, "greedy_spells": True}
    unrepeated = SUSPECT
    details = False

    def _settles(self, ctx: ScanContext, t: int, plan: PromptPlan, res: ProbeResult,
                 evidence: dict[str, Any]) -> bool:
        if plan is not self.plans[0]:
            return True
        if res.max_prob < float(self.options["first_threshold"]):
            return False
        if not self.options["greedy_spells"] or not res.ids or res.ids[0] == t:
            return True
        raw = ctx.vocab.raw
        if begins_spelling(raw[t], raw[res.ids[0]]):
            return True
        evidence.setdefault("said", {})[plan.label] = ctx.vocab.text[res.ids[0]]
        return False


def begins_spelling(token: bytes, said: bytes) -> bool:
    """Whether ``said`` (the model's next token) is how the copy of ``token`` may start: its
    bytes open the token's, or its text does up to case, quotes, whitespace and hyphens."""
    if not said:
        return False
    if token.startswith(said):
        return True
    head = normalise(said.decode("utf-8", "replace"))
    return bool(head) and normalise(token.decode("utf-8", "replace")).startswith(head)


@hookimpl
def register_detectors(register):
    register(RepeatScreen)
