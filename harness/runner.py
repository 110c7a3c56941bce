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
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from harness import __version__, store
from harness.backend import Backend
from harness.detector import Detector, Finding, FindingArrays, ScanContext
from harness.errors import HarnessError
from harness.plugins import Registry, registry
from harness.refs import ResolvedRef, resolve
from harness.vocab import Vocab, analyze

DEFAULT_DETECTORS = ("embedding-centroid", "unembedding-cosine", "repeat-screen",
                     "repeat-probe")
DEFAULT_STATIC = ("embedding-centroid", "unembedding-cosine")
DEFAULT_SCREEN = "repeat-screen"
DEFAULT_CANDIDATES = 0.02  # budget mode: per static indicator, a fraction of the vocabulary
VERDICT = store.VERDICT  # the pseudo-detector whose run holds the final verdict of every token
VERDICT_VERSION = "2"
FLAGGED = store.FLAGGED
BUDGET_HINT_S = 15 * 60  # past this estimate, a scan points at the budget mode


class Reporter:
    """Progress callbacks; the CLI draws them with rich, tests ignore them."""

    def status(self, message: str) -> AbstractContextManager:
        return nullcontext()

    def start(self, label: str, total: int) -> Callable[[int], None]:
        return lambda n: None

    def note(self, message: str) -> None:
        """A line worth telling the user while the scan runs (estimates, the plan)."""


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
    screened: int | None = None  # how many tokens a screen examined first (the default)
    verdict: DetectorOutcome | None = None


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
        model_id = store.model_id_by_fingerprint(conn, key)
        if model_id is None:
            model_id = store.insert_model(
                conn, ref=ref.ref, alias=ref.alias, backend=ref.backend, fingerprint=key,
                tokenizer_hash=fp.tokenizer_hash, vocab_size=len(vocab),
                meta={**backend.describe(), "fingerprint": fp.__dict__})
        cats = store.token_categories(conn, model_id)
        if len(cats) == len(vocab):
            store.set_model_alias(conn, model_id, ref.alias)
            return model_id, np.array(cats, dtype=object), key
        if cats:
            store.delete_tokens(conn, model_id)
        with reporter.status(f"analysing {len(vocab)} tokens"):
            cats = analyze(vocab, backend.encode_batch)
            store.insert_tokens(conn, model_id, vocab.raw, vocab.text, cats.tolist(),
                                vocab.attributes or [None] * len(vocab))
    return model_id, cats, key


def _insert_findings(engine: Engine, run_id: int, batch: list[Finding] | FindingArrays) -> None:
    if isinstance(batch, FindingArrays):
        rows = [r[1:] for r in batch.rows(run_id)]
    else:
        rows = [(f.token_id, None if f.score is None or not np.isfinite(f.score)
                 else float(f.score), f.verdict, json.dumps(f.evidence, default=str))
                for f in batch]
    with engine.begin() as conn:
        store.insert_findings(conn, run_id, rows)


def scope_key(scope: np.ndarray | None) -> str:
    if scope is None:
        return "all"
    digest = hashlib.sha256(np.asarray(scope, dtype=np.int64).tobytes()).hexdigest()[:16]
    return f"{len(scope)} tokens:{digest}"


def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_detector(engine: Engine, model_id: int, detector: Detector, ctx: ScanContext,
                 reporter: Reporter, fresh: bool = False, hint: str | None = None
                 ) -> DetectorOutcome:
    """Run one detector on the tokens of ``ctx.scope`` (default: all), reusing a finished
    run with the same model, detector version, options and scope, or resuming one.

    After the first batch of a long run, the reporter gets an estimate of the time left
    (with ``hint`` appended when it is long)."""
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
            run_id = store.insert_run(conn, **base, options=opts, options_key=options_key(opts),
                                      status="skipped", status_reason=reason, finished=True,
                                      wall_s=0.0)
        return DetectorOutcome(detector.name, run_id, "skipped", reason)

    t0 = time.perf_counter()
    resolved = {**detector.prepare(ctx), "scope": scope_key(ctx.scope)}
    key = options_key(resolved)
    with engine.connect() as conn:
        prior = store.latest_matching_run(
            conn, model_id=model_id, detector=detector.name,
            detector_version=detector.version, options_key=key, statuses=("done", "running"))
        errors = 0 if prior is None or fresh else store.count_findings(conn, prior[0], "error")
    if prior is not None and prior[1] == "done" and not fresh and not errors:
        return DetectorOutcome(detector.name, prior[0], "reused")
    if prior is not None and not fresh:
        # an interrupted run, or a finished one with failed tokens: redo only those
        run_id = prior[0]
        status = "resumed" if prior[1] == "running" else "retried"
        with engine.begin() as conn:
            store.delete_findings(conn, run_id, "error")
            store.reopen_run(conn, run_id)
            done_ids = store.examined_token_ids(conn, run_id)
        todo = np.setdiff1d(scope, done_ids)
    else:
        with engine.begin() as conn:
            run_id = store.insert_run(conn, **base, options=resolved, options_key=key,
                                      status="running")
        status, todo = "done", np.sort(scope)

    advance = reporter.start(detector.name, n)
    advance(n - len(todo))
    count = 0
    ctx.progress = advance
    started = time.perf_counter()
    try:
        for batch in detector.run(ctx, todo):
            _insert_findings(engine, run_id, batch)
            if count == 0 and len(batch) < len(todo):
                rate = len(batch) / max(time.perf_counter() - started, 1e-9)
                left = (len(todo) - len(batch)) / rate
                if left > 60:
                    reporter.note(f"{detector.name}: {len(todo):,} tokens at {rate:,.1f} "
                                  f"tokens/s, about {duration(left)} to go"
                                  + (f"; {hint}" if hint and left > BUDGET_HINT_S else ""))
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
        stored = store.count_findings(conn, run_id)
    if stored != n:
        reason = f"detector returned findings for {stored} of {n} tokens in its scope"
        _finish(engine, run_id, "failed", reason, time.perf_counter() - t0)
        return DetectorOutcome(detector.name, run_id, "failed", reason)
    wall = time.perf_counter() - t0
    _finish(engine, run_id, "done", None, wall)
    return DetectorOutcome(detector.name, run_id, status, None, wall, count)


def _finish(engine: Engine, run_id: int, status: str, reason: str | None, wall: float) -> None:
    with engine.begin() as conn:
        store.finish_run(conn, run_id, status, reason, wall)


def select_candidates(engine: Engine, run_ids: Sequence[int], n_vocab: int,
                      candidates: float) -> np.ndarray:
    """The union, over the static runs, of the ``candidates`` most suspicious tokens by score
    and of the flagged tokens (most suspicious first, as many). ``candidates`` below 1 is a
    fraction of the vocabulary."""
    k = int(round(candidates * n_vocab)) if candidates < 1 else int(candidates)
    picked: set[int] = set()
    with engine.connect() as conn:
        for run_id in run_ids:
            for flagged_only in (False, True):
                picked.update(store.most_suspicious_token_ids(conn, run_id, k, flagged_only))
    return np.array(sorted(picked), dtype=np.int64)


def flagged_tokens(engine: Engine, run_ids: Sequence[int]) -> np.ndarray:
    """The tokens any of ``run_ids`` flagged (``glitch``, ``suspect``) or failed on."""
    with engine.connect() as conn:
        return store.token_ids_with_verdict(conn, run_ids, (*FLAGGED, "error"))


def latest_findings(conn: Any, run_ids: Sequence[int], size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per token, the verdict ("" where none) and score (NaN) of the latest of ``run_ids``
    that examined it."""
    verdicts = np.full(size, "", dtype=object)
    scores = np.full(size, np.nan)
    for run_id in sorted(run_ids):
        s, v = store.run_arrays(conn, run_id, size)
        seen = v != ""
        verdicts[seen], scores[seen] = v[seen], s[seen]
    return verdicts, scores


def record_verdicts(engine: Engine, model_id: int, n_vocab: int, reg: Registry,
                    fresh: bool = False) -> DetectorOutcome | None:
    """One final verdict per token from every detector's finished runs on the model,
    whichever scan wrote them, stored as a run of its own (None while no behavioural
    detector has finished a run on the model).

    Per detector and token the latest finding counts. ``glitch`` when a verifying detector
    (repeat-probe) says so; ``error`` when it failed on the token (or, unverified, a screen
    did); ``ok`` when it verified the token and no other behavioural detector flagged it;
    else ``suspect`` when any detector flagged the token (a screen's flag counts until the
    token is verified); else ``ok``. The score is the verifier's (the repeat probability)
    where it examined the token.
    """
    t0 = time.perf_counter()
    with engine.connect() as conn:
        done = store.done_runs(conn, model_id)
    runs: dict[str, list[int]] = {}
    for run_id, name in done:
        runs.setdefault(name, []).append(run_id)
    kinds = {name: reg.detectors[name][0] if name in reg.detectors else None for name in runs}
    if not any(cls is not None and cls.behavioural for cls in kinds.values()):
        return None
    opts = {"runs": runs, "rule": "v2"}
    key = options_key(opts)
    base = {"model_id": model_id, "detector": VERDICT, "detector_version": VERDICT_VERSION,
            "harness_version": __version__, "suspicious_when": "low"}
    with engine.begin() as conn:
        prior = store.finished_verdict_run(conn, model_id, key, VERDICT_VERSION)
        if prior is not None and not fresh:
            return DetectorOutcome(VERDICT, prior, "reused")
        run_id = store.insert_run(conn, **base, options=opts, options_key=key,
                                  status="running")
    flagged = np.zeros(n_vocab, dtype=bool)
    behaviour_flag = np.zeros(n_vocab, dtype=bool)
    screen_error = np.zeros(n_vocab, dtype=bool)
    flagged_by: dict[int, list[str]] = {}
    verified = np.full(n_vocab, "", dtype=object)
    score = np.full(n_vocab, np.nan)
    with engine.connect() as conn:
        verifiers = [rid for name, ids in runs.items() if kinds[name] is not None
                     and kinds[name].verifies for rid in ids]
        verified, score = latest_findings(conn, verifiers, n_vocab)
        for name, ids in sorted(runs.items()):
            cls = kinds[name]
            verd, _ = latest_findings(conn, ids, n_vocab)
            hit = np.isin(verd, FLAGGED)
            flagged |= hit
            for t in np.flatnonzero(hit).tolist():
                flagged_by.setdefault(t, []).append(name)
            if cls is not None and cls.screens:
                screen_error |= verd == "error"
            elif cls is not None and cls.behavioural and not cls.verifies:
                behaviour_flag |= hit
    verdict = np.full(n_vocab, "ok", dtype=object)
    verdict[flagged] = "suspect"
    verdict[(verified == "ok") & ~behaviour_flag] = "ok"
    verdict[(verified == "error") | ((verified == "") & screen_error)] = "error"
    verdict[verified == "glitch"] = "glitch"
    _insert_findings(engine, run_id, [
        Finding(t, float(score[t]), verdict[t], {"flagged_by": flagged_by.get(t, [])})
        for t in range(n_vocab)])
    wall = time.perf_counter() - t0
    _finish(engine, run_id, "done", None, wall)
    return DetectorOutcome(VERDICT, run_id, "done", None, wall, n_vocab)


def scan(model: str, engine: Engine, detectors: Sequence[str] = DEFAULT_DETECTORS,
         backend: str | None = None, backend_options: dict[str, Any] | None = None,
         detector_options: dict[str, dict[str, Any]] | None = None, fresh: bool = False,
         reporter: Reporter | None = None, full: bool = False,
         candidates: float | None = None,
         tokens: Sequence[int] | None = None) -> ScanResult:
    """Scan ``model`` and store everything in ``engine``'s database.

    The static detectors run on the whole vocabulary. By default every token is then
    examined behaviourally: the screen (``repeat-screen``) runs on every token, and the other
    behavioural detectors on every token it does not settle and every token a static
    detector flags. ``candidates`` (the budget mode) runs them on the static detectors' most
    suspicious tokens instead, ``full`` on every token (no screen: the exact path), and
    ``tokens`` on exactly these. A final verdict per token, from every detector's latest
    finished runs on the model, is stored as a run of the pseudo-detector ``verdict``.
    """
    reporter = reporter or Reporter()
    if sum([full, candidates is not None, tokens is not None]) > 1:
        raise HarnessError("--full, --candidates and --tokens each pick the tokens to "
                           "examine: give one of them")
    if candidates is not None and candidates <= 0:
        raise HarnessError("--candidates must be positive")
    reg = registry()
    names = list(detectors)
    dets = make_detectors(names, reg, detector_options or {})
    verifying = any(d.behavioural and not d.screens for d in dets)
    if verifying and not full and tokens is None:
        # whole-vocabulary pipeline: a screen and the static flags pick what to verify;
        # budget mode: the static scores pick it
        extra = [n for n in DEFAULT_STATIC if n not in names]
        if candidates is None and not any(d.screens for d in dets):
            extra.append(DEFAULT_SCREEN)
        dets = make_detectors(extra, reg, {}) + dets
    ref = resolve(model, reg, backend)
    t0 = time.perf_counter()
    with reporter.status(f"loading {ref.alias or ref.ref}"):
        be = load_backend(ref, reg, **(backend_options or {}))
    load_s = time.perf_counter() - t0
    try:
        vocab = be.vocab()
        model_id, cats, key = store_model(engine, ref, be, vocab, reporter)
        result = ScanResult(model_id, ref, key, len(vocab), load_s)
        this_scan: dict[str, tuple[int, Detector]] = {}

        def run(det: Detector, scope: np.ndarray | None, hint: str | None = None) -> None:
            ctx = ScanContext(backend=be, vocab=vocab, categories=cats, scope=scope)
            outcome = run_detector(engine, model_id, det, ctx, reporter, fresh, hint)
            result.outcomes.append(outcome)
            if outcome.status in ("done", "reused", "resumed", "retried"):
                this_scan[det.name] = (outcome.run_id, det)

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
            elif candidates is not None:
                static_runs = [rid for rid, d in this_scan.values() if not d.behavioural]
                if not static_runs:
                    raise HarnessError(
                        f"no static detector could run on backend {be.name!r} to pick "
                        "candidates: name tokens with --tokens, or leave out --candidates "
                        "to examine every token")
                scope = select_candidates(engine, static_runs, len(vocab), candidates)
            elif not full:
                hint = (f"--candidates {DEFAULT_CANDIDATES} verifies only the static "
                        "detectors' most suspicious tokens")
                for det in [d for d in behavioural if d.screens]:
                    run(det, None, hint)
                    result.screened = len(vocab)
                behavioural = [d for d in behavioural if not d.screens]
                scope = flagged_tokens(engine, [rid for rid, _ in this_scan.values()])
                if behavioural:
                    reporter.note(f"verifying {len(scope):,} of {len(vocab):,} tokens: those "
                                  "the screen did not settle and those a static detector "
                                  "flagged")
            result.candidates = len(vocab) if scope is None else len(scope)
            for det in behavioural:
                run(det, scope)
        changed = any(o.status != "reused" for o in result.outcomes)
        result.verdict = record_verdicts(engine, model_id, len(vocab), reg, fresh or changed)
        return result
    finally:
        be.close()
