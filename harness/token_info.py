"""``harness show``: everything stored about one token of a scanned model, across
detectors and runs, and its tokenizer-structure facts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from harness import store, token_structure
from harness.errors import HarnessError
from harness.evaluate import find_model
from harness.vocab import token_repr


@dataclass
class TokenInfo:
    """One token: its stored row, final verdict, every finding, and structure facts (stored
    at the scan, or computed now from the vocabulary and tokenizer, without neighbours)."""

    model: str
    token_id: int
    text: str
    raw: bytes
    category: str
    attr: str | None
    final: str | None
    repeat_prob: float | None
    findings: list[store.TokenFinding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    facts_stored: bool = False
    neighbour_verdicts: dict[int, tuple[str, str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Everything, as one JSON object (``--json``)."""
        facts = dict(self.facts)
        if "neighbours" in facts:
            facts["neighbours"] = [
                {"id": n, "cosine": c, "text": self.neighbour_verdicts.get(n, ("", ""))[0],
                 "verdict": self.neighbour_verdicts.get(n, ("", ""))[1] or None}
                for n, c in facts["neighbours"]]
        return {"model": self.model, "id": self.token_id, "text": self.text,
                "raw_hex": self.raw.hex(), "category": self.category, "attr": self.attr,
                "verdict": self.final, "repeat_prob": self.repeat_prob,
                "findings": [{"run_id": f.run_id, "detector": f.detector, "status": f.status,
                              "finished_utc": f.finished_utc.isoformat(sep=" ")
                              if f.finished_utc else None,
                              "score": f.score, "verdict": f.verdict,
                              "evidence": json.loads(f.evidence_json or "{}")}
                             for f in self.findings],
                "structure": facts, "structure_stored": self.facts_stored}


def resolve_token(engine: Engine, model_id: int, spec: str) -> int:
    """The token ``spec`` names: an id, or a token text (``" the"``: quote it to keep
    spaces; a JSON string is read as one). Ambiguous or unknown text is a one-line error."""
    with engine.connect() as conn:
        size = len(store.token_categories(conn, model_id))
        if spec.strip().isdigit():
            tid = int(spec)
            if not 0 <= tid < size:
                raise HarnessError(f"token id {tid} is outside 0..{size - 1}")
            return tid
        text = spec
        if len(spec) >= 2 and spec.startswith('"') and spec.endswith('"'):
            try:
                text = json.loads(spec)
            except json.JSONDecodeError:
                text = spec
        ids = store.token_ids_by_text(conn, model_id, text)
    if not ids:
        raise HarnessError(f"no token with text {text!r} (give a token id, or the exact text; "
                           "a JSON string in double quotes keeps leading spaces)")
    if len(ids) > 1:
        raise HarnessError(f"{len(ids)} tokens have text {text!r}: ids "
                           f"{', '.join(map(str, ids[:10]))}; give one id")
    return ids[0]


def load_token_info(engine: Engine, model: str, spec: str,
                    tokenizer: Any | None = None) -> TokenInfo:
    """Everything stored about token ``spec`` of ``model``; structure facts not stored at the
    scan are computed from the stored vocabulary (and, when ``tokenizer`` is given, what the
    token's text encodes to on its own)."""
    model_id, label = find_model(engine, model)
    tid = resolve_token(engine, model_id, spec)
    with engine.connect() as conn:
        row = store.token_row(conn, model_id, tid)
        assert row is not None
        raw, text, category, attr = row
        info = TokenInfo(label, tid, text, raw, category, attr, None, None,
                         findings=store.findings_of_token(conn, model_id, tid))
        run_id = store.latest_verdict_run(conn, model_id)
        final = next((f for f in info.findings if f.run_id == run_id), None)
        if final is not None:
            info.final, info.repeat_prob = final.verdict, final.score
        stored = store.token_facts(conn, model_id, [tid])
        if tid in stored:
            info.facts, info.facts_stored = json.loads(stored[tid]), True
        else:
            pairs = store.token_bytes(conn, model_id)
            raws = [r for r, _ in pairs]
            texts = [t for _, t in pairs]
            encode = tokenizer.encode_batch if tokenizer is not None else None
            special = np.zeros(len(raws), dtype=bool)
            special[tid] = category == "special"
            info.facts = token_structure.facts(raws, texts, [tid], encode,
                                               special=special)[tid]
        near = [n for n, _ in info.facts.get("neighbours", [])]
        if near:
            every = store.token_texts(conn, model_id)
            texts_of = {n: every[n][1] for n in near if n < len(every)}
            verdicts: dict[int, str] = {}
            if run_id is not None:
                _, v = store.run_arrays(conn, run_id, len(every))
                verdicts = {n: str(v[n]) for n in near if n < len(every)}
            info.neighbour_verdicts = {n: (texts_of.get(n, ""), verdicts.get(n, ""))
                                       for n in near}
    return info


def describe_facts(info: TokenInfo) -> list[str]:
    """The structure facts as lines of text."""
    f = info.facts
    lines = []
    inside = f.get("contained_in", {})
    n = inside.get("count", 0)
    examples = ", ".join(f"{token_repr(x)} ({i})" for i, x in inside.get("examples", []))
    lines.append(f"inside {n:,} longer token{'s' if n != 1 else ''}"
                 + (f", e.g. {examples}" if examples else ""))
    if "alone" in f:
        if f.get("reachable_alone"):
            lines.append("its text alone tokenizes to this token")
        else:
            lines.append(f"its text alone tokenizes to {f['alone']}, not to this token"
                         + ("; it is reached only inside longer tokens"
                            if f.get("only_inside_longer") else ""))
    if "neighbours" in f:
        shown = []
        for nid, cos in f["neighbours"]:
            text, verdict = info.neighbour_verdicts.get(nid, ("", ""))
            shown.append(f"{token_repr(text)} ({nid}, {verdict or '-'}, cos {cos:.3f})")
        lines.append("nearest in input-embedding space: " + "; ".join(shown))
    elif info.facts_stored:
        lines.append("no embedding neighbours (the backend has no embeddings)")
    else:
        lines.append("embedding neighbours are computed at scan time for glitch and suspect "
                     "tokens only")
    return lines
