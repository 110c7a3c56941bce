"""Tokens verified per second on SmolLM2: the `llamacpp` backend against the `hf` backend,
side by side, same GGUF, same probe set (`verify-3`), same candidates, same detector.

The candidates are a fixed-seed sample of the scan's candidate set (the static detectors'
most suspicious tokens). Each backend runs `repeat-probe` over the sample `--repeat` times,
alternating, and the fastest time counts (this shared 2-core machine is noisy). The
verdicts of the two backends are compared token by token.

    .venv/bin/python benchmarks/backend_speed.py [--sample 300] [--repeat 2] [--threads 2]

Writes benchmarks/results/backend_speed.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from detectors.repeat_probe import RepeatProbe
from harness.db import open_db
from harness.detector import ScanContext
from harness.plugins import registry
from harness.refs import resolve
from harness.runner import DEFAULT_CANDIDATES, load_backend, scan, select_candidates

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        engine = open_db(f"sqlite:///{tmp}/bench.db")
        static = scan("smollm2", engine, registry().default_static(), backend="llamacpp")
        cands = select_candidates(engine, [o.run_id for o in static.outcomes],
                                  static.vocab_size, DEFAULT_CANDIDATES)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(cands, min(args.sample, len(cands)), replace=False))

    reg = registry()
    backends = {}
    for name, opts in (("hf", {}), ("llamacpp", {"threads": args.threads})):
        t0 = time.perf_counter()
        backends[name] = load_backend(resolve("smollm2", reg, name), reg, **opts)
        print(f"{name}: loaded in {time.perf_counter() - t0:.1f} s")
    best: dict[str, float] = {}
    verdicts: dict[str, dict[int, str]] = {}
    for round_ in range(args.repeat):
        for name, be in backends.items():
            det = RepeatProbe()
            ctx = ScanContext(backend=be, vocab=be.vocab(), categories=np.array([]))
            det.prepare(ctx)
            t0 = time.perf_counter()
            found = [f for batch in det.run(ctx, sample) for f in batch]
            wall = time.perf_counter() - t0
            best[name] = min(best.get(name, np.inf), wall)
            verdicts[name] = {f.token_id: f.verdict for f in found}
            print(f"round {round_ + 1} {name}: {wall:.1f} s, "
                  f"{len(sample) / wall:.2f} tokens/s")
    agree = np.mean([verdicts["hf"][t] == verdicts["llamacpp"][t] for t in sample.tolist()])
    differ = [(int(t), verdicts["hf"][t], verdicts["llamacpp"][t]) for t in sample.tolist()
              if verdicts["hf"][t] != verdicts["llamacpp"][t]]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{len(__import__('os').sched_getaffinity(0))} cores",
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (hf: dequantised to float32)",
        "probe_set": "verify-3", "candidates": int(len(cands)), "sample": int(len(sample)),
        "threads_llamacpp": args.threads, "repeat": args.repeat,
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "tokens_per_s": {k: round(len(sample) / v, 2) for k, v in best.items()},
        "llamacpp_vs_hf": round(best["hf"] / best["llamacpp"], 2),
        "verdict_agreement": round(float(agree), 4),
        "verdicts_that_differ": differ,
        "glitch": {k: sum(v == "glitch" for v in verdicts[k].values()) for k in verdicts},
    }
    out = ROOT / "benchmarks" / "results" / "backend_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
