"""Helpers for the GPU session (`benchmarks/gpu_session.sh`): build a random GPT-2-small model
folder that the `hf` backend loads, and summarise a scan's database.

    python benchmarks/gpu_scan.py build FOLDER TOKENIZER_FOLDER [--layers 12]
    python benchmarks/gpu_scan.py summary DB OUT.json [--verdicts OUT.csv]

`build` saves `GPT2Config(n_layer=LAYERS)` (50,257 rows) with random weights
(`torch.manual_seed(0)`) and the given tokenizer, as `verify3_gpu.py` does. `summary` writes
each run's detector, status and wall time, the verdict counts and the glitch tokens; with
`--verdicts`, every token's final verdict and repeat probability as CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import sys
from pathlib import Path


def build(folder: Path, tokenizer: str, layers: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from verify3_gpu import build_model

    folder.mkdir(parents=True, exist_ok=True)
    print(json.dumps(build_model(folder, layers, tokenizer)))


def summary(db: Path, out: Path, verdicts: Path | None) -> None:
    con = sqlite3.connect(db)
    keys = ("detector", "status", "wall_s", "findings")
    runs = [dict(zip(keys, row, strict=True)) for row in con.execute(
        "SELECT detector, status, wall_s, (SELECT count(*) FROM findings f WHERE f.run_id = r.id)"
        " FROM runs r ORDER BY id")]
    counts = dict(con.execute("SELECT verdict, count(*) FROM final_verdicts GROUP BY verdict"))
    glitch = [{"id": i, "text": t, "p": p} for i, t, p in con.execute(
        "SELECT token_id, text, repeat_prob FROM glitch_tokens ORDER BY repeat_prob, token_id")]
    out.write_text(json.dumps({"runs": runs, "verdicts": counts, "glitch": glitch}, indent=1))
    print(json.dumps({"runs": runs, "verdicts": counts, "glitch_count": len(glitch)}))
    if verdicts:
        with verdicts.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(("token_id", "verdict", "repeat_prob"))
            w.writerows(con.execute(
                "SELECT token_id, verdict, repeat_prob FROM final_verdicts ORDER BY token_id"))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("folder", type=Path)
    b.add_argument("tokenizer")
    b.add_argument("--layers", type=int, default=12)
    s = sub.add_parser("summary")
    s.add_argument("db", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--verdicts", type=Path)
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.folder, args.tokenizer, args.layers)
    else:
        summary(args.db, args.out, args.verdicts)


if __name__ == "__main__":
    main()
