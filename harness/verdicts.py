"""The verdict vocabulary: what a detector, or the final verdict of a scan, says of a token."""

from __future__ import annotations

GLITCH = "glitch"
SUSPECT = "suspect"
OK = "ok"
ERROR = "error"
SKIPPED = "skipped"
VERDICTS = (GLITCH, SUSPECT, ERROR, OK, SKIPPED)  # most severe first
FLAGGED = (GLITCH, SUSPECT)  # what counts as a detector flagging a token
SEVERITY = {v: len(VERDICTS) - 1 - i for i, v in enumerate(VERDICTS)}  # glitch 4 … skipped 0
FINAL = "verdict"  # the pseudo-detector whose runs hold a scan's final verdicts
