"""Would a higher `scout_below` cut what a glitch token costs without changing verdicts?

The verifier's long prompts have scouts (their first 16 repeats, their first 2 trials): a
token its scout reads below `scout_below` (1e-5) skips the long prompt. This compares, for
the tokens a default scan verified, the scouts' readings with what the long prompts decided:
how many glitch tokens a higher bar would spare a long prompt, and how many ordinary tokens
that prompt decided read below the bar at its scout (each a verdict a higher bar may turn).

    harness scan smollm2 --db SCAN.db                 # the default scan
    harness scan smollm2 --db SCOUTS.db -d repeat-probe -o repeat-probe.scout_below=1 \\
        --tokens "$(sqlite3 SCAN.db "SELECT group_concat(token_id) FROM latest_findings \\
                    WHERE detector = 'repeat-probe'")"
    .venv/bin/python benchmarks/scout_bar.py SCAN.db SCOUTS.db --model smollm2

With `scout_below=1` every token that reaches a long prompt stops at its scout, so SCOUTS.db
holds each one's scout reading. Writes benchmarks/results/scout_bar_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
LONG = ("repeats", "input-output")


def verifier_findings(path: Path) -> dict[int, tuple[str, dict]]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT token_id, verdict, evidence_json FROM latest_findings "
                          "WHERE detector = 'repeat-probe'").fetchall()
    return {t: (v, json.loads(e)) for t, v, e in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scan", type=Path, help="database of the default scan")
    ap.add_argument("scouts", type=Path, help="database of the scouts-only run")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    full, scouts = verifier_findings(args.scan), verifier_findings(args.scouts)
    glitch = [t for t, (v, _) in full.items() if v == "glitch"]
    report: dict = {"model": args.model, "verified": len(full), "glitch": len(glitch),
                    "prompts": {}}
    for label in LONG:
        def read(t: int, label: str = label) -> float | None:
            ev = scouts[t][1]
            return ev.get("scout", {}).get(label, ev["p"].get(label))

        g = sorted(x for t in glitch if (x := read(t)) is not None)
        decided = [t for t, (v, e) in full.items()
                   if v == "ok" and e.get("repeated_in") == label]
        o = sorted(x for t in decided if (x := read(t)) is not None)
        report["prompts"][label] = {
            "glitch_scout_reads": {"min": g[0], "median": g[len(g) // 2], "max": g[-1]},
            "ordinary_decided_by_it": len(decided),
            "their_lowest_scout_reads": o[:8],
            "bars": [{"scout_below": bar, "glitch_tokens_spared": sum(x < bar for x in g),
                      "ordinary_decided_below_bar": sum(x < bar for x in o)} for bar in BARS]}
        print(label, json.dumps(report["prompts"][label]), flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"scout_bar_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
