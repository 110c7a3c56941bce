"""Does the default scan find what the exact cascade finds? The first stage's recall against a
reference built with the exact cascade, and the agreement of the final verdicts.

The reference is `repeat-probe` with its scouts off (`scout_below=0`: Land & Bartolo's three
prompts in full for every token, cheapest first, a token leaving once one prompt shows the model
repeating it; no first stage) on every token of the vocabulary (`--all`), or on every token a
static detector flags plus a random sample of `--sample` tokens. It is built once into
`--reference-db` (a killed build resumes) and reused. The default scan (`harness scan MODEL`)
goes into `--scan-db`, also reused when finished there.

Over the reference's tokens:

- first stage: of the reference's glitch tokens, the share the scan sent on to verification
  (the screen did not settle it, or a static detector flagged it), and the share the screen
  alone did not settle; the share of the reference's ok tokens the screen settled;
- verdicts: the scan's final verdict against the reference's, as a table, with precision and
  recall of `glitch`; for a sample reference also on the random sample alone (an unbiased
  estimate for the whole vocabulary);
- the scouts: on the tokens both verified, how often the scan's `repeat-probe` (scouts on)
  agrees with the exact cascade.

With `--on-reference` the default pipeline runs on the reference's tokens only, stage by stage
as `harness scan` runs it on the whole vocabulary (static detectors on every token, the screen
on these tokens, `repeat-probe` with its scouts on what the screen did not settle and what a
static detector flagged): the same verdicts for these tokens at a fraction of the time, and
measured stage rates from which the whole-vocabulary scan is projected.

    .venv/bin/python benchmarks/fidelity.py smollm2 --all
    .venv/bin/python benchmarks/fidelity.py gemma3-270m --sample 3000 --flagged-sample 1000 \
        --on-reference

Writes benchmarks/results/fidelity_<model>.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
from sqlalchemy import text

from harness.db import open_db
from harness.plugins import registry
from harness.runner import flagged_tokens, scan

ROOT = Path(__file__).resolve().parents[1]
EXACT = {"repeat-probe": {"scout_below": 0}}


def latest(engine, model_id: int, detector: str, unfinished: bool = False
           ) -> dict[int, tuple[str, float | None]]:
    """Per token, the verdict and score of the latest finished run of ``detector`` that
    examined it (with ``unfinished``, of any run: an interrupted reference build counts for
    the tokens it finished)."""
    out: dict[int, tuple[str, float | None]] = {}
    done = "" if unfinished else "AND r.status = 'done' "
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT f.token_id, f.verdict, f.score FROM findings f JOIN runs r ON r.id = "
            f"f.run_id WHERE r.model_id = :m AND r.detector = :d {done}"
            "ORDER BY r.id"), {"m": model_id, "d": detector}).all()
    for t, v, s in rows:
        out[int(t)] = (v, s)
    return out


def reference_glitch(db: Path | None = None, truth: Path | None = None) -> set[int] | None:
    """The reference's glitch tokens: those the exact cascade calls glitch in a reference
    database (each token's latest finding, as ``--stored`` reads it), or the ids of a file,
    one a line; None given neither."""
    if truth is not None:
        return {int(t) for t in truth.read_text().split()}
    if db is None:
        return None
    engine = open_db(f"sqlite:///{db}")
    with engine.connect() as conn:
        model_id = conn.execute(text("SELECT id FROM models")).scalar_one()
    found = latest(engine, model_id, "repeat-probe", unfinished=True)
    return {t for t, (verdict, _) in found.items() if verdict == "glitch"}


def latest_run(engine, model_id: int, detector: str) -> int | None:
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT max(id) FROM runs WHERE model_id = :m AND detector = :d AND status = 'done'"
        ), {"m": model_id, "d": detector}).scalar()


def build_reference(model: str, db: Path, full: bool, sample: int, seed: int,
                    flagged_sample: int | None) -> dict:
    engine = open_db(f"sqlite:///{db}")
    t0 = time.perf_counter()
    static = scan(model, engine, registry().default_static())
    flagged = flagged_tokens(engine, [o.run_id for o in static.outcomes])
    rng = np.random.default_rng(seed)
    random = np.sort(rng.choice(static.vocab_size, min(sample, static.vocab_size),
                                replace=False))
    if flagged_sample is not None and flagged_sample < len(flagged):
        flagged = np.sort(rng.choice(flagged, flagged_sample, replace=False))
    if full:
        result = scan(model, engine, ["repeat-probe"], detector_options=EXACT, full=True)
    else:
        tokens = np.union1d(flagged, random).tolist()
        result = scan(model, engine, ["repeat-probe"], detector_options=EXACT, tokens=tokens)
    wall = time.perf_counter() - t0
    run = next(o for o in result.outcomes if o.detector == "repeat-probe")
    return {"model_id": result.model_id, "vocab": result.vocab_size, "wall_s": round(wall, 1),
            "run": run.run_id, "status": run.status, "flagged": flagged.tolist(),
            "random": random.tolist(), "engine": engine}


def stored_reference(db: Path, sample: int, seed: int) -> dict:
    """A reference built earlier (by this script or `harness scan MODEL --full -d
    repeat-probe -o repeat-probe.scout_below=0`), read as it is."""
    engine = open_db(f"sqlite:///{db}")
    with engine.connect() as conn:
        model_id, vocab = conn.execute(text("SELECT id, vocab_size FROM models")).one()
        run, wall = conn.execute(text(
            "SELECT id, wall_s FROM runs WHERE detector = 'repeat-probe' ORDER BY id DESC"
        )).first()
    rng = np.random.default_rng(seed)
    random = np.sort(rng.choice(vocab, min(sample, vocab), replace=False))
    return {"model_id": model_id, "vocab": vocab, "wall_s": wall, "run": run,
            "status": "stored", "flagged": [], "random": random.tolist(), "engine": engine}


def scan_on(model: str, engine, tokens: list[int]) -> tuple[object, dict]:
    """The default pipeline, stage by stage, on ``tokens`` only; the last scan's result and
    the stages' sizes, walls and rates."""
    static = scan(model, engine, registry().default_static())
    screen = scan(model, engine, [registry().default_screen()], tokens=tokens)
    runs = [o.run_id for o in static.outcomes + screen.outcomes]
    verify = np.intersect1d(flagged_tokens(engine, runs), tokens).tolist()
    result = scan(model, engine, ["repeat-probe"], tokens=verify)
    walls = {o.detector: o.wall_s for o in static.outcomes + screen.outcomes
             + result.outcomes}
    stages = {"screened": len(tokens), "verified": len(verify),
              "stages_s": {k: round(v, 1) for k, v in walls.items()},
              "screen_tok_per_s": round(len(tokens) / walls[registry().default_screen()], 1),
              "verify_tok_per_s": round(len(verify) / walls["repeat-probe"], 3)
              if verify else None}
    return result, stages


def confusion(pairs: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = {}
    for ref, got in pairs:
        table.setdefault(ref, Counter())[got] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


def precision_recall(pairs: list[tuple[str, str]], weights: list[float] | None = None
                     ) -> dict[str, float | int]:
    """Counts and precision / recall of ``glitch``; with ``weights`` (a token's share of the
    vocabulary it stands for), counts estimated for the whole vocabulary."""
    w = weights or [1.0] * len(pairs)
    tp = sum(x for (r, g), x in zip(pairs, w, strict=True) if r == "glitch" and g == "glitch")
    fp = sum(x for (r, g), x in zip(pairs, w, strict=True) if r != "glitch" and g == "glitch")
    fn = sum(x for (r, g), x in zip(pairs, w, strict=True) if r == "glitch" and g != "glitch")
    return {"tp": round(tp, 1), "fp": round(fp, 1), "fn": round(fn, 1),
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None}


def stratum_weights(tokens: list[int], bounds: list[int], vocab: int) -> dict[int, float]:
    """A reference built in parts, each part a uniform sample of one id range (``bounds``
    split 0..vocab): per token, how many vocabulary tokens of its range it stands for."""
    edges = [0, *bounds, vocab]
    ids = np.asarray(tokens)
    out: dict[int, float] = {}
    for lo, hi in zip(edges, edges[1:], strict=False):
        inside = ids[(ids >= lo) & (ids < hi)]
        for t in inside.tolist():
            out[t] = (hi - lo) / len(inside)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--all", action="store_true", help="reference on every token")
    ap.add_argument("--sample", type=int, default=3000, help="random tokens in the reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-db", type=Path)
    ap.add_argument("--scan-db", type=Path)
    ap.add_argument("--flagged-sample", type=int,
                    help="of the static detectors' flagged tokens, only this many (random)")
    ap.add_argument("--reference-only", action="store_true", help="build it, then stop")
    ap.add_argument("--stored", action="store_true",
                    help="read the reference database as it is (every exact run, finished or not)")
    ap.add_argument("--strata", help="comma-separated token ids splitting the vocabulary into "
                    "ranges that the reference sampled uniformly, at different rates: "
                    "precision and recall are also estimated for the whole vocabulary")
    ap.add_argument("--on-reference", action="store_true",
                    help="run the default pipeline on the reference's tokens only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = ROOT / "benchmarks" / "results"
    ref_db = args.reference_db or work / f"reference_{args.model}.db.tmp"
    scan_db = args.scan_db or work / f"default_scan_{args.model}.db.tmp"

    if args.stored:
        ref = stored_reference(ref_db, args.sample, args.seed)
    else:
        ref = build_reference(args.model, ref_db, args.all, args.sample, args.seed,
                              args.flagged_sample)
    print(f"reference: run {ref['run']} ({ref['status']}), {ref['wall_s']} s")
    if args.reference_only:
        return
    engine = open_db(f"sqlite:///{scan_db}")
    exact = latest(ref["engine"], ref["model_id"], "repeat-probe", unfinished=args.stored)
    t0 = time.perf_counter()
    stages = None
    if args.on_reference:
        result, stages = scan_on(args.model, engine, sorted(exact))
    else:
        result = scan(args.model, engine)
    scan_wall = time.perf_counter() - t0
    mid = result.model_id
    screen = latest(engine, mid, "repeat-screen")
    verified = latest(engine, mid, "repeat-probe")
    final = latest(engine, mid, "verdict")
    tokens = sorted(exact)
    if stages:
        # the whole-vocabulary scan from the measured rates: the screen on every token, the
        # cascade on the random sample's unsettled share of the rest plus every static flag
        static_runs = (latest_run(engine, mid, d) for d in registry().default_static())
        static_flags = set(flagged_tokens(engine, [o for o in static_runs if o]).tolist())
        rnd = [t for t in ref["random"] if t in screen]
        unsettled = (sum(screen[t][0] != "ok" and t not in static_flags for t in rnd)
                     / len(rnd)) if rnd else 0.0
        n_verify = len(static_flags) + unsettled * (result.vocab_size - len(static_flags))
        stages["projected_whole_vocabulary"] = {
            "verify_tokens": round(n_verify),
            "screen_s": round(result.vocab_size / stages["screen_tok_per_s"]),
            "verify_s": round(n_verify / stages["verify_tok_per_s"])
            if stages["verify_tok_per_s"] else None}
    ref_glitch = [t for t in tokens if exact[t][0] == "glitch"]
    ref_ok = [t for t in tokens if exact[t][0] == "ok"]
    strong = [t for t in ref_glitch if (exact[t][1] or 0) < 1e-3]

    weights = (stratum_weights(tokens, [int(x) for x in args.strata.split(",")],
                               result.vocab_size) if args.strata else None)

    def share(sel: list[int], pred) -> float | None:
        return round(sum(map(pred, sel)) / len(sel), 4) if sel else None

    sent = share(ref_glitch, lambda t: t in verified)
    unsettled = share(ref_glitch, lambda t: screen.get(t, ("ok",))[0] != "ok")
    random = set() if args.all else set(ref["random"])
    pairs = [(exact[t][0], final[t][0]) for t in tokens]
    pairs_random = [(exact[t][0], final[t][0]) for t in tokens if t in random]
    both = [t for t in tokens if t in verified]
    agree = share(both, lambda t: verified[t][0] == exact[t][0])
    report = {
        "model": args.model, "machine": platform.machine(),
        "reference": {"tokens": len(tokens), "glitch": len(ref_glitch),
                      "strong_glitch": len(strong), "whole_vocabulary": args.all,
                      "random_sample": len(random), "static_flagged": len(ref["flagged"]),
                      "wall_s_this_call": ref["wall_s"],
                      # the ids themselves: the reference database is a scratch file
                      "glitch_ids": {t: exact[t][1] for t in ref_glitch}},
        "default_scan": {"wall_s_this_call": round(scan_wall, 1), "vocab": result.vocab_size,
                         "verified": len(verified),
                         "glitch": sum(v == "glitch" for t, (v, _) in final.items()
                                       if not args.on_reference or t in exact),
                         "stages_s": {o.detector: round(o.wall_s, 1)
                                      for o in result.outcomes},
                         "on_reference_tokens_only": stages},
        "first_stage": {
            "recall_sent_to_verification": sent,
            "recall_screen_alone": unsettled,
            "recall_sent_strong": share(strong, lambda t: t in verified),
            "missed": [t for t in ref_glitch if t not in verified],
            "ok_settled_by_screen": share(ref_ok, lambda t: screen.get(t, ("",))[0] == "ok"),
            "recall_sent_whole_vocabulary_estimate": precision_recall(
                [(exact[t][0], "glitch" if t in verified else "ok") for t in tokens],
                [weights[t] for t in tokens])["recall"] if weights else None,
        },
        "verdicts": {"confusion_reference_by_scan": confusion(pairs),
                     "glitch": precision_recall(pairs),
                     "glitch_whole_vocabulary_estimate": precision_recall(
                         pairs, [weights[t] for t in tokens]) if weights else None,
                     "recall_strong_whole_vocabulary_estimate": precision_recall(
                         [(exact[t][0] if t in strong else "ok", final[t][0]) for t in tokens],
                         [weights[t] for t in tokens])["recall"] if weights else None,
                     "glitch_random_sample": precision_recall(pairs_random) if random else None},
        "scouts": {"tokens_verified_by_both": len(both), "verdict_agreement": agree,
                   "disagree": [t for t in both if verified[t][0] != exact[t][0]]},
    }
    out = args.out or work / f"fidelity_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("reference", "default_scan", "first_stage",
                                             "scouts")}, indent=2))
    print(json.dumps(report["verdicts"], indent=2))


if __name__ == "__main__":
    main()
