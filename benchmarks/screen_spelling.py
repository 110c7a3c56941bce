"""The screen's spelling rule, side by side: the whole default scan with it and without it.

`harness scan MODEL` runs in a fresh database per command, alternating the default
(`greedy_spells` on: the word-pair list settles a token only where the model's likeliest next
token begins spelling it) and `-o repeat-screen.greedy_spells=false` (probability alone, as
before the rule), `--rounds` times each, the model cache warm. Per command: the wall time, each
stage's own time (`runs.wall_s`), the tokens the screen left unsettled, the tokens verified and
the `glitch` count; with `--reference-db` (the exact cascade on every token, see
`benchmarks/fidelity.py`), also the reference's glitch tokens the screen settled.

    .venv/bin/python benchmarks/screen_spelling.py smollm2 --rounds 1 --reference-db REF.db

Writes benchmarks/results/screen_spelling_<model>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from harness.db import open_db

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import latest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / ".venv" / "bin" / "harness"
SETTINGS = {"rule": [], "no_rule": ["-o", "repeat-screen.greedy_spells=false"]}


def reference_glitch(db: Path) -> set[int]:
    """Tokens the exact cascade calls glitch (each token's latest finding, as
    `benchmarks/fidelity.py --stored` reads the reference)."""
    engine = open_db(f"sqlite:///{db}")
    with engine.connect() as conn:
        model_id = conn.execute(text("SELECT id FROM models")).scalar_one()
    found = latest(engine, model_id, "repeat-probe", unfinished=True)
    return {t for t, (verdict, _) in found.items() if verdict == "glitch"}


def one_scan(model: str, extra: list[str], work: Path, glitch: set[int] | None) -> dict:
    db = work / "results.db"
    db.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(HARNESS), "scan", model, "--db", str(db), *extra],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"harness scan failed: {proc.stderr.strip().splitlines()[-1]}")
    with sqlite3.connect(db) as conn:
        stages = dict(conn.execute("SELECT detector, wall_s FROM runs"))
        runs = dict(conn.execute("SELECT detector, id FROM runs"))
        unsettled = {t for (t,) in conn.execute(
            "SELECT token_id FROM findings WHERE run_id = ? AND verdict != 'ok'",
            (runs["repeat-screen"],))}
        verified = conn.execute("SELECT count(*) FROM findings WHERE run_id = ?",
                                (runs["repeat-probe"],)).fetchone()[0]
        found = {t for (t,) in conn.execute(
            "SELECT token_id FROM findings WHERE run_id = ? AND verdict = 'glitch'",
            (runs["verdict"],))}
    out = {"wall_s": round(wall, 1),
           "stages_s": {k: round(v, 1) for k, v in stages.items()},
           "unsettled": len(unsettled), "verified": verified, "glitch": len(found)}
    if glitch is not None:
        out["reference_glitch_found"] = len(found & glitch)
        out["reference_glitch_settled_by_screen"] = sorted(glitch - unsettled)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--reference-db", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    glitch = reference_glitch(args.reference_db) if args.reference_db else None
    report: dict = {"model": args.model, "machine": platform.machine(),
                    "rule": [], "no_rule": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            order = ("no_rule", "rule") if n % 2 == 0 else ("rule", "no_rule")
            for name in order:
                got = one_scan(args.model, SETTINGS[name], Path(tmp), glitch)
                report[name].append(got)
                print(name, json.dumps(got), flush=True)
    best = {k: min(report[k], key=lambda r: r["wall_s"]) for k in SETTINGS}
    report["wall_ratio_rule_over_no_rule"] = round(best["rule"]["wall_s"]
                                                   / best["no_rule"]["wall_s"], 3)
    print(json.dumps({k: report[k] for k in ("wall_ratio_rule_over_no_rule",)}))
    out = args.out or ROOT / "benchmarks" / "results" / f"screen_spelling_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
