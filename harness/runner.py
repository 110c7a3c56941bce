"""A scan: load a model, store its tokens, run detectors, commit findings batch by batch.

A scan killed mid-way leaves its run in status ``running``; the next identical scan resumes
it, running the detector only on tokens without a finding.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from harness import __version__
from harness.backend import Backend
from harness.detector import Detector, Finding, FindingArrays, ScanContext
from harness.errors import HarnessError
from harness.plugins import Registry, registry
from harness.refs import ResolvedRef, resolve
from harness.schema import Model, Run
from harness.vocab import Vocab, analyze

DEFAULT_DETECTORS = ("embedding-centroid", "unembedding-cosine", "repeat-probe",
                     "repeated-sequence")
DEFAULT_STATIC = ("embedding-centroid", "unembedding-cosine")
DEFAULT_CANDIDATES = 0.02  # per static indicator, as a fraction of the vocabulary
VERDICT = "verdict"  # the pseudo-detector whose run holds the final verdict of every token
VERDICT_VERSION = "1"
FLAGGED = ("glitch", "suspect")


class Reporter:
    """Progress callbacks; the CLI draws them with rich, tests ignore them."""

    def status(self, message: str) -> AbstractContextManager:
        return nullcontext()

    def start(self, label: str, total: int) -> Callable[[int], None]:
        return lambda n: None


@dataclass
class DetectorOutcome:
    detector: str
    run_id: int
    status: str  # done | reused | resumed | retried | skipped | failed
    reason: str | None = None
    wall_s: float = 0.0
    n_findings: int = 0


@dataclass
class ScanResult:
    model_id: int
    ref: ResolvedRef
    fingerprint: str
    vocab_size: int
    load_s: float
    outcomes: list[DetectorOutcome] = field(default_factory=list)
    candidates: int | None = None  # how many tokens the behavioural detectors examined
    verdict: DetectorOutcome | None = None


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def load_backend(ref: ResolvedRef, reg: Registry, **backend_options: Any) -> Backend:
    entry = reg.backends[ref.backend]
    options = {k: v for k, v in backend_options.items() if v is not None}
    return entry.factory(ref.target, **options)


def make_detectors(names: Sequence[str], reg: Registry,
                   options: dict[str, dict[str, Any]]) -> list[Detector]:
    unknown = [n for n in names if n not in reg.detectors]
    if unknown:
        raise HarnessError(f"unknown detector{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))} "
                           f"(known: {', '.join(sorted(reg.detectors))})")
    stray = set(options) - set(names)
    if stray:
        raise HarnessError(f"options given for detector(s) not in this scan: "
                           f"{', '.join(sorted(stray))}")
    return [reg.detectors[n][0](**options.get(n, {})) for n in names]


def options_key(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


def store_model(engine: Engine, ref: ResolvedRef, backend: Backend, vocab: Vocab,
                reporter: Reporter) -> tuple[int, np.ndarray, str]:
    """Insert the model and its tokens (once per fingerprint); return id and categories."""
    fp = backend.fingerprint()
    key = fp.key()
    with engine.begin() as conn:
        row = conn.execute(select(Model.id).where(Model.fingerprint == key)).first()
        if row is not None:
            model_id = row[0]
            cats = [c for (c,) in conn.exec_driver_sql(
                "SELECT category FROM tokens WHERE model_id = ? ORDER BY token_id",
                (model_id,)).fetchall()]
            if len(cats) == len(vocab):
                conn.execute(text("UPDATE models SET alias = coalesce(:a, alias) WHERE id = :m"),
                             {"a": ref.alias, "m": model_id})
                return model_id, np.array(cats, dtype=object), key
            conn.execute(text("DELETE FROM tokens WHERE model_id = :m"), {"m": model_id})
        else:
            meta = {**backend.describe(), "fingerprint": fp.__dict__}
            model_id = conn.execute(
                Model.__table__.insert().values(
                    ref=ref.ref, alias=ref.alias, backend=ref.backend, fingerprint=key,
                    tokenizer_hash=fp.tokenizer_hash, vocab_size=len(vocab),
                    meta_json=json.dumps(meta, default=str), created_utc=now(),
                )).inserted_primary_key[0]
        with reporter.status(f"analysing {len(vocab)} tokens"):
            cats = analyze(vocab, backend.encode_batch)
            attrs = vocab.attributes or [None] * len(vocab)
            rows = list(zip([model_id] * len(vocab), range(len(vocab)), vocab.raw, vocab.text,
                            cats.tolist(), attrs, strict=True))
            conn.exec_driver_sql(
                "INSERT INTO tokens (model_id, token_id, raw, text, category, attr) "
                "VALUES (?, ?, ?, ?, ?, ?)", rows)
    return model_id, cats, key


def _insert_findings(engine: Engine, run_id: int, batch: list[Finding] | FindingArrays) -> None:
    if isinstance(batch, FindingArrays):
        rows = batch.rows(run_id)
    else:
        rows = [(run_id, f.token_id, None if f.score is None or not np.isfinite(f.score)
                 else float(f.score), f.verdict, json.dumps(f.evidence, default=str))
                for f in batch]
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT OR IGNORE INTO findings (run_id, token_id, score, verdict, evidence_json) "
            "VALUES (?, ?, ?, ?, ?)", rows)


def scope_key(scope: np.ndarray | None) -> str:
    if scope is None:
        return "all"
    digest = hashlib.sha256(np.asarray(scope, dtype=np.int64).tobytes()).hexdigest()[:16]
    return f"{len(scope)} tokens:{digest}"


def run_detector(engine: Engine, model_id: int, detector: Detector, ctx: ScanContext,
                 reporter: Reporter, fresh: bool = False) -> DetectorOutcome:
    """Run one detector on the tokens of ``ctx.scope`` (default: all), reusing a finished
    run with the same model, detector version, options and scope, or resuming one."""
    scope = ctx.scope_ids()
    n = len(scope)
    missing = detector.missing_capabilities(ctx.backend)
    base = {"model_id": model_id, "detector": detector.name,
            "detector_version": detector.version, "harness_version": __version__,
            "suspicious_when": detector.suspicious_when}
    if missing:
        reason = (f"backend {ctx.backend.name!r} lacks "
                  f"{', '.join(sorted(m.value for m in missing))}")
        opts = dict(detector.options)
        with engine.begin() as conn:
            run_id = conn.execute(Run.__table__.insert().values(
                **base, options_json=json.dumps(opts, default=str), options_key=options_key(opts),
                status="skipped", status_reason=reason, started_utc=now(), finished_utc=now(),
                wall_s=0.0)).inserted_primary_key[0]
        return DetectorOutcome(detector.name, run_id, "skipped", reason)

    t0 = time.perf_counter()
    resolved = {**detector.prepare(ctx), "scope": scope_key(ctx.scope)}
    key = options_key(resolved)
    with engine.begin() as conn:
        prior = conn.execute(
            select(Run.id, Run.status).where(
                Run.model_id == model_id, Run.detector == detector.name,
                Run.detector_version == detector.version, Run.options_key == key,
                Run.status.in_(("done", "running"))).order_by(Run.id.desc())).first()
    errors = 0
    if prior is not None and not fresh:
        with engine.connect() as conn:
            errors = conn.execute(text("SELECT count(*) FROM findings WHERE run_id = :r AND "
                                       "verdict = 'error'"), {"r": prior.id}).scalar_one()
    if prior is not None and prior.status == "done" and not fresh and not errors:
        return DetectorOutcome(detector.name, prior.id, "reused")
    if prior is not None and not fresh:
        # an interrupted run, or a finished one with failed tokens: redo only those
        run_id = prior.id
        status = "resumed" if prior.status == "running" else "retried"
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM findings WHERE run_id = ? AND verdict = 'error'",
                                 (run_id,))
            conn.execute(Run.__table__.update().where(Run.id == run_id).values(
                status="running", finished_utc=None))
            done_ids = [t for (t,) in conn.exec_driver_sql(
                "SELECT token_id FROM findings WHERE run_id = ?", (run_id,)).fetchall()]
        todo = np.setdiff1d(scope, np.asarray(done_ids, dtype=np.int64))
    else:
        with engine.begin() as conn:
            run_id = conn.execute(Run.__table__.insert().values(
                **base, options_json=json.dumps(resolved, default=str), options_key=key,
                status="running", started_utc=now())).inserted_primary_key[0]
        status, todo = "done", np.sort(scope)

    advance = reporter.start(detector.name, n)
    advance(n - len(todo))
    count = 0
    ctx.progress = advance
    try:
        for batch in detector.run(ctx, todo):
            _insert_findings(engine, run_id, batch)
            count += len(batch)
            advance(len(batch))
    except (KeyboardInterrupt, SystemExit):
        raise  # the run stays 'running': the next scan resumes it
    except HarnessError as exc:
        _finish(engine, run_id, "failed", str(exc), time.perf_counter() - t0)
        return DetectorOutcome(detector.name, run_id, "failed", str(exc))
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        _finish(engine, run_id, "failed", reason, time.perf_counter() - t0)
        return DetectorOutcome(detector.name, run_id, "failed", reason)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM findings WHERE run_id = :r"),
                              {"r": run_id}).scalar_one()
    if stored != n:
        reason = f"detector returned findings for {stored} of {n} tokens in its scope"
        _finish(engine, run_id, "failed", reason, time.perf_counter() - t0)
        return DetectorOutcome(detector.name, run_id, "failed", reason)
    wall = time.perf_counter() - t0
    _finish(engine, run_id, "done", None, wall)
    return DetectorOutcome(detector.name, run_id, status, None, wall, count)


def _finish(engine: Engine, run_id: int, status: str, reason: str | None, wall: float) -> None:
    with engine.begin() as conn:
        conn.execute(Run.__table__.update().where(Run.id == run_id).values(
            status=status, status_reason=reason, finished_utc=now(), wall_s=wall))


def select_candidates(engine: Engine, run_ids: Sequence[int], n_vocab: int,
                      candidates: float) -> np.ndarray:
    """The union, over the static runs, of the ``candidates`` most suspicious tokens by score
    and of the flagged tokens (most suspicious first, as many). ``candidates`` below 1 is a
    fraction of the vocabulary."""
    k = int(round(candidates * n_vocab)) if candidates < 1 else int(candidates)
    picked: set[int] = set()
    with engine.connect() as conn:
        for run_id in run_ids:
            low = conn.execute(text("SELECT suspicious_when FROM runs WHERE id = :r"),
                               {"r": run_id}).scalar_one() == "low"
            order = "score ASC" if low else "score DESC"
            for where in ("score IS NOT NULL", "verdict IN ('glitch', 'suspect')"):
                picked.update(t for (t,) in conn.exec_driver_sql(
                    f"SELECT token_id FROM findings WHERE run_id = ? AND {where} "
                    f"ORDER BY {order} NULLS LAST, token_id LIMIT ?", (run_id, k)))
    return np.array(sorted(picked), dtype=np.int64)


def record_verdicts(engine: Engine, model_id: int, n_vocab: int,
                    runs: dict[str, tuple[int, Detector]], fresh: bool = False
                    ) -> DetectorOutcome:
    """One final verdict per token, from the scan's runs, stored as a run of its own.

    ``glitch`` when a verifying detector (repeat-probe) says so; ``error`` when it failed on
    the token; ``ok`` when it verified the token and no other behavioural detector flagged
    it; else ``suspect`` when any run flagged the token; else ``ok``. The score is the
    verifying detector's score (the repeat probability) where it examined the token.
    """
    t0 = time.perf_counter()
    opts = {"runs": {name: rid for name, (rid, _) in sorted(runs.items())}, "rule": "v1"}
    key = options_key(opts)
    base = {"model_id": model_id, "detector": VERDICT, "detector_version": VERDICT_VERSION,
            "harness_version": __version__, "suspicious_when": "low"}
    with engine.begin() as conn:
        prior = conn.execute(select(Run.id).where(
            Run.model_id == model_id, Run.detector == VERDICT, Run.options_key == key,
            Run.detector_version == VERDICT_VERSION, Run.status == "done")).first()
        if prior is not None and not fresh:
            return DetectorOutcome(VERDICT, prior.id, "reused")
        run_id = conn.execute(Run.__table__.insert().values(
            **base, options_json=json.dumps(opts), options_key=key, status="running",
            started_utc=now())).inserted_primary_key[0]
    verdict = np.full(n_vocab, "ok", dtype=object)
    score = np.full(n_vocab, np.nan)
    flagged_by: list[list[str]] = [[] for _ in range(n_vocab)]
    flagged = np.zeros(n_vocab, dtype=bool)
    behaviour_flag = np.zeros(n_vocab, dtype=bool)
    checked = np.zeros(n_vocab, dtype=bool)
    glitch = np.zeros(n_vocab, dtype=bool)
    error = np.zeros(n_vocab, dtype=bool)
    with engine.connect() as conn:
        for name, (rid, det) in runs.items():
            rows = conn.exec_driver_sql(
                "SELECT token_id, verdict, score FROM findings WHERE run_id = ?",
                (rid,)).fetchall()
            if not rows:
                continue
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            verd = np.array([r[1] for r in rows], dtype=object)
            hit = np.isin(verd, FLAGGED)
            flagged[ids[hit]] = True
            for t in ids[hit].tolist():
                flagged_by[t].append(name)
            if det.verifies:
                glitch[ids[verd == "glitch"]] = True
                error[ids[verd == "error"]] = True
                checked[ids[verd == "ok"]] = True
                score[ids] = np.array([np.nan if r[2] is None else r[2] for r in rows])
            elif det.behavioural:
                behaviour_flag[ids[hit]] = True
    verdict[flagged] = "suspect"
    verdict[checked & ~behaviour_flag] = "ok"
    verdict[error] = "error"
    verdict[glitch] = "glitch"
    _insert_findings(engine, run_id, [
        Finding(t, float(score[t]), verdict[t], {"flagged_by": flagged_by[t]})
        for t in range(n_vocab)])
    wall = time.perf_counter() - t0
    _finish(engine, run_id, "done", None, wall)
    return DetectorOutcome(VERDICT, run_id, "done", None, wall, n_vocab)


def scan(model: str, engine: Engine, detectors: Sequence[str] = DEFAULT_DETECTORS,
         backend: str | None = None, backend_options: dict[str, Any] | None = None,
         detector_options: dict[str, dict[str, Any]] | None = None, fresh: bool = False,
         reporter: Reporter | None = None, full: bool = False,
         candidates: float = DEFAULT_CANDIDATES,
         tokens: Sequence[int] | None = None) -> ScanResult:
    """Scan ``model`` and store everything in ``engine``'s database.

    The static detectors run on the whole vocabulary; the behavioural ones on the candidates
    the static runs point at (``full``: every token; ``tokens``: exactly these), and a final
    verdict per token is stored as a run of the pseudo-detector ``verdict``.
    """
    reporter = reporter or Reporter()
    reg = registry()
    names = list(detectors)
    dets = make_detectors(names, reg, detector_options or {})
    if (any(d.behavioural for d in dets) and not full and tokens is None
            and not any(not d.behavioural for d in dets)):
        # behavioural detectors need candidates: the default static detectors pick them
        dets = make_detectors(list(DEFAULT_STATIC), reg, {}) + dets
    ref = resolve(model, reg, backend)
    t0 = time.perf_counter()
    with reporter.status(f"loading {ref.alias or ref.ref}"):
        be = load_backend(ref, reg, **(backend_options or {}))
    load_s = time.perf_counter() - t0
    try:
        vocab = be.vocab()
        model_id, cats, key = store_model(engine, ref, be, vocab, reporter)
        result = ScanResult(model_id, ref, key, len(vocab), load_s)
        done: dict[str, tuple[int, Detector]] = {}

        def run(det: Detector, scope: np.ndarray | None) -> None:
            ctx = ScanContext(backend=be, vocab=vocab, categories=cats, scope=scope)
            outcome = run_detector(engine, model_id, det, ctx, reporter, fresh)
            result.outcomes.append(outcome)
            if outcome.status in ("done", "reused", "resumed", "retried"):
                done[det.name] = (outcome.run_id, det)

        for det in dets:
            if not det.behavioural:
                run(det, None)
        behavioural = [d for d in dets if d.behavioural]
        if behavioural:
            scope = None
            if tokens is not None:
                bad = [t for t in tokens if not 0 <= t < len(vocab)]
                if bad:
                    raise HarnessError(f"token ids {bad[:5]} are outside 0..{len(vocab) - 1}")
                scope = np.unique(np.asarray(tokens, dtype=np.int64))
            elif not full:
                static_runs = [rid for rid, d in done.values() if not d.behavioural]
                if not static_runs:
                    raise HarnessError(
                        f"no static detector could run on backend {be.name!r} to pick "
                        "candidates: name tokens with --tokens, or probe all with --full")
                scope = select_candidates(engine, static_runs, len(vocab), candidates)
            result.candidates = len(vocab) if scope is None else len(scope)
            for det in behavioural:
                run(det, scope)
            if any(d.behavioural for _, d in done.values()):
                changed = any(o.status != "reused" for o in result.outcomes)
                result.verdict = record_verdicts(engine, model_id, len(vocab), done,
                                                 fresh or changed)
        return result
    finally:
        be.close()
