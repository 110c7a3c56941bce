"""Speed of the ``elicit`` detector on SmolLM2: 100 tokens, batched, against a naive loop.

The sample: 90 ordinary tokens (a seeded random draw of the ``normal`` tokens of the
tokenizer analysis) and 10 of SmolLM2's reference glitch tokens (the exact verify-3
cascade's; a collapsed special token, a lone byte, word fragments, bracket runs). Glitch
tokens never reach the stop probability and run every step; ordinary ones stop early.

- batched: ``harness scan smollm2 -d elicit --tokens ...`` as the runner does it (the
  detector's batches of 32 tokens, findings and every restart stored in a fresh SQLite
  database), model load not counted;
- naive: the same optimiser and options, one target at a time in a plain Python loop.
  It is measured on a proportional subset (9 ordinary, 1 glitch by default) and
  extrapolated to 100 tokens, and its verdicts are compared with the batched ones.

The CPU is shared: the load average before and after is recorded, and torch's thread count.

    python benchmarks/elicit_speed.py [--naive-ordinary 9 --naive-glitch 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

GLITCH = [7, 16, 190, 3420, 3944, 6812, 8153, 9127, 18257, 41276]
OUT = Path(__file__).parent / "results" / "elicit_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ordinary", type=int, default=90)
    ap.add_argument("--glitch", type=int, default=10)
    ap.add_argument("--naive-ordinary", type=int, default=9)
    ap.add_argument("--naive-glitch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch

    from backends.hf import HFBackend
    from harness import plugins
    from harness.db import open_db
    from harness.elicitation import ElicitRow, elicit
    from harness.runner import scan
    from harness.vocab import NORMAL, analyze
    from models.aliases import smollm2_gguf

    if args.threads:
        torch.set_num_threads(args.threads)
    if "elicit" not in plugins.registry().detectors:  # an install older than the plugin
        import detectors.elicit as module

        plugins.register_plugin(module, name="elicit-benchmark")
    from detectors.elicit import Elicit

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    be = HFBackend(smollm2_gguf())
    load_s = time.perf_counter() - t0
    cats = analyze(be.vocab(), be.encode_batch)
    normal = np.setdiff1d(np.flatnonzero(cats == NORMAL), GLITCH)
    ordinary = sorted(np.random.default_rng(0).choice(normal, args.ordinary,
                                                      replace=False).tolist())
    glitch = GLITCH[: args.glitch]
    sample = ordinary + glitch

    # batched: the detector through the runner, storing everything
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_db(f"sqlite:///{tmp}/bench.db")
        t0 = time.perf_counter()
        result = scan("smollm2", engine, ["elicit"], tokens=sample)
        batched_total = time.perf_counter() - t0
        outcome = result.outcomes[0]
        assert outcome.status == "done", outcome
        from harness import store

        with engine.connect() as conn:
            ids, scores, verdicts = store.run_findings(conn, outcome.run_id)
    batched = dict(zip(ids.tolist(), zip(scores.tolist(), verdicts.tolist(), strict=True),
                       strict=True))
    det = Elicit()
    opts = det.elicit_options
    from harness.elicitation import prompt_candidates

    cand = prompt_candidates(cats, det.options["prompt_tokens"])

    # naive: one target at a time, the same options
    subset = ordinary[: args.naive_ordinary] + glitch[: args.naive_glitch]
    naive: dict[int, float] = {}
    t0 = time.perf_counter()
    for t in subset:
        (found,) = elicit(be, [ElicitRow([t], seed=0, group=t)], cand, opts)
        naive[t] = found.probability
    naive_s = time.perf_counter() - t0
    thr = float(det.options["threshold"])
    agree = sum((naive[t] >= thr) == (batched[t][1] == "ok") for t in subset)
    share = len(sample) / len(subset)
    by_kind = {k: {"tokens": len(v), "elicited": sum(batched[t][1] == "ok" for t in v)}
               for k, v in (("ordinary", ordinary), ("glitch", glitch))}
    load1 = os.getloadavg()
    report = {
        "model": "smollm2", "tokens": len(sample), "sample": {"ordinary": ordinary,
                                                              "glitch": glitch},
        "options": det.options, "model_load_s": round(load_s, 1),
        "batched": {"detector_s": round(outcome.wall_s, 1),
                    "scan_total_s": round(batched_total, 1), "by_kind": by_kind},
        "naive": {"tokens_measured": len(subset), "measured_s": round(naive_s, 1),
                  "extrapolated_s": round(naive_s * share, 1),
                  "verdicts_agree_with_batched": f"{agree}/{len(subset)}"},
        "speedup": round(naive_s * share / outcome.wall_s, 2),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1min": [round(load0[0], 2), round(load1[0], 2)],
        "torch": torch.__version__, "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("batched", "naive", "speedup", "threads",
                                             "load_average_1min")}, indent=2))


if __name__ == "__main__":
    main()
