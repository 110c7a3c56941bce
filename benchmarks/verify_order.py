"""Verification ordered by the screen's readings, side by side with the fixed order.

Takes a database holding a finished default scan (`harness scan MODEL --db DB`) and runs the
verifier (`repeat-probe`) again on exactly the tokens that scan verified, in a copy of the
database per run, alternating `-o repeat-probe.screen=` (every token in cost order: the short
assistant prompt, the 101 repeats, the twenty trials) and the default (of the two long prompts,
a token runs first the one whose opening the screen read higher). Per run: the verifier's
own time (`runs.wall_s`), how many tokens each prompt was asked of, and the verdicts; the
verdicts of both orders must agree token for token.

    .venv/bin/python benchmarks/verify_order.py smollm2 --db SCAN.db --rounds 1

Writes benchmarks/results/verify_order_<model>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

from harness.db import open_db
from harness.runner import scan

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"fixed": "", "screen": "repeat-screen"}


def verified_tokens(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        run = conn.execute("SELECT max(id) FROM runs WHERE detector = 'repeat-probe' "
                           "AND status = 'done'").fetchone()[0]
        if run is None:
            raise SystemExit(f"{db} holds no finished repeat-probe run: scan the model first")
        return [t for (t,) in conn.execute(
            "SELECT token_id FROM findings WHERE run_id = ? ORDER BY token_id", (run,))]


def one_run(model: str, db: Path, tokens: list[int], screen: str) -> dict:
    t0 = time.perf_counter()
    result = scan(model, open_db(f"sqlite:///{db}"), ["repeat-probe"], fresh=True,
                  tokens=tokens, detector_options={"repeat-probe": {"screen": screen}})
    wall = time.perf_counter() - t0
    run_id = next(o.run_id for o in result.outcomes if o.detector == "repeat-probe")
    with sqlite3.connect(db) as conn:
        wall_s = conn.execute("SELECT wall_s FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
        rows = conn.execute("SELECT token_id, verdict, evidence_json FROM findings "
                            "WHERE run_id = ?", (run_id,)).fetchall()
    asked: Counter[str] = Counter()
    for _, _, evidence in rows:
        ev = json.loads(evidence)
        asked.update(set(ev.get("p", {})) | set(ev.get("scout", {})))
    return {"wall_s_command": round(wall, 1), "verify_s": round(wall_s, 1),
            "tokens": len(rows), "asked": dict(sorted(asked.items())),
            "verdicts": dict(Counter(v for _, v, _ in rows)),
            "_by_token": {t: v for t, v, _ in rows}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--db", type=Path, required=True, help="a database with a finished scan")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tokens = verified_tokens(args.db)
    report: dict = {"model": args.model, "machine": f"{platform.machine()}",
                    "tokens": len(tokens), "fixed": [], "screen": []}
    verdicts: dict[str, dict[int, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            for name in (("fixed", "screen") if n % 2 == 0 else ("screen", "fixed")):
                copy = Path(tmp) / "scan.db"
                shutil.copy(args.db, copy)
                got = one_run(args.model, copy, tokens, SETTINGS[name])
                verdicts[name] = got.pop("_by_token")
                report[name].append(got)
                print(name, json.dumps(got), flush=True)
    differ = sorted(t for t in verdicts["fixed"] if verdicts["fixed"][t] != verdicts["screen"][t])
    best = {k: min(r["verify_s"] for r in report[k]) for k in SETTINGS}
    report["verify_ratio_screen_over_fixed"] = round(best["screen"] / best["fixed"], 3)
    report["verdicts_that_differ"] = differ
    print(json.dumps({k: report[k] for k in ("verify_ratio_screen_over_fixed",
                                              "verdicts_that_differ")}))
    out = args.out or ROOT / "benchmarks" / "results" / f"verify_order_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
