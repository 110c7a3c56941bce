"""Time one scan run by one process against the same scan shared by three processes, on a
PostgreSQL database (a throwaway server, as in the tests).

Two workloads, each in fresh databases, one process and then three started together:

- ``smollm2-screen``: SmolLM2 (hf backend), ``repeat-screen`` on every 4th token id (12,288
  tokens) in blocks of 512: compute-bound on this machine's cores. Three processes get one
  torch thread each (``OMP_NUM_THREADS=1``), one process every core.
- ``latency``: the tiny test GPT-2 with the probe-logging test backend waiting 0.5 s per
  probe call, the way a remote server's latency dominates (the openai backend against a
  fleet), ``repeat-probe`` on all 304 tokens in blocks of 8.

Each pair's verdicts must be equal and its scores equal to 1e-4 (checked; torch's sums
differ in the last bits between one thread and two, so scores need not be equal to the
bit where the thread counts differ); the timings are wall times of the whole
``harness scan`` command (the slowest of the three processes), model load included.

    .venv/bin/python benchmarks/shared_scan.py [--only smollm2-screen|latency]

Writes benchmarks/results/shared_scan.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import dbs, pg  # noqa: E402
from tests.conftest import build_tiny_model  # noqa: E402
from tests.test_reliability import findings  # noqa: E402

HARNESS = [sys.executable, "-c", "from harness import plugins; "
           "from tests.plugins import probe_log; "
           "plugins.register_plugin(probe_log, name='probe-log-plugin'); "
           "from harness.cli import main; main()"]


def run(args: list[str], url: str, n: int, home: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    procs = [subprocess.Popen([*HARNESS, *args, "--db", url], cwd=ROOT,
                              env={**os.environ, **env, "HARNESS_HOME": str(home)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"scan failed: {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["smollm2-screen", "latency"])
    opts = parser.parse_args()
    server = pg.Server()
    work = Path(tempfile.mkdtemp(prefix="shared-scan-"))
    home = work / "home"  # one home: the converted-model cache is shared and warm
    results = []
    try:
        loads = {}
        if opts.only in (None, "smollm2-screen"):
            tokens = ",".join(str(t) for t in range(0, 49_152, 4))
            loads["smollm2-screen"] = (
                ["scan", "smollm2", "--tokens", tokens, "-d", "repeat-screen", "-o",
                 "repeat-screen.batch=512"], {}, {"OMP_NUM_THREADS": "1"})
            # warm the model cache (the GGUF conversion) outside the timings
            run(["scan", "smollm2", "-d", "embedding-centroid"],
                f"sqlite:///{work / 'warm.db'}", 1, home, {})
        if opts.only in (None, "latency"):
            (work / "tiny-gpt2").mkdir()
            model = build_tiny_model(work / "tiny-gpt2")
            log = {"PROBE_LOG": str(work / "probes.log"), "PROBE_DELAY": "0.5"}
            loads["latency"] = (
                ["scan", str(model), "--backend", "probe-log", "--full", "-d",
                 "repeat-probe", "-o", "repeat-probe.batch=8"], log, log)
        for name, (args, env_one, env_three) in loads.items():
            timings = {}
            urls = {}
            for n, env in ((1, env_one), (3, env_three)):
                db, urls[n] = server.new_database()
                timings[n] = run(args, urls[n], n, home, env)
                print(f"{name}: {n} process{'es' if n > 1 else ''}: {timings[n]:.1f} s",
                      flush=True)
            one, three = findings(urls[1]), findings(urls[3])
            same = one == three
            verdicts = all([r[:2] for r in one[d]] == [r[:2] for r in three[d]] for d in one) \
                and one.keys() == three.keys()
            diff = max((abs(a[2] - b[2]) for d in one if d in three
                        for a, b in zip(one[d], three[d], strict=False)
                        if a[2] is not None and b[2] is not None), default=0.0)
            blocks = dbs.query(urls[3], "SELECT count(*), count(DISTINCT done_by), "
                               "max(claims) FROM run_blocks")[0]
            results.append({"workload": name, "one_process_s": round(timings[1], 1),
                            "three_processes_s": round(timings[3], 1),
                            "speedup": round(timings[1] / timings[3], 2),
                            "findings_equal": same, "verdicts_equal": verdicts,
                            "max_score_difference": diff, "blocks": blocks[0],
                            "workers": blocks[1], "max_claims": blocks[2]})
            if not verdicts or diff > 1e-4:
                raise SystemExit(f"{name}: the verdicts differ, or scores by {diff:.2g}")
    finally:
        server.stop()
    out = ROOT / "benchmarks" / "results" / "shared_scan.json"
    if opts.only and out.exists():  # keep the other workload's last results
        results = [r for r in json.loads(out.read_text())["results"]
                   if r["workload"] != opts.only] + results
    out.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, "
                                          f"{os.cpu_count()} cores",
                               "database": "PostgreSQL 15, throwaway server, unix socket",
                               "results": results}, indent=2) + "\n")
    print(f"{'workload':16} {'1 process':>10} {'3 processes':>12} {'speedup':>8}")
    for r in results:
        print(f"{r['workload']:16} {r['one_process_s']:>9.1f}s {r['three_processes_s']:>11.1f}s"
              f" {r['speedup']:>7.2f}x")


if __name__ == "__main__":
    main()
