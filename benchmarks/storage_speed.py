"""Time storing results in SQLite and in PostgreSQL.

Two measurements per database, each in a fresh database:

- ``insert``: ``store.insert_findings`` of N synthetic findings (two runs of the SmolLM2
  vocabulary size, scores and a short evidence object each, as the static detectors write
  them), in the scan's batch size, without any model;
- ``scan`` (unless ``--insert-only``): ``harness scan smollm2 -d
  embedding-centroid,unembedding-cosine`` as a subprocess with the model cache warm (a first
  scan into a scratch SQLite database warms it), wall time and each detector's own time
  (which includes storing its findings).

PostgreSQL runs on a throwaway server (Debian's binaries, started as in the tests).

    .venv/bin/python benchmarks/storage_speed.py [--insert-only] [--repeat 3]

Writes benchmarks/results/storage_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import store  # noqa: E402
from harness.db import open_db  # noqa: E402
from harness.detector import FindingArrays  # noqa: E402
from tests import pg  # noqa: E402

VOCAB = 49_152  # SmolLM2's vocabulary
BATCH = 8_192  # the static detectors' chunk of findings per commit


def synthetic_batches(n: int) -> list[FindingArrays]:
    rng = np.random.default_rng(0)
    out = []
    for start in range(0, n, BATCH):
        ids = np.arange(start, min(start + BATCH, n))
        scores = rng.normal(size=len(ids))
        verdicts = np.where(scores < -3, "suspect", "ok")
        out.append(FindingArrays(ids, scores, verdicts, {"z": scores, "norm": scores * 2}))
    return out


def time_inserts(url: str, runs: int = 2) -> float:
    """Seconds to store ``runs`` runs of VOCAB findings, batch by batch, as the runner does."""
    engine = open_db(url)
    batches = synthetic_batches(VOCAB)
    with engine.begin() as conn:
        model = store.insert_model(conn, ref="bench", alias=None, backend="x",
                                   fingerprint=f"bench-{time.time()}", tokenizer_hash="t",
                                   vocab_size=VOCAB, meta={})
        run_ids = [store.insert_run(conn, model_id=model, detector=f"d{i}",
                                    detector_version="1", harness_version="b",
                                    suspicious_when="low", options={}, options_key="k",
                                    status="running") for i in range(runs)]
    t0 = time.perf_counter()
    for run_id in run_ids:
        for batch in batches:
            with engine.begin() as conn:
                store.insert_findings(conn, run_id, batch.rows())
    wall = time.perf_counter() - t0
    with engine.connect() as conn:
        assert sum(store.count_findings(conn, r) for r in run_ids) == runs * VOCAB
    engine.dispose()
    return wall


def timed_scan(url: str, home: Path) -> dict:
    env = {**os.environ, "HARNESS_HOME": str(home)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from harness.cli import main; main()",
                           "scan", "smollm2", "--top", "3", "--db", url,
                           "-d", "embedding-centroid,unembedding-cosine"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"scan failed: {proc.stderr[-2000:]}")
    runs = dict(re.findall(r"^\s+([\w-]+): .*\(([\d.]+) s, run", proc.stdout, re.M))
    load = float(re.search(r"model loaded in ([\d.]+) s", proc.stdout).group(1))
    return {"wall_s": round(wall, 2), "model_load_s": load,
            "detector_s": {k: float(v) for k, v in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--insert-only", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    why = pg.missing()
    if why:
        raise SystemExit(why)
    server = pg.Server()
    results: dict = {"machine": platform.platform(), "cpus": os.cpu_count(),
                     "findings": 2 * VOCAB, "repeat": args.repeat, "insert_s": {},
                     "scan": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)

            def fresh(kind: str, i: int) -> str:
                if kind == "sqlite":
                    return f"sqlite:///{tmp_path / f'{kind}-{i}.db'}"
                return server.new_database()[1]

            for kind in ("sqlite", "postgresql"):
                results["insert_s"][kind] = [round(time_inserts(fresh(kind, i)), 3)
                                             for i in range(args.repeat)]
            if not args.insert_only:
                timed_scan(f"sqlite:///{tmp_path / 'warm.db'}", tmp_path / "home")
                for kind in ("sqlite", "postgresql"):
                    results["scan"][kind] = [timed_scan(fresh(kind, 100 + i),
                                                        tmp_path / "home")
                                             for i in range(args.repeat)]
    finally:
        server.stop()
    out = ROOT / "benchmarks" / "results" / "storage_speed.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{2 * VOCAB:,} findings, best of {args.repeat}:")
    best = {k: min(v) for k, v in results["insert_s"].items()}
    print(f"  insert: sqlite {best['sqlite']:.2f} s, postgresql {best['postgresql']:.2f} s "
          f"({best['postgresql'] / best['sqlite']:.2f}x)")
    for kind, rows in results["scan"].items():
        det = min(sum(r["detector_s"].values()) for r in rows)
        wall = min(r["wall_s"] for r in rows)
        print(f"  scan {kind}: wall {wall:.1f} s, detectors (with their inserts) {det:.2f} s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
