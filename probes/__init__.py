"""Built-in probe sets: the prompt templates behavioural detectors use."""

from __future__ import annotations

from harness.hookspecs import hookimpl
from harness.probe import ProbeSet
from probes.known_tokens import GPT2_GLITCH_141

# Seed 000's twelve paraphrases of "Please repeat the string '<token>' back to me."
REPEAT_12 = ProbeSet(
    name="repeat-12",
    description="twelve paraphrases of \"Please repeat the string '<token>' back to me.\" "
                "(Rumbelow & Watkins, SolidGoldMagikarp); known: their 141 GPT-2/GPT-J tokens",
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
    known_tokens=GPT2_GLITCH_141,
)

# Seed 001's n-shot copy prompt: twenty "Input: X, Output: X" examples, then the question.
N_SHOT = ProbeSet(
    name="n-shot",
    description="seed 001's n-shot copy prompt: 'Repeats its input exactly' and twenty "
                "'Input: X, Output: X' examples",
    templates=("Repeats its input exactly: "
               + ", ".join(["Input: {token}, Output: {token}"] * 20)
               + ", Input: {token}, Output: {repeat}",),
    labels=("n-shot-20",),
)

# Three prompts in the style of Land & Bartolo's verification ("Fishing for Magikarp", 2024):
# a copying device shown many identical trials, an assistant asked what the token means, and
# the token repeated over and over. Their measure: the token's highest probability over the
# first few greedily generated positions, maximised over the prompts.
VERIFY_3 = ProbeSet(
    name="verify-3",
    description="Land & Bartolo-style verification: a copying device, an assistant asked "
                "what the token means, and the token repeated many times",
    templates=(
        "This helpful assistant explains what a phrase means, and always gives identical "
        "answers to identical questions.\nUser: What does 'zqvxlj' mean?\nAssistant: "
        "'zqvxlj' has no meaning that I know of.\nUser: What does '{token}' mean?\n"
        "Assistant: '{repeat}",
        "Below, the same phrase is simply repeated over and over again:\n"
        + "{token}" * 101 + "{repeat}",
        "This device repeats its input exactly, as these twenty identical trials show."
        + "\nInput: «{token}»\nOutput: «{token}»" * 20
        + "\nInput: «{token}»\nOutput: «{repeat}",
    ),
    labels=("assistant-explain", "repeats", "input-output"),
)


@hookimpl
def register_probes(register):
    register(REPEAT_12)
    register(N_SHOT)
    register(VERIFY_3)
