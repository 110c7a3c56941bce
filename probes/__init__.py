"""Built-in probe sets: the prompt templates behavioural detectors use."""

from __future__ import annotations

from harness.hookspecs import hookimpl
from harness.probe_sets import ProbeSet
from probes.known_tokens import GPT2_GLITCH_141

# Rumbelow & Watkins' twelve paraphrases of "Please repeat the string '<token>' back to me."
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

# The "Under-trained and unused tokens" article's n-shot copy prompt: twenty "Input: X,
# Output: X" examples, then the question.
N_SHOT = ProbeSet(
    name="n-shot",
    description="the n-shot copy prompt of the article 'Under-trained and unused tokens': "
                "'Repeats its input exactly' and twenty 'Input: X, Output: X' examples",
    templates=("Repeats its input exactly: "
               + ", ".join(["Input: {token}, Output: {token}"] * 20)
               + ", Input: {token}, Output: {repeat}",),
    labels=("n-shot-20",),
)

# Land & Bartolo's verification ("Fishing for Magikarp", 2024), word for word as their
# published code builds it (magikarp/fishing.py): an assistant asked what the token means, the
# token repeated 101 times, and a copying device shown twenty identical trials. Their measure:
# the token's highest probability over the first three greedily generated positions, maximised
# over the prompts; a token below 0.01 on all three is verified as a glitch token.
_ASSISTANT = ("This helpful assistant explains what a phrase means, replying with identical "
              "responses to identical questions for reliability.\nUser: What does 'edslfkj' "
              "mean?\nAssistant: 'edslfkj' has no specific meaning I am aware of.\nUser: what "
              "does '{token}' mean?\nAssistant: '{repeat}")


def _repeats(copies: int) -> str:
    return ("Below is the output, as you can see it's just giving the same phrase repeated "
            "indefinitely:\n" + "{token}" * copies + "{repeat}")


def _device(trials: int) -> str:
    return ("This device repeats its input exactly, as shown in these 100 identical trials."
            + "\nInput: «{token}»\nOutput: «{token}»" * trials
            + "\nInput: «{token}»\nOutput: «{repeat}")


VERIFY_3 = ProbeSet(
    name="verify-3",
    description="Land & Bartolo's three verification prompts, as published: an assistant asked "
                "what the token means, the token repeated 101 times, a copying device",
    templates=(_ASSISTANT, _repeats(101), _device(20)),
    labels=("assistant-explain", "repeats", "input-output"),
    # the long prompts' openings: a token they leave far below the threshold skips the rest
    scouts=(None, _repeats(16), _device(2)),
)

# The first stage of a whole-vocabulary scan: short prompts that keep the quoted repeat
# context, each asked only for what the ones before leave unsettled. In the pair list the
# token under test is two tokens (itself and the closing quote with the comma) after a shared
# prefix, so a forward pass costs two positions a token. The last is the opening of
# verify-3's copying device (its scout): it settles about half the ordinary tokens the first
# two leave (SmolLM2 52 %, Gemma 3 62 %), which would otherwise run the long prompts.
_PAIRS = ("cat", " the", "ing", "))", "Class", "42", " dec", "ér", "_id", " Paris")
SCREEN = ProbeSet(
    name="screen",
    description="the whole-vocabulary first stage: a list of words each written twice in "
                "quotes, the token repeated six times, a copying device shown two trials",
    templates=(
        "Each item is a word and its exact copy:\n["
        + ",".join(f'["{w}","{w}"]' for w in _PAIRS) + ',["{token}","{repeat}',
        _repeats(6),
        _device(2),
    ),
    labels=("pair-list", "repeats-6", "input-output-2"),
)


@hookimpl
def register_probes(register):
    register(REPEAT_12)
    register(N_SHOT)
    register(VERIFY_3)
    register(SCREEN)
