"""Score a model's stored final verdicts against a list of known glitch tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Connection, Engine

from harness import store
from harness.errors import HarnessError
from harness.plugins import Registry
from harness.verdicts import GLITCH, SUSPECT


@dataclass
class Evaluation:
    """Precision, recall and F1 of the final verdicts; ``missed`` are the truth tokens the
    scan did not call positive, as (token id, text, verdict, repeat probability)."""

    model: str
    run_id: int
    positive: tuple[str, ...]
    n_truth: int
    not_in_vocab: list[str]
    true_pos: int
    false_pos: int
    false_neg: int
    missed: list[tuple[int, str, str, float | None]] = field(default_factory=list)

    @property
    def precision(self) -> float:
        called = self.true_pos + self.false_pos
        return self.true_pos / called if called else 0.0

    @property
    def recall(self) -> float:
        real = self.true_pos + self.false_neg
        return self.true_pos / real if real else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict:
        return {"model": self.model, "run_id": self.run_id, "positive": list(self.positive),
                "truth": self.n_truth, "not_in_vocab": self.not_in_vocab,
                "true_positives": self.true_pos, "false_positives": self.false_pos,
                "false_negatives": self.false_neg, "precision": self.precision,
                "recall": self.recall, "f1": self.f1,
                "missed": [{"token_id": t, "text": s, "verdict": v, "repeat_prob": p}
                           for t, s, v, p in self.missed]}


def load_truth(spec: str, reg: Registry) -> list[tuple[int | None, str | None]]:
    """``spec`` is a probe set with a known-token list, or a file of token ids or strings,
    one a line (a line in double quotes is read as a JSON string, for leading spaces)."""
    if spec in reg.probes:
        known = reg.probes[spec].probe_set.known_tokens
        if not known:
            raise HarnessError(f"probe set {spec!r} has no list of known tokens")
        return [(i, s) for i, s in known]
    path = Path(spec)
    if not path.is_file():
        with_lists = sorted(n for n, p in reg.probes.items() if p.probe_set.known_tokens)
        raise HarnessError(f"--truth {spec!r} is neither a file nor a probe set with known "
                           f"tokens ({', '.join(with_lists) or 'none registered'})")
    items: list[tuple[int | None, str | None]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.strip().lstrip("-").isdigit():
            items.append((int(line.strip()), None))
        elif line.startswith('"'):
            try:
                items.append((None, json.loads(line)))
            except json.JSONDecodeError:
                raise HarnessError(f"{path}:{n}: not a valid JSON string: {line!r}") from None
        else:
            items.append((None, line))
    if not items:
        raise HarnessError(f"{path} lists no tokens")
    return items


def find_model(engine: Engine, model: str) -> tuple[int, str]:
    """The stored model called ``model`` (alias, reference as `harness scan` takes it, or
    fingerprint) with the latest scan."""
    from harness.plugins import registry
    from harness.refs import resolve

    def lookup(name: str) -> tuple[int, str] | None:
        with engine.connect() as conn:
            return store.find_model(conn, name)

    row = lookup(model)
    if row is None:
        try:
            row = lookup(resolve(model, registry()).ref)
        except HarnessError:
            row = None
    if row is None:
        raise HarnessError(f"no stored scan of {model!r} in this database: "
                           f"run `harness scan {model}` first")
    return row


def final_verdict_tokens(conn: Connection, model_id: int, label: str, model: str,
                         include_suspect: bool = False
                         ) -> tuple[int, list[store.VerdictToken]]:
    """The latest final-verdict run of a stored model and its ``glitch`` tokens (and, with
    ``include_suspect``, its ``suspect`` ones); one line where it has no final verdicts."""
    run_id = store.latest_verdict_run(conn, model_id)
    if run_id is None:
        raise HarnessError(f"{label!r} has no final verdicts yet: run `harness scan "
                           f"{model}` with a behavioural detector (the default does)")
    wanted = (GLITCH, SUSPECT) if include_suspect else (GLITCH,)
    return run_id, store.tokens_with_final_verdict(conn, model_id, run_id, wanted)


def evaluate(engine: Engine, model: str, truth: list[tuple[int | None, str | None]],
             positive: tuple[str, ...] = (GLITCH,)) -> Evaluation:
    """Score ``model``'s latest final verdicts (``positive`` ones count as called glitchy)
    against the ``truth`` tokens."""
    model_id, name = find_model(engine, model)
    with engine.connect() as conn:
        run_id = store.latest_verdict_run(conn, model_id)
        if run_id is None:
            raise HarnessError(f"{name!r} has no final verdicts yet: run `harness scan "
                               f"{model}` with a behavioural detector (the default does)")
        rows = store.final_verdict_rows(conn, model_id, run_id)
    by_id = {r[0]: r for r in rows}
    by_text: dict[str, int] = {}
    for r in rows:
        by_text.setdefault(r[1], r[0])
    wanted: set[int] = set()
    absent: list[str] = []
    for tid, s in truth:
        if tid is not None and tid in by_id and (s is None or by_id[tid][1] == s):
            wanted.add(tid)
        elif s is not None and s in by_text:
            wanted.add(by_text[s])
        else:
            absent.append(repr(s) if s is not None else str(tid))
    called = {r[0] for r in rows if r[2] in positive}
    missed = sorted((by_id[t] for t in wanted - called), key=lambda r: r[0])
    return Evaluation(model=name, run_id=int(run_id), positive=positive, n_truth=len(truth),
                      not_in_vocab=absent, true_pos=len(wanted & called),
                      false_pos=len(called - wanted), false_neg=len(wanted - called),
                      missed=[(r[0], r[1], r[2], r[3]) for r in missed])
