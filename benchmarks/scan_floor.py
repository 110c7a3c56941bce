"""A finished default scan against the least work it could have done, stage by stage.

Reads the latest finished `repeat-screen` and `repeat-probe` runs of MODEL in DB (a default
scan: every token screened, the rest verified), counts the work each stage asked of the model
(per token, the prompts its evidence shows: new tokens after the shared prefix, and reads, each
a projection onto the vocabulary), and prices it at the float32 matrix-multiply rate this CPU
reaches now, on the model's own shapes (`default_scan.py`'s measure):

- `first_stage_bound`: the issue's physical bound of the first stage, the screen's first
  prompt (its new tokens and one read) for every vocabulary token;
- `least_work`: what any scan that gives the exact cascade's verdicts with this first stage
  must still do: the bound above; for each token a later screen prompt settled, that prompt;
  for each verified `ok` token, the verify-3 prompt that showed it repeated (one read); for
  each `glitch` token, all three verify-3 prompts whole (their greedy steps included);
- `least_work_scouted`: the same, with each glitch token at what the scan asked of it
  (where a scout stopped it, the prompt up to the scout's checkpoint);
- `asked`: the work the scan asked, the same count over every prompt its evidence shows (a
  prompt that settled a token counted with one read, a lower bound; scouts that stopped a
  token up to their checkpoint);
- `measured`: each stage's own time (`runs.wall_s`; with `--blocks`, the sum of its blocks'
  times, for a scan run in several processes).

Attention and everything but the matrix products are left out of the work, so every time
priced here is a lower bound; run it right after the scan, on the same machine, for the
ratio to mean something (this CPU's rate varies by 10-30 % from day to day).

    .venv/bin/python benchmarks/scan_floor.py smollm2 SCAN.db [--fixed-s S] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_scan import model_rate, shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def latest_run(conn: sqlite3.Connection, model: str, detector: str) -> tuple[int, float, dict]:
    """The latest finished run of ``detector`` on the model stored under alias ``model``."""
    row = conn.execute(
        "SELECT r.id, r.wall_s, r.options_json FROM runs r JOIN models m ON m.id = r.model_id "
        "WHERE r.detector = ? AND r.status = 'done' AND m.alias = ? "
        "ORDER BY r.id DESC LIMIT 1", (detector, model)).fetchone()
    if row is None:
        raise SystemExit(f"no finished {detector} run of {model} in the database")
    return row[0], row[1], json.loads(row[2])


def findings(conn: sqlite3.Connection, run_id: int) -> list[tuple[int, str, dict]]:
    return [(t, v, json.loads(e)) for t, v, e in conn.execute(
        "SELECT token_id, verdict, evidence_json FROM findings WHERE run_id = ?", (run_id,))]


def block_wall(conn: sqlite3.Connection, run_id: int) -> float | None:
    (total,) = conn.execute("SELECT sum(wall_s) FROM run_blocks WHERE run_id = ?",
                            (run_id,)).fetchone()
    return total


class Work:
    """Body positions and reads, priced at one rate."""

    def __init__(self) -> None:
        self.positions = 0
        self.reads = 0

    def add(self, positions: int, reads: int) -> None:
        self.positions += positions
        self.reads += reads

    def tflop(self, m: dict) -> float:
        return (2 * m["body"] * self.positions + 2 * m["rows"] * m["d"] * self.reads) / 1e12

    def seconds(self, m: dict, rate: float) -> float:
        return self.tflop(m) * 1e3 / rate

    def report(self, m: dict, rate: float) -> dict:
        return {"body_positions": self.positions, "reads": self.reads,
                "tflop": round(self.tflop(m), 2), "seconds": round(self.seconds(m, rate), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("db", type=Path)
    ap.add_argument("--blocks", action="store_true",
                    help="measured time: the sum of each stage's block times")
    ap.add_argument("--fixed-s", type=float, default=0.0,
                    help="the scan's time outside the screen and verification (model load, "
                         "static detectors, final verdict), added to the totals")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    m = shapes(args.model)
    screen_new, verify_new, scout_new = m["screen_prompts_new"], m["verify_new"], m["scouts_new"]
    with sqlite3.connect(args.db) as conn:
        s_id, s_wall, _ = latest_run(conn, args.model, "repeat-screen")
        v_id, v_wall, v_opts = latest_run(conn, args.model, "repeat-probe")
        if args.blocks:
            s_wall, v_wall = block_wall(conn, s_id) or s_wall, block_wall(conn, v_id) or v_wall
        screened, verified = findings(conn, s_id), findings(conn, v_id)
    steps = int(v_opts.get("steps", 3))
    s_labels = {lab: i for i, lab in enumerate(m["screen_labels"])}
    v_labels = {lab: i for i, lab in enumerate(m["verify_labels"])}

    bound, least, asked_s, asked_v = Work(), Work(), Work(), Work()
    bound.add(screen_new[0] * m["vocab"], m["vocab"])
    least.add(screen_new[0] * m["vocab"], m["vocab"])
    for _, verdict, ev in screened:
        asked = [s_labels[lab] for lab in ev.get("p", {})]
        for k in asked:
            asked_s.add(screen_new[k], 1)
        if verdict == "ok" and asked[-1] > 0:
            least.add(screen_new[asked[-1]], 1)
    scouted = Work()  # least_work, the glitch tokens at what their scouts let them cost
    scouted.add(least.positions, least.reads)
    glitch = 0
    for _, verdict, ev in verified:
        decided = ev.get("repeated_in")
        mine = Work()
        for lab in ev.get("p", {}):
            k = v_labels[lab]
            if lab == decided:
                mine.add(verify_new[k], 1)
            else:
                mine.add(verify_new[k] + steps - 1, steps)
        for lab in ev.get("scout", {}):
            mine.add(scout_new[v_labels[lab]], 1)
        asked_v.add(mine.positions, mine.reads)
        if verdict == "glitch":
            glitch += 1
            least.add(sum(verify_new) + len(verify_new) * (steps - 1), len(verify_new) * steps)
            scouted.add(mine.positions, mine.reads)
        elif decided is not None:
            least.add(verify_new[v_labels[decided]], 1)
            scouted.add(verify_new[v_labels[decided]], 1)

    rate = model_rate(m)
    asked_s_s, asked_v_s = asked_s.seconds(m, rate), asked_v.seconds(m, rate)
    measured = s_wall + v_wall
    report = {
        "model": args.model, "db": str(args.db), "machine": platform.machine(),
        "cpus": os.cpu_count(), "matmul_gflops": round(rate, 1),
        "tokens": {"screened": len(screened), "verified": len(verified), "glitch": glitch},
        "first_stage_bound": bound.report(m, rate),
        "least_work": least.report(m, rate),
        "least_work_scouted": scouted.report(m, rate),
        "asked": {"screen": asked_s.report(m, rate), "verification": asked_v.report(m, rate),
                  "seconds": round(asked_s_s + asked_v_s, 1)},
        "measured": {"screen_s": round(s_wall, 1), "verification_s": round(v_wall, 1),
                     "fixed_s": args.fixed_s,
                     "total_s": round(measured + args.fixed_s, 1)},
    }
    least_s = least.seconds(m, rate) + args.fixed_s
    report["ratios"] = {
        "screen_measured_over_asked": round(s_wall / asked_s_s, 2),
        "verification_measured_over_asked": round(v_wall / asked_v_s, 2),
        "asked_over_least": round((asked_s_s + asked_v_s) / least.seconds(m, rate), 2),
        "measured_over_least": round((measured + args.fixed_s) / least_s, 2),
        "least_with_fixed_s": round(least_s, 1)}
    print(json.dumps(report, indent=1))
    out = args.out or ROOT / "benchmarks" / "results" / f"scan_floor_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
