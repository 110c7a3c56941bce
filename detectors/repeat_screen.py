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
"""

from __future__ import annotations

from detectors.repeat_probe import RepeatProbe
from harness.hookspecs import hookimpl
from harness.verdicts import SUSPECT


class RepeatScreen(RepeatProbe):
    """First stage of a whole-vocabulary scan: settles the tokens the model plainly repeats.

    score: the token's probability at the repeat position, maximised over the screen's
    prompts (asked in the given order, a token leaving once one of them settles it). Verdict
    ``ok`` at or above ``threshold``, else ``suspect`` (to be verified).
    """

    name = "repeat-screen"
    version = "2"
    description = "first stage: settles the tokens the model plainly repeats in short prompts"
    verifies = False
    screens = True
    # settling needs twice the verifier's 0.01: a short prompt can show a token repeated
    # that the long ones do not (seen on Gemma 3: 0.018 after six repeats, 0.009 after 101)
    default = True  # in every scan that names no detectors
    defaults = {**RepeatProbe.defaults, "probes": "screen", "threshold": 0.02, "steps": 1,
                "order": "given", "batch": 2048, "scout_below": 0.0, "hopeless_below": 1e-5}
    unrepeated = SUSPECT
    details = False


@hookimpl
def register_detectors(register):
    register(RepeatScreen)
