"""A screen option, side by side: the whole default scan, and the same with one option changed.

`harness scan MODEL` runs in a fresh database per command, alternating the default and
`-o OPTION=VALUE` (`--against`; for instance `repeat-screen.greedy_spells=false`, the word-pair
list settling on probability alone as before the spelling rule, or
`repeat-screen.first_threshold=0.02`, the word-pair list settling at the screen's threshold
as before its own bar), `--rounds` times each, the model cache warm. Per command: the wall
time, each stage's own time (`runs.wall_s`), the tokens the screen left unsettled, the tokens
verified and the `glitch` count; with `--reference-db` (the exact cascade on every token, see
`benchmarks/fidelity.py`) or `--truth` (a file of its glitch ids), also the reference's glitch
tokens found and those the screen settled.

    .venv/bin/python benchmarks/screen_options.py smollm2 \
        --against repeat-screen.first_threshold=0.02 --rounds 1 --truth GLITCH_IDS.txt \
        --out benchmarks/results/first_threshold_scan_smollm2.json

Writes benchmarks/results/screen_options_<model>.json (or `--out`) and prints it.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import reference_glitch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / ".venv" / "bin" / "harness"


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
    ap.add_argument("--against", default="repeat-screen.greedy_spells=false",
                    metavar="OPTION=VALUE", help="the option the default is compared with")
    ap.add_argument("--rounds", type=int, default=1)
    truth = ap.add_mutually_exclusive_group()
    truth.add_argument("--reference-db", type=Path)
    truth.add_argument("--truth", type=Path, help="the reference's glitch ids, one a line")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    glitch = reference_glitch(args.reference_db, args.truth)
    settings = {"default": [], "against": ["-o", args.against]}
    runs: dict[str, list[dict]] = {"default": [], "against": []}
    report: dict = {"model": args.model, "machine": platform.machine(),
                    "against": args.against, "runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            order = ("against", "default") if n % 2 == 0 else ("default", "against")
            for name in order:
                got = one_scan(args.model, settings[name], Path(tmp), glitch)
                runs[name].append(got)
                print(name, json.dumps(got), flush=True)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    report["wall_ratio_default_over_against"] = round(best["default"]["wall_s"]
                                                      / best["against"]["wall_s"], 3)
    print(json.dumps({"wall_ratio_default_over_against":
                      report["wall_ratio_default_over_against"]}))
    out = args.out or ROOT / "benchmarks" / "results" / f"screen_options_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
