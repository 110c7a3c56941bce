"""What a higher settle bar for the screen's first prompt costs, and what it finds.

The screen's first prompt (`pair-list`, a list of words each written twice) settles about 97 %
of the vocabulary by itself. Without its spelling rule (`greedy_spells=false`) two glitch
tokens pass it on SmolLM2: ` solely` (0.11 there, 0.0014 at most in Land & Bartolo's protocol;
the rule catches it, the model saying `only`) and `apeake` (0.036; 0.0070). A higher bar for
that prompt alone sends the tokens between the screen's threshold and the bar on to the
screen's other prompts (`repeats-6`, `input-output-2`), and what those leave to verification.
Read against a scan whose first prompt settled tokens on probability alone, this is the cost
of the bar route; against a default scan, the cost on top of the spelling rule.

From a finished scan of one model (`--scan-db`; the screen's evidence holds every token's
pair-list probability), for every token the first prompt settled below the highest `--bars`:

- the screen's other prompts, timed (after a warm-up), and the tokens they leave unsettled;
- `repeat-probe` (the default verifier, scouts on) on those, timed, and its verdicts;
- per bar: tokens sent on, the screen's added time and the verifier's (summed over the tokens
  below the bar), the added `glitch` verdicts, and which of them the reference
  (`--reference-db`, the exact cascade on every token, or `--truth`, a file of its glitch
  ids) also calls glitch.

The first prompt's bar is now the screen's `first_threshold` (0.05): run on a scan made before
it (`repeat-screen` version 3, which settled at 0.02), this measures what the bar costs.

    .venv/bin/python benchmarks/first_prompt_bar.py smollm2 --scan-db SCAN.db \
        (--reference-db REF.db | --truth GLITCH_IDS.txt) --bars 0.05,0.1,0.12,0.15,0.2

Writes benchmarks/results/first_prompt_bar_<model>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sqlalchemy import text

from detectors.repeat_probe import RepeatProbe
from detectors.repeat_screen import RepeatScreen
from harness.db import open_db
from harness.detector import ScanContext
from harness.plugins import registry
from harness.refs import resolve
from harness.runner import load_backend
from probes import SCREEN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import reference_glitch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(detector, ctx: ScanContext, ids: list[int]) -> tuple[dict, dict[int, float]]:
    """Findings by token, and each token's share of the wall time (its batch's time spread
    evenly over the batch's tokens: batches are small, so a bar's sum is close)."""
    detector.prepare(ctx)
    found: dict = {}
    cost: dict[int, float] = {}
    size = 64
    for start in range(0, len(ids), size):
        part = np.array(ids[start: start + size], dtype=np.int64)
        t0 = time.perf_counter()
        got = [f for batch in detector.run(ctx, part) for f in batch]
        share = (time.perf_counter() - t0) / len(part)
        for f in got:
            found[f.token_id] = f
            cost[f.token_id] = share
    return found, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--scan-db", type=Path, required=True)
    truth = ap.add_mutually_exclusive_group()
    truth.add_argument("--reference-db", type=Path)
    truth.add_argument("--truth", type=Path, help="the reference's glitch ids, one a line")
    ap.add_argument("--bars", default="0.05,0.1,0.12,0.15,0.2")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    bars = sorted(float(b) for b in args.bars.split(","))
    reg = registry()
    spec = resolve(args.model, reg, None)

    scan_db = open_db(f"sqlite:///{args.scan_db}")
    with scan_db.connect() as conn:
        model_id = conn.execute(text("SELECT id FROM models")).scalar_one()
        run_id = conn.execute(text(
            "SELECT max(id) FROM runs WHERE model_id = :m AND detector = 'repeat-screen' "
            "AND status = 'done'"), {"m": model_id}).scalar_one()
        rows = conn.execute(text(
            "SELECT token_id, json_extract(evidence_json, '$.p.\"pair-list\"') FROM findings "
            "WHERE run_id = :r AND verdict = 'ok' AND "
            "json_extract(evidence_json, '$.repeated_in') = 'pair-list'"), {"r": run_id}).all()
    threshold = RepeatScreen.defaults["threshold"]
    pair = {int(t): float(p) for t, p in rows if p is not None and p < bars[-1]}
    band = sorted(pair)
    ref_glitch = reference_glitch(args.reference_db, args.truth)

    be = load_backend(spec, reg)
    ctx = ScanContext(backend=be, vocab=be.vocab(), categories=np.array([]))
    # the spelling rule and the first prompt's bar are the first prompt's
    rest = RepeatScreen(greedy_spells=False, first_threshold=0.0)
    rest.probe_set = replace(SCREEN, templates=SCREEN.templates[1:], labels=SCREEN.labels[1:])
    timed(rest, ctx, band[:8])  # warm-up: prefix caches, allocator
    print(f"{len(band)} tokens settled by pair-list below {bars[-1]}", flush=True)
    t0 = time.perf_counter()
    screened, screen_cost = timed(rest, ctx, band)
    screen_s = time.perf_counter() - t0
    left = [t for t in band if screened[t].verdict != "ok"]
    print(f"other prompts: {screen_s:.1f} s, {len(left)} unsettled", flush=True)
    t0 = time.perf_counter()
    checked, verify_cost = timed(RepeatProbe(), ctx, left)
    verify_s = time.perf_counter() - t0
    glitch = {t for t, f in checked.items() if f.verdict == "glitch"}
    print(f"verification: {verify_s:.1f} s, {len(glitch)} glitch", flush=True)

    vocab = ctx.vocab
    per_bar = []
    for bar in bars:
        sent = [t for t in band if pair[t] < bar]
        found = sorted(t for t in sent if t in glitch)
        per_bar.append({
            "bar": bar, "sent_on": len(sent),
            "sent_share_of_vocabulary": round(len(sent) / len(vocab), 4),
            "screen_added_s": round(sum(screen_cost[t] for t in sent), 1),
            "unsettled": sum(1 for t in sent if t in checked),
            "verify_added_s": round(sum(verify_cost.get(t, 0.0) for t in sent), 1),
            "glitch_added": [[t, vocab.text[t], round(pair[t], 4)] for t in found],
            **({} if ref_glitch is None else {
                "in_reference": sum(1 for t in found if t in ref_glitch),
                "reference_glitch_in_band": sum(1 for t in sent if t in ref_glitch)})})
    report = {"model": args.model, "machine": platform.machine(), "vocab": len(vocab),
              "screen_threshold": threshold, "band_tokens": len(band),
              "screen_s": round(screen_s, 1), "unsettled": len(left),
              "verify_s": round(verify_s, 1), "glitch": len(glitch), "bars": per_bar}
    print(json.dumps(report, indent=2))
    out = args.out or ROOT / "benchmarks" / "results" / f"first_prompt_bar_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
