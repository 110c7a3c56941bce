"""What a scan costs besides the model's work on many tokens, this tree against a baseline.

A scan of three tokens (`harness scan MODEL --tokens 100,200,300`, a fresh database each
time) still does everything a whole scan does once: Python start and imports, the model
load, storing the vocabulary, the static detectors on every token, the final verdict of every
token, the report. On a GPU these fixed costs are most of a whole scan of a small model (an
H200 ran SmolLM2's four stages in 10.4-11.8 s of a 31.7-35.4 s command), so they are measured
here, on this CPU, side by side: the baseline commit checked out with `git worktree`, both
trees run with this virtual environment, alternating, fastest of ``--rounds`` each.

    python benchmarks/fixed_costs.py smollm2 --baseline ca7fae9 --rounds 3 \
        --out benchmarks/results/fixed_costs_smollm2.json

With ``--own-caches`` each tree loads the model from its own copy (hard links) of the model
cache, for a change in what the cache holds: a tree that rewrites its copy leaves the other's
as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_scan import ROOT, child  # noqa: E402

from harness import paths  # noqa: E402

STAGE = re.compile(r"^\s+(\S+): .*\(([\d.]+) s, run \d+\)", re.M)
LOAD = re.compile(r"model loaded in ([\d.]+) s")


def one_scan(tree: Path, model: str, tokens: str, db: Path, cache: Path | None = None) -> dict:
    t0 = time.perf_counter()
    proc = child(tree, "cli", "scan", model, "--db", str(db), "--tokens", tokens, "--top", "3",
                 env={"HARNESS_CACHE": str(cache)} if cache else None)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    stages = {name: float(s) for name, s in STAGE.findall(out)}
    load = LOAD.search(out)
    return {"wall_s": round(wall, 2), "load_s": float(load.group(1)) if load else None,
            "stages_s": stages,
            "rest_s": round(wall - sum(stages.values()) - (float(load.group(1)) if load else 0),
                            2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--baseline", default="ca7fae9", help="commit to compare with")
    ap.add_argument("--tokens", default="100,200,300")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--own-caches", action="store_true",
                    help="each tree loads from its own hard-linked copy of the model cache")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.baseline], check=True, capture_output=True)
        caches: dict[str, Path | None] = {"baseline": None, "current": None}
        if args.own_caches:
            for label in caches:
                caches[label] = Path(tmp) / f"{label}-cache"
                shutil.copytree(paths.cache_dir(), caches[label], copy_function=os.link)
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "current": []}
            for r in range(args.rounds):
                for label, tree in (("baseline", base), ("current", ROOT)):
                    db = Path(tmp) / f"{label}-{r}.db"
                    runs[label].append(one_scan(tree, args.model, args.tokens, db,
                                                caches[label]))
                    print(label, json.dumps(runs[label][-1]), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           capture_output=True)
    best = {label: min(rs, key=lambda x: x["wall_s"]) for label, rs in runs.items()}
    report = {"model": args.model, "baseline": args.baseline, "tokens": args.tokens,
              "rounds": args.rounds, "own_caches": args.own_caches, "best": best, "runs": runs,
              "ratio": round(best["baseline"]["wall_s"] / best["current"]["wall_s"], 3)}
    print(json.dumps({k: report[k] for k in ("best", "ratio")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
