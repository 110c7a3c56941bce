"""What the report shows about a model, read from the database through ``harness.store``:
its latest run of each detector, its final verdicts and its glitch-token table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection, Engine

from harness import store, token_structure
from harness.errors import HarnessError
from harness.evaluate import find_model
from harness.store import StoredModel
from harness.verdicts import FINAL, FLAGGED, GLITCH, SUSPECT
from harness.vocab import token_repr

TABLE_CAP = 200  # rows of the glitch-token table per model


@dataclass
class DetectorRun:
    """The latest finished run of one detector on one model, with every finding's score."""

    name: str
    run_id: int
    suspicious_when: str
    options: dict[str, Any]
    finished_utc: datetime | None
    wall_s: float | None
    token_ids: np.ndarray
    scores: np.ndarray  # float, nan where the run stored no score
    verdicts: np.ndarray  # object (str)

    def counts(self) -> dict[str, int]:
        """How many findings of this run carry each verdict."""
        names, n = np.unique(self.verdicts.astype(str), return_counts=True)
        return {str(k): int(v) for k, v in zip(names, n, strict=True)}

    def score_of(self, size: int) -> np.ndarray:
        """The scores spread over token ids ``0..size-1`` (nan where the run has none)."""
        out = np.full(size, np.nan)
        out[self.token_ids] = self.scores
        return out

    def verdict_of(self, size: int) -> np.ndarray:
        """The verdicts spread over token ids ``0..size-1`` ("" where the run has none)."""
        out = np.full(size, "", dtype=object)
        out[self.token_ids] = self.verdicts
        return out


@dataclass
class TokenRow:
    """One row of a model's glitch-token table."""

    token_id: int
    text: str
    raw: bytes
    category: str
    verdict: str
    repeat_prob: float | None
    flagged_by: list[str]
    evidence: dict[str, Any]
    # tokenizer-structure facts (harness.token_structure); neighbours as [id, text,
    # final verdict, cosine]
    structure: dict[str, Any] | None = None
    # the most probable stored elicitation of the token alone (harness elicit, elicit)
    elicitation: store.StoredElicitation | None = None


@dataclass
class ModelReport:
    """Everything the report shows about one stored model."""

    model: StoredModel
    label: str
    runs: dict[str, DetectorRun]  # detector name -> latest run, the verdict run excluded
    static: list[str]  # names in ``runs`` of the detectors that read the weights only
    final: DetectorRun | None  # the latest run of the ``verdict`` pseudo-detector
    verifier: str | None  # the detector whose run gave the final verdicts' evidence
    rows: list[TokenRow] = field(default_factory=list)
    rows_kind: str = GLITCH  # glitch | suspect | flagged (no final verdicts) | none
    rows_total: int = 0
    glitch_ids: list[int] = field(default_factory=list)
    glitch_raw: list[bytes] = field(default_factory=list)
    glitch_shown: list[str] = field(default_factory=list)  # token_repr of each
    clusterings: list[Any] = field(default_factory=list)  # harness.clusters.ClusteringSummary

    @property
    def model_id(self) -> int:
        """The stored model's id."""
        return self.model.id

    @property
    def last_run_utc(self) -> datetime | None:
        """When the latest of the shown runs finished."""
        times = [r.finished_utc for r in [*self.runs.values(), self.final]
                 if r is not None and r.finished_utc is not None]
        return max(times) if times else None

    def final_counts(self) -> dict[str, int]:
        """Final verdict counts (empty without a verdict run)."""
        return self.final.counts() if self.final is not None else {}


def _as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _detector_kinds(names: list[str]) -> tuple[list[str], list[str]]:
    """(static detectors, verifying detectors) among ``names``, by their registered classes
    (a detector whose plugin is gone is neither)."""
    from harness.plugins import registry

    known = registry().detectors
    static = [n for n in names if n in known and not known[n].cls.behavioural]
    verifying = [n for n in names if n in known and known[n].cls.verifies]
    return static, verifying


def _load_run(conn: Connection, run: store.StoredRun) -> DetectorRun:
    ids, scores, verdicts = store.run_findings(conn, run.id)
    try:
        options = json.loads(run.options_json or "{}")
    except json.JSONDecodeError:
        options = {}
    return DetectorRun(run.detector, run.id, run.suspicious_when, options,
                       _as_datetime(run.finished_utc), run.wall_s, ids, scores, verdicts)


def load_model(engine: Engine, model: str, cap: int = TABLE_CAP) -> ModelReport:
    """Read one model's latest runs, final verdicts and glitch tokens from the database.

    ``model`` is resolved as ``harness evaluate`` resolves it (alias, reference, fingerprint).
    A model that is not stored, or has no finished run, raises ``HarnessError`` naming the
    ``harness scan`` command that fills the database.
    """
    model_id, name = find_model(engine, model)
    with engine.connect() as conn:
        m = store.model_by_id(conn, model_id)
        latest = store.latest_done_runs(conn, model_id)
        if not latest:
            raise HarnessError(f"{name!r} has no finished detector run in this database: "
                               f"run `harness scan {model}` first")
        runs = {r.detector: _load_run(conn, r) for r in latest}
    final = runs.pop(FINAL, None)
    static, verifying = _detector_kinds(list(runs))
    report = ModelReport(
        model=replace(m, created_utc=_as_datetime(m.created_utc)), label=name, runs=runs,
        static=static, final=final, verifier=None)
    _load_tokens(engine, report, verifying, cap)
    from harness.report.clusters import load_clusterings

    report.clusterings = load_clusterings(engine, model_id)
    return report


def _load_tokens(engine: Engine, rep: ModelReport, verifying: list[str], cap: int) -> None:
    """Fill the glitch-token table (or the suspect / flagged ones) and the glitch sets."""
    evidence_runs: list[int] = []
    if rep.final is not None:
        used = rep.final.options.get("runs", {})  # the runs this verdict was drawn from
        for n in verifying:
            if n in used or n in rep.runs:
                rep.verifier = n
                ids = used.get(n) or [rep.runs[n].run_id]
                evidence_runs = [int(r) for r in (ids if isinstance(ids, list) else [ids])]
                break
    with engine.connect() as conn:
        if rep.final is not None:
            glitch = store.glitch_tokens(conn, rep.model_id, rep.final.run_id)
            rep.glitch_ids = [g[0] for g in glitch]
            rep.glitch_raw = [g[1] for g in glitch]
            rep.glitch_shown = [token_repr(g[2], g[1]) for g in glitch]
            kind = GLITCH if glitch else SUSPECT
            found = store.findings_by_token(conn, rep.model_id, [rep.final.run_id], [kind])
            # the final verdict's score is the repeat probability: least repeatable first
            found.sort(key=lambda f: (f.min_score is None, f.min_score or 0.0, f.token_id))
        else:
            kind = "flagged"
            found = store.findings_by_token(conn, rep.model_id,
                                            [r.run_id for r in rep.runs.values()], FLAGGED)
            found.sort(key=lambda f: (-f.n_findings, f.token_id))  # most detectors first
        rep.rows_kind = kind if found else "none"
        rep.rows_total = len(found)
        shown = found[:cap]
        evidence: dict[int, dict] = {}
        if evidence_runs and shown:  # each token's latest verifier finding
            evidence = {t: _json(ev) for t, ev in store.latest_evidence(
                conn, evidence_runs, [f.token_id for f in shown]).items()}
        elicited = store.best_token_elicitations(conn, rep.model_id,
                                                 [f.token_id for f in shown])
    flagged_by = {}
    for det, run in rep.runs.items():
        for t in run.token_ids[np.isin(run.verdicts, FLAGGED)].tolist():
            flagged_by.setdefault(t, []).append(det)
    for f in shown:
        if kind == "flagged":
            by = flagged_by.get(f.token_id, [])
            score = None
            verdict = GLITCH if GLITCH in f.verdicts else SUSPECT
        else:
            by = list(_json(f.evidence_json).get("flagged_by") or [])
            score = f.min_score
            verdict = f.verdicts[0]
        rep.rows.append(TokenRow(f.token_id, f.text, f.raw, f.category, verdict,
                                 None if score is None else float(score), by,
                                 evidence.get(f.token_id, {}),
                                 elicitation=elicited.get(f.token_id)))
    _load_structure(engine, rep)


def _load_structure(engine: Engine, rep: ModelReport) -> None:
    """Each shown token's structure facts: stored at the scan, else computed now from the
    stored vocabulary (containing tokens only: no tokenizer or weights here)."""
    if not rep.rows:
        return
    ids = [r.token_id for r in rep.rows]
    with engine.connect() as conn:
        stored = {t: _json(f) for t, f in store.token_facts(conn, rep.model_id, ids).items()}
        pairs = store.token_bytes(conn, rep.model_id)
    texts = [t for _, t in pairs]
    missing = [t for t in ids if t not in stored]
    if missing:
        stored.update(token_structure.facts([r for r, _ in pairs], texts, missing))
    final = rep.final.verdict_of(len(texts)) if rep.final is not None else None
    for r in rep.rows:
        f = dict(stored.get(r.token_id) or {})
        if "neighbours" in f:
            f["neighbours"] = [[n, texts[n] if n < len(texts) else "",
                                str(final[n]) if final is not None and n < len(final) else "",
                                c] for n, c in f["neighbours"]]
        r.structure = f


def _json(value: str | None) -> dict:
    try:
        got = json.loads(value or "{}")
    except json.JSONDecodeError:
        return {}
    return got if isinstance(got, dict) else {}


def load_models(engine: Engine, models: list[str], cap: int = TABLE_CAP) -> list[ModelReport]:
    """``load_model`` of each of ``models``, each stored model once; two fingerprints of one
    reference (e.g. two dtypes) get labels that tell them apart."""
    if not models:
        raise HarnessError("name at least one scanned model")
    reports: list[ModelReport] = []
    for name in models:
        rep = load_model(engine, name, cap)
        if all(r.model_id != rep.model_id for r in reports):
            reports.append(rep)
    labels = [r.label for r in reports]
    for rep in reports:
        if labels.count(rep.label) > 1:
            parts = rep.model.fingerprint.split("|")  # backend|source|dtype|tok:hash
            dtype = f"{parts[2]}, " if len(parts) == 4 else ""
            rep.label = f"{rep.label} [{dtype}model {rep.model_id}]"
    return reports
