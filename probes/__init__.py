"""Built-in probe sets: the prompt templates behavioural detectors use."""

from __future__ import annotations

from harness.hookspecs import hookimpl
from harness.probe import ProbeSet

# Seed 000's twelve paraphrases of "Please repeat the string '<token>' back to me."
REPEAT_12 = ProbeSet(
    name="repeat-12",
    description="twelve paraphrases of \"Please repeat the string '<token>' back to me.\" "
                "(Rumbelow & Watkins, SolidGoldMagikarp)",
    templates=(
        "Please repeat the string '{token}' back to me.\n\n\"{repeat}",
        "Please can you repeat back the string '{token}' to me?\n\n\"{repeat}",
        "Please repeat back the string '{token}' to me.\n\n\"{repeat}",
        "Can you repeat back the string '{token}' to me please?\n\n\"{repeat}",
        "Could you please repeat back the string '{token}' to me?\n\n\"{repeat}",
        "Can you please repeat back the string '{token}' to me?\n\n\"{repeat}",
        "Please repeat the string \"{token}\" back to me.\n\n\"{repeat}",
        "Please can you repeat back the string \"{token}\" to me?\n\n\"{repeat}",
        "Please repeat back the string \"{token}\" to me.\n\n\"{repeat}",
        "Can you repeat back the string \"{token}\" to me please?\n\n\"{repeat}",
        "Could you please repeat back the string \"{token}\" to me?\n\n\"{repeat}",
        "Please repeat the string '{token}' back to me immediately!\n\n\"{repeat}",
    ),
)


@hookimpl
def register_probes(register):
    register(REPEAT_12)
