"""``harness export``: a scanned model's glitch tokens as block lists a serving stack takes.

Formats: ``text`` (one token a line, as ``harness evaluate --truth`` reads it back), ``json``
(ids, text, bytes, verdict, repeat probability and evidence), ``logit-bias`` (an
OpenAI-style ``logit_bias`` object of token ids to -100) and ``llamacpp`` (llama.cpp's
``--logit-bias TOKEN_ID-inf`` arguments).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from harness import store
from harness.errors import HarnessError
from harness.evaluate import final_verdict_tokens, find_model
from harness.verdicts import FINAL

FORMATS = ("text", "json", "logit-bias", "llamacpp")
LOGIT_BIAS = -100  # the lowest bias OpenAI's API accepts: the token is never sampled


@dataclass
class Export:
    """The tokens to block of one model and where they came from."""

    model: str
    verdict_run: int
    tokens: list[store.VerdictToken]
    evidence: dict[int, dict[str, dict]]  # token id -> detector -> its latest evidence
    facts: dict[int, dict]


def load_export(engine: Engine, model: str, include_suspect: bool = False) -> Export:
    """The glitch tokens (and, with ``include_suspect``, the suspect ones) of the stored
    model ``model`` by its latest final verdicts, with each flagging detector's evidence."""
    model_id, label = find_model(engine, model)
    with engine.connect() as conn:
        run_id, tokens = final_verdict_tokens(conn, model_id, label, model, include_suspect)
        ids = [t.token_id for t in tokens]
        evidence: dict[int, dict[str, dict]] = {t: {} for t in ids}
        for run in store.latest_done_runs(conn, model_id):
            if run.detector == FINAL:
                continue
            for t, text in store.latest_evidence(conn, [run.id], ids).items():
                evidence[t][run.detector] = json.loads(text or "{}")
        facts = {t: json.loads(f) for t, f in store.token_facts(conn, model_id, ids).items()}
    return Export(label, run_id, tokens, evidence, facts)


def _text_line(text: str) -> str:
    """A token as one line of a plain list: as it is when that reads back unchanged, else
    as a JSON string (leading or trailing space, a line break, a leading quote, digits or
    ``#``), which ``harness evaluate --truth`` reads back."""
    plain = text and text == text.strip() and text.isprintable() and \
        not text.startswith(('"', "#")) and not text.lstrip("-").isdigit()
    return text if plain else json.dumps(text, ensure_ascii=False)


def render(export: Export, fmt: str) -> str:
    """``export`` in the format ``fmt`` (one of ``FORMATS``), ending with a newline."""
    toks = export.tokens
    if fmt == "text":
        return "".join(_text_line(t.text) + "\n" for t in toks)
    if fmt == "logit-bias":
        return json.dumps({str(t.token_id): LOGIT_BIAS for t in toks}) + "\n"
    if fmt == "llamacpp":
        return " ".join(f"--logit-bias {t.token_id}-inf" for t in toks) + "\n"
    if fmt == "json":
        rows = []
        for t in toks:
            verdict_evidence = json.loads(t.evidence_json or "{}")
            rows.append({"id": t.token_id, "text": t.text, "raw_hex": t.raw.hex(),
                         "category": t.category, "verdict": t.verdict,
                         "repeat_prob": t.score,
                         "flagged_by": verdict_evidence.get("flagged_by", []),
                         "evidence": export.evidence.get(t.token_id, {}),
                         "structure": export.facts.get(t.token_id)})
        return json.dumps({"model": export.model, "verdict_run": export.verdict_run,
                           "tokens": rows}, ensure_ascii=False, indent=2) + "\n"
    raise HarnessError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
