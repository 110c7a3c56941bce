"""How good the scan's estimate is, with blocks claimed in id order (the order before
``store.claim_order``) and in the spread order: replayed from the per-block wall times that a
finished scan stored in its database (``run_blocks.wall_s``), so one real scan measures both.

A stage's estimate is its first blocks' rate times the stage's tokens; the ratio printed is
that estimate over the stage's measured time (1.0 is exact; below 1, the scan promised too
little). Blocks that ran beside other work can be given as ``--disturbed RUN:BLOCK,...``;
they count at the median of the run's other blocks.

    .venv/bin/python benchmarks/claim_order.py G.db --name gemma3-270m

Writes benchmarks/results/claim_order_<name>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import numpy as np

from harness.store import claim_order

FIRST = (1, 2, 3, 5)  # estimates after this many blocks


def estimates(n_tokens: np.ndarray, wall: np.ndarray, order: list[int]) -> dict[str, float]:
    """Per k in FIRST, the estimate from the first k blocks of ``order`` over the truth."""
    out = {}
    for k in FIRST:
        if k > len(order):
            break
        first = order[:k]
        rate = n_tokens[first].sum() / wall[first].sum()
        out[f"after {k}"] = round(float(n_tokens.sum() / rate / wall.sum()), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db", help="a SQLite results database with a finished scan")
    ap.add_argument("--name", required=True, help="the model's name in the result file")
    ap.add_argument("--disturbed", default="", help="RUN:BLOCK,... that ran beside other work")
    args = ap.parse_args()
    disturbed = {tuple(int(x) for x in item.split(":")) for item in args.disturbed.split(",")
                 if item}
    conn = sqlite3.connect(args.db)
    runs = conn.execute("SELECT r.id, r.detector FROM runs r WHERE r.status = 'done' AND "
                        "(SELECT count(*) FROM run_blocks b WHERE b.run_id = r.id) > 1 "
                        "ORDER BY r.id").fetchall()
    result: dict = {"model": args.name, "db": Path(args.db).name, "stages": {}}
    for run_id, detector in runs:
        rows = conn.execute("SELECT block, n_tokens, wall_s FROM run_blocks WHERE run_id = ? "
                            "ORDER BY block", (run_id,)).fetchall()
        if any(w is None for _, _, w in rows):
            continue  # a block finished by no one's clock: nothing to replay
        n_tokens = np.array([n for _, n, _ in rows], dtype=float)
        wall = np.array([w for _, _, w in rows], dtype=float)
        bad = np.array([(run_id, b) in disturbed for b, _, _ in rows])
        if bad.any():
            wall[bad] = np.median(wall[~bad])
        result["stages"][detector] = {
            "blocks": len(rows), "tokens": int(n_tokens.sum()),
            "measured_s": round(float(wall.sum()), 1), "disturbed_blocks": int(bad.sum()),
            "id_order": estimates(n_tokens, wall, list(range(len(rows)))),
            "claim_order": estimates(n_tokens, wall, claim_order(len(rows))),
        }
    out = Path(__file__).parent / "results" / f"claim_order_{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
