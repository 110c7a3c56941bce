"""A scan: load a model, store its tokens, run detectors, commit findings batch by batch.

A scan killed mid-way leaves its run in status ``running``; the next identical scan resumes
it, running the detector only on tokens without a finding.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from harness import __version__, store, token_structure
from harness.backend import Backend, Capability
from harness.detector import Detector, Finding, FindingArrays, ScanContext
from harness.errors import HarnessError
from harness.options import resolve_backend_options
from harness.plugins import Registry, registry
from harness.refs import ResolvedRef, resolve
from harness.shared_runs import LEASE_S, RunFailed, cut_blocks, is_dead, work_blocks, worker_id
from harness.token_structure import MAX_FACT_TOKENS
from harness.verdicts import ERROR, FINAL, FLAGGED, GLITCH, OK, SUSPECT
from harness.vocab import Vocab, analyze

DEFAULT_CANDIDATES = 0.02  # budget mode: per static indicator, a fraction of the vocabulary
VERDICT_VERSION = "2"  # of the final verdict's rule
FINISHED = ("done", "reused", "resumed", "joined", "retried")  # outcomes with a finished run
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
    status: str  # done | reused | resumed | joined | retried | skipped | failed
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
    """Load ``ref`` with its backend and the options given (None: not given), each checked
    against the options the backend declares and coerced to its type."""
    entry = reg.backends[ref.backend]
    return entry.factory(ref.target, **resolve_backend_options(entry.name, entry.options,
                                                               backend_options))


def open_model(model: str, reg: Registry, backend: str | None,
               backend_options: dict[str, Any] | None, reporter: Reporter
               ) -> tuple[ResolvedRef, Backend, float]:
    """Resolve ``model`` and load it (a status line while it loads): the reference, the
    loaded backend and the seconds the load took."""
    ref = resolve(model, reg, backend)
    t0 = time.perf_counter()
    with reporter.status(f"loading {ref.alias or ref.ref}"):
        be = load_backend(ref, reg, **(backend_options or {}))
    return ref, be, time.perf_counter() - t0


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
    return [reg.detectors[n].cls(**options.get(n, {})) for n in names]


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


def _finding_rows(batch: list[Finding] | FindingArrays) -> list[tuple]:
    """``(token_id, score, verdict, evidence_json)`` of each finding of a batch."""
    if isinstance(batch, FindingArrays):
        return batch.rows()
    return [(f.token_id, None if f.score is None or not np.isfinite(f.score)
             else float(f.score), f.verdict, json.dumps(f.evidence, default=str))
            for f in batch]


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
                 reporter: Reporter, fresh: bool = False, hint: str | None = None,
                 lease_s: float = LEASE_S) -> DetectorOutcome:
    """Run one detector on the tokens of ``ctx.scope`` (default: all), reusing a finished
    run with the same model, detector version, options and scope, or resuming one.

    The run is shared: another process running the same scan on the same database finds
    the same run and works its blocks alongside (``harness.shared_runs``); the status is
    then ``joined``. After this process's first batch of a long run, the reporter gets an
    estimate of the time left (with ``hint`` appended when it is long)."""
    scope = np.sort(ctx.scope_ids())
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
    with engine.begin() as conn:
        store.lock_runs(conn, model_id)  # processes starting one scan at once: one run
        prior = store.latest_matching_run(
            conn, model_id=model_id, detector=detector.name,
            detector_version=detector.version, options_key=key, statuses=("done", "running"))
        errors = 0 if prior is None or fresh else store.count_findings(conn, prior[0], "error")
        if prior is not None and prior[1] == "done" and not fresh and not errors:
            return DetectorOutcome(detector.name, prior[0], "reused")
        if prior is not None and not fresh:
            # an interrupted or shared run, or a finished one with failed tokens: redo those
            run_id = prior[0]
            if prior[1] == "running":
                others = [w for _, w in store.claimed_blocks(conn, run_id)
                          if w != worker_id() and not is_dead(w)]
                status = "joined" if others else "resumed"
            else:
                status = "retried"
                store.reopen_blocks_with(conn, run_id, "error")
                store.delete_findings(conn, run_id, "error")
                store.reopen_run(conn, run_id)
            if not any(store.count_blocks(conn, run_id).values()):  # a run older than blocks
                store.insert_blocks(conn, run_id, cut_blocks(scope, detector.block_size()))
        else:
            run_id = store.insert_run(conn, **base, options=resolved, options_key=key,
                                      status="running")
            store.insert_blocks(conn, run_id, cut_blocks(scope, detector.block_size()))
            status = "done"

    advance = reporter.start(detector.name, n)
    shown = 0
    started = time.perf_counter()
    estimated = False

    def progress(stored: int, mine: int) -> None:
        nonlocal shown, estimated
        advance(stored - shown)
        shown = stored
        if mine and not estimated:
            estimated = True
            rate = mine / max(time.perf_counter() - started, 1e-9)
            left = (n - stored) / rate
            if left > 60:
                reporter.note(f"{detector.name}: {n - stored:,} tokens to go at {rate:,.1f} "
                              f"tokens/s, about {duration(left)}"
                              + (f"; {hint}" if hint and left > BUDGET_HINT_S else ""))

    def store_batch(conn: Any, batch: list[Finding] | FindingArrays) -> int:
        store.insert_findings(conn, run_id, _finding_rows(batch))
        detector.store_extra(conn, model_id, run_id, batch)
        return len(batch)

    try:
        count = work_blocks(engine, run_id, scope, lambda ids: detector.run(ctx, ids),
                            store_batch, progress, lease_s)
    except (KeyboardInterrupt, SystemExit):
        raise  # the run stays 'running': the next scan resumes it
    except RunFailed as exc:
        return DetectorOutcome(detector.name, run_id, "failed", str(exc))
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
    _finish(engine, run_id, "done", None, wall)  # once: the first process to get here
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
        return store.token_ids_with_verdict(conn, run_ids, (*FLAGGED, ERROR))


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


class FinalVerdict(Detector):
    """The pseudo-detector ``verdict``: one final verdict per token from every detector's
    latest finished runs on the model (``runs``: their ids by detector name).

    Per detector and token the latest finding counts. ``glitch`` when a verifying detector
    (repeat-probe) says so; ``error`` when it failed on the token (or, unverified, a screen
    did); ``ok`` when it verified the token and no other behavioural detector flagged it;
    else ``suspect`` when any detector flagged the token (a screen's flag counts until the
    token is verified); else ``ok``. The score is the verifier's (the repeat probability)
    where it examined the token.
    """

    name = FINAL
    version = VERDICT_VERSION

    def __init__(self, engine: Engine, runs: dict[str, list[int]],
                 finished: dict[int, str], reg: Registry) -> None:
        super().__init__()
        self.engine, self.runs, self.finished = engine, runs, finished
        self.kinds = {name: reg.detectors[name].cls if name in reg.detectors else None
                      for name in runs}

    def prepare(self, ctx: ScanContext) -> dict[str, Any]:
        # the runs' finishing times are in the key: a run retried since gives a new verdict
        return {"runs": self.runs, "rule": "v2", "finished": self.finished}

    def run(self, ctx: ScanContext, token_ids: np.ndarray) -> Iterator[FindingArrays]:
        n_vocab = len(ctx.vocab)
        flagged = np.zeros(n_vocab, dtype=bool)
        behaviour_flag = np.zeros(n_vocab, dtype=bool)
        screen_error = np.zeros(n_vocab, dtype=bool)
        flagged_by: dict[int, list[str]] = {}
        kinds = self.kinds
        with self.engine.connect() as conn:
            verifiers = [rid for name, ids in self.runs.items() if kinds[name] is not None
                         and kinds[name].verifies for rid in ids]
            verified, score = latest_findings(conn, verifiers, n_vocab)
            for name, ids in sorted(self.runs.items()):
                cls = kinds[name]
                verd, _ = latest_findings(conn, ids, n_vocab)
                hit = np.isin(verd, FLAGGED)
                flagged |= hit
                for t in np.flatnonzero(hit).tolist():
                    flagged_by.setdefault(t, []).append(name)
                if cls is not None and cls.screens:
                    screen_error |= verd == ERROR
                elif cls is not None and cls.behavioural and not cls.verifies:
                    behaviour_flag |= hit
        verdict = np.full(n_vocab, OK, dtype=object)
        verdict[flagged] = SUSPECT
        verdict[(verified == OK) & ~behaviour_flag] = OK
        verdict[(verified == ERROR) | ((verified == "") & screen_error)] = ERROR
        verdict[verified == GLITCH] = GLITCH
        # one JSON text per distinct list, not a json.dumps per token of the vocabulary
        unflagged = json.dumps({"flagged_by": []})
        yield FindingArrays(token_ids, score[token_ids], verdict[token_ids], evidence_texts=[
            json.dumps({"flagged_by": flagged_by[t]}) if t in flagged_by else unflagged
            for t in token_ids.tolist()])


def _verdicts_of(engine: Engine, model_id: int, size: int
                 ) -> Callable[[str], np.ndarray | None]:
    """``ScanContext.verdicts_of`` for a model: a detector's latest finished run's verdict
    per token id ("" where none), None when it has no finished run."""
    def read(name: str) -> np.ndarray | None:
        with engine.connect() as conn:
            runs = [r for r in store.latest_done_runs(conn, model_id) if r.detector == name]
            return store.run_arrays(conn, runs[-1].id, size)[1] if runs else None
    return read


def tokens_with_final_verdict(engine: Engine, model_id: int, model: str,
                              verdicts: Sequence[str]) -> np.ndarray:
    """The tokens whose final verdict in the model's latest verdict run is one of
    ``verdicts`` (one clear line when there is no verdict run, or no such token)."""
    with engine.connect() as conn:
        run_id = store.latest_verdict_run(conn, model_id)
        if run_id is None:
            raise HarnessError(f"{model!r} has no final verdicts stored to take "
                               f"{','.join(verdicts)} tokens from: run `harness scan "
                               f"{model}` first")
        ids = store.token_ids_with_verdict(conn, [run_id], list(verdicts))
    if len(ids) == 0:
        raise HarnessError(f"no token of {model!r} has the final verdict "
                           f"{' or '.join(verdicts)} (verdict run {run_id})")
    return ids


def record_verdicts(engine: Engine, ctx: ScanContext, model_id: int, reg: Registry,
                    reporter: Reporter, fresh: bool = False) -> DetectorOutcome | None:
    """The final verdict of every token (``FinalVerdict``) from every detector's finished
    runs on the model, whichever scan wrote them, stored as a run of its own, once however
    many processes share the scan (None while no behavioural detector has finished a run on
    the model)."""
    with engine.connect() as conn:
        done = store.done_runs(conn, model_id)
    runs: dict[str, list[int]] = {}
    for run_id, name, _ in done:
        runs.setdefault(name, []).append(run_id)
    if not any(name in reg.detectors and reg.detectors[name].cls.behavioural for name in runs):
        return None
    finished = {run_id: str(at) for run_id, _, at in done}
    ctx = ScanContext(backend=ctx.backend, vocab=ctx.vocab, categories=ctx.categories)
    return run_detector(engine, model_id, FinalVerdict(engine, runs, finished, reg), ctx,
                        reporter, fresh)


def record_token_facts(engine: Engine, model_id: int, backend: Backend, vocab: Vocab,
                       verdict_run: int, reporter: Reporter) -> int:
    """Store the tokenizer-structure facts (``harness.token_structure``) of the glitch and
    suspect tokens of the final verdict ``verdict_run`` (glitch first, then suspect by
    score, at most ``MAX_FACT_TOKENS``), once per verdict run; how many were computed."""
    with engine.connect() as conn:
        if store.facts_verdict_run(conn, model_id) == verdict_run:
            return 0
        found = store.tokens_with_final_verdict(conn, model_id, verdict_run, FLAGGED)
    found.sort(key=lambda t: (t.verdict != GLITCH, np.inf if t.score is None else t.score,
                              t.token_id))
    ids = [t.token_id for t in found[:MAX_FACT_TOKENS]]
    emb = None
    if Capability.EMBEDDINGS in backend.capabilities:
        try:
            emb = backend.input_embeddings()
        except NotImplementedError:
            emb = None
    with reporter.status(f"tokenizer-structure facts of {len(ids):,} tokens"):
        found_facts = token_structure.facts(vocab.raw, vocab.text, ids, backend.encode_batch,
                                            emb, vocab.special)
    with engine.begin() as conn:
        store.lock_runs(conn, model_id)  # processes sharing the scan: one writes them
        if store.facts_verdict_run(conn, model_id) == verdict_run:
            return 0
        store.replace_token_facts(conn, model_id, verdict_run,
                                  {t: json.dumps(f) for t, f in found_facts.items()})
    return len(ids)


def scan(model: str, engine: Engine, detectors: Sequence[str] | None = None,
         backend: str | None = None, backend_options: dict[str, Any] | None = None,
         detector_options: dict[str, dict[str, Any]] | None = None, fresh: bool = False,
         reporter: Reporter | None = None, full: bool = False,
         candidates: float | None = None,
         tokens: Sequence[int] | None = None,
         token_verdicts: Sequence[str] | None = None) -> ScanResult:
    """Scan ``model`` and store everything in ``engine``'s database.

    The static detectors run on the whole vocabulary. By default every token is then
    examined behaviourally: the screen (``repeat-screen``) runs on every token, and the other
    behavioural detectors on every token it does not settle and every token a static
    detector flags. ``candidates`` (the budget mode) runs them on the static detectors' most
    suspicious tokens instead, ``full`` on every token (no screen: the exact path), and
    ``tokens`` on exactly these, ``token_verdicts`` on the tokens whose stored final
    verdict (the model's latest) is one of these (e.g. ``glitch``, ``suspect``: a finished
    scan's tokens). A final verdict per token, from every detector's latest finished runs on
    the model, is stored as a run of the pseudo-detector ``verdict``.
    """
    reporter = reporter or Reporter()
    if sum([full, candidates is not None, tokens is not None,
            token_verdicts is not None]) > 1:
        raise HarnessError("--full, --candidates and --tokens each pick the tokens to "
                           "examine: give one of them")
    picked = tokens is not None or token_verdicts is not None
    if candidates is not None and candidates <= 0:
        raise HarnessError("--candidates must be positive")
    reg = registry()
    names = list(detectors) if detectors else reg.default_detectors()
    dets = make_detectors(names, reg, detector_options or {})
    verifying = any(d.behavioural and not d.screens for d in dets)
    if verifying and not full and not picked:
        # whole-vocabulary pipeline: a screen and the static flags pick what to verify;
        # budget mode: the static scores pick it
        extra = [n for n in reg.default_static() if n not in names]
        screen = reg.default_screen()
        if candidates is None and not any(d.screens for d in dets) and screen is not None:
            extra.append(screen)
        dets = make_detectors(extra, reg, {}) + dets
    ref, be, load_s = open_model(model, reg, backend, backend_options, reporter)
    try:
        vocab = be.vocab()
        model_id, cats, key = store_model(engine, ref, be, vocab, reporter)
        result = ScanResult(model_id, ref, key, len(vocab), load_s)
        this_scan: dict[str, tuple[int, Detector]] = {}

        def run(det: Detector, scope: np.ndarray | None, hint: str | None = None) -> None:
            ctx = ScanContext(backend=be, vocab=vocab, categories=cats, scope=scope,
                              verdicts_of=_verdicts_of(engine, model_id, len(vocab)))
            outcome = run_detector(engine, model_id, det, ctx, reporter, fresh, hint)
            result.outcomes.append(outcome)
            if outcome.status in FINISHED:
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
            elif token_verdicts is not None:
                scope = tokens_with_final_verdict(engine, model_id, ref.alias or model,
                                                  token_verdicts)
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
        result.verdict = record_verdicts(
            engine, ScanContext(backend=be, vocab=vocab, categories=cats), model_id, reg,
            reporter, fresh)
        if result.verdict is not None and result.verdict.status in FINISHED:
            record_token_facts(engine, model_id, be, vocab, result.verdict.run_id, reporter)
        return result
    finally:
        be.close()
