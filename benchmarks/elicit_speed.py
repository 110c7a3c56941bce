"""Speed of the ``elicit`` detector on SmolLM2: 100 tokens, batched, against a naive loop.

The sample: 90 ordinary tokens (a seeded random draw of the ``normal`` tokens of the
tokenizer analysis) and 10 of SmolLM2's reference glitch tokens (the exact verify-3
cascade's; a collapsed special token, a lone byte, word fragments, bracket runs). Glitch
tokens never reach the stop probability and run every step; ordinary ones stop early.

- batched: ``harness scan smollm2 -d elicit --tokens ...`` as the runner does it (the
  detector's batches of 128 tokens, findings and every restart stored in a fresh SQLite
  database), model load not counted;
- naive: the same optimiser and options, one target at a time in a plain Python loop.
  It is measured on a proportional subset (9 ordinary, 1 glitch by default) and
  extrapolated to 100 tokens, and its verdicts are compared with the batched ones. One
  target's step is still a batch (its 16 swap candidates run in one forward pass);
- unbatched: one target at a time and every sequence in a forward pass of its own (the
  swap candidates too), on a smaller subset (1 ordinary, 1 glitch), extrapolated the same
  way.

- previous: the batched path as it was before the swaps read from the cached prefix (every
  changed prompt read whole), beside the batched path, both on one optimisation batch of a
  subset (18 ordinary, 2 glitch by default).

``--skip-batched`` measures only the loops and keeps the batched numbers of the results file;
``--skip-loops`` the reverse.

The CPU is shared: the load average before and after is recorded, and torch's thread count.

    python benchmarks/elicit_speed.py [--naive-ordinary 9 --naive-glitch 1] [--threads N]
        [-o swaps=8 ...] [--out FILE]
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
    ap.add_argument("--unbatched-ordinary", type=int, default=1)
    ap.add_argument("--unbatched-glitch", type=int, default=1)
    ap.add_argument("--previous-ordinary", type=int, default=18)
    ap.add_argument("--previous-glitch", type=int, default=2)
    ap.add_argument("--skip-batched", action="store_true")
    ap.add_argument("--skip-loops", action="store_true",
                    help="keep the naive and unbatched numbers of the results file")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--option", action="append", default=[],
                    help="elicit detector option KEY=VALUE (both paths), e.g. swaps=8")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch

    from backends.hf import HFBackend
    from harness import plugins, store
    from harness.db import open_db
    from harness.elicitation import ElicitRow, elicit, prompt_candidates
    from harness.runner import scan
    from harness.vocab import NORMAL, analyze
    from models.aliases import smollm2_gguf

    if args.threads:
        torch.set_num_threads(args.threads)
    if "elicit" not in plugins.registry().detectors:  # an install older than the plugin
        import detectors.elicit as module

        plugins.register_plugin(module, name="elicit-benchmark")
    from detectors.elicit import Elicit

    given = dict(o.split("=", 1) for o in args.option)
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

    det = Elicit(**given)
    opts = det.elicit_options
    thr = float(det.options["threshold"])
    cand = prompt_candidates(cats, det.options["prompt_tokens"])
    kept = json.loads(args.out.read_text()) if args.skip_loops else None
    prev = json.loads(args.out.read_text()) if args.skip_batched else None
    if prev is None:  # batched: the detector through the runner, storing everything
        with tempfile.TemporaryDirectory() as tmp:
            engine = open_db(f"sqlite:///{tmp}/bench.db")
            t0 = time.perf_counter()
            result = scan("smollm2", engine, ["elicit"], tokens=sample,
                          detector_options={"elicit": given})
            batched_total = time.perf_counter() - t0
            outcome = result.outcomes[0]
            assert outcome.status == "done", outcome
            with engine.connect() as conn:
                ids, scores, _ = store.run_findings(conn, outcome.run_id)
        batched_p = dict(zip(ids.tolist(), scores.tolist(), strict=True))
        by_kind = {k: {"tokens": len(v), "elicited": sum(batched_p[t] >= thr for t in v)}
                   for k, v in (("ordinary", ordinary), ("glitch", glitch))}
        batched = {"detector_s": round(outcome.wall_s, 1),
                   "scan_total_s": round(batched_total, 1), "by_kind": by_kind,
                   "p": {str(t): p for t, p in batched_p.items()}}
    else:
        batched = prev["batched"]
    batched_p = {int(t): p for t, p in batched.get("p", {}).items()}

    def loop(tokens: list[int]) -> tuple[float, dict[int, float]]:
        found: dict[int, float] = {}
        t0 = time.perf_counter()
        for t in tokens:
            (f,) = elicit(be, [ElicitRow([t], seed=0, group=t)], cand, opts)
            found[t] = f.probability
        return time.perf_counter() - t0, found

    # naive: one target at a time, the same options
    subset = ordinary[: args.naive_ordinary] + glitch[: args.naive_glitch]
    few = ordinary[: args.unbatched_ordinary] + glitch[: args.unbatched_glitch]
    import harness.elicitation as el

    if kept is None:
        naive_s, naive = loop(subset)
        # unbatched: also every swap candidate in a forward pass of its own
        cells, el.LOGIT_CELLS = el.LOGIT_CELLS, 1
        try:
            unbatched_s, unbatched = loop(few)
        finally:
            el.LOGIT_CELLS = cells
    else:
        naive_s, naive = kept["naive"]["measured_s"], {}
        unbatched_s, unbatched = kept["unbatched"]["measured_s"], {}

    # previous: one batch of a subset, swaps read whole (as before) and from the cached prefix
    some = ordinary[: args.previous_ordinary] + glitch[: args.previous_glitch]
    some_rows = [ElicitRow([t], seed=0, group=t) for t in some]
    walls, found_p = {}, {}
    for name, cutoff in (("previous", 10**12), ("batched", el.PREFIX_MIN_SEQUENCES)):
        keep, el.PREFIX_MIN_SEQUENCES = el.PREFIX_MIN_SEQUENCES, cutoff
        try:
            t0 = time.perf_counter()
            got = elicit(be, some_rows, cand, opts)
            walls[name] = time.perf_counter() - t0
            found_p[name] = [f.probability for f in got]
        finally:
            el.PREFIX_MIN_SEQUENCES = keep
    same = sum((a >= thr) == (b >= thr)
               for a, b in zip(found_p["previous"], found_p["batched"], strict=True))

    def agree(got: dict[int, float]) -> str:
        known = [t for t in got if t in batched_p]
        same = sum((got[t] >= thr) == (batched_p[t] >= thr) for t in known)
        return f"{same}/{len(known)}"

    n = len(sample)
    load1 = os.getloadavg()
    report = {
        "model": "smollm2", "tokens": len(sample), "sample": {"ordinary": ordinary,
                                                              "glitch": glitch},
        "options": det.options, "model_load_s": round(load_s, 1),
        "batched": batched,
        "naive": {"tokens_measured": len(subset), "measured_s": round(naive_s, 1),
                  "extrapolated_s": round(naive_s * n / len(subset), 1),
                  "verdicts_agree_with_batched": agree(naive)},
        "unbatched": {"tokens_measured": len(few), "measured_s": round(unbatched_s, 1),
                      "extrapolated_s": round(unbatched_s * n / len(few), 1),
                      "verdicts_agree_with_batched": agree(unbatched)},
        "previous_side_by_side": {
            "tokens": len(some), "previous_s": round(walls["previous"], 1),
            "batched_s": round(walls["batched"], 1),
            "speedup": round(walls["previous"] / walls["batched"], 2),
            "verdicts_agree": f"{same}/{len(some)}"},
        "speedup_vs_naive": round(naive_s * n / len(subset) / batched["detector_s"], 2),
        "speedup_vs_unbatched": round(unbatched_s * n / len(few) / batched["detector_s"], 2),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1min": [round(load0[0], 2), round(load1[0], 2)],
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if kept is not None:  # the loops as measured in the run that wrote the results file
        report["naive"], report["unbatched"] = kept["naive"], kept["unbatched"]
        report["loops_load_average_1min"] = kept.get("loops_load_average_1min",
                                                     kept["load_average_1min"])
    if prev is not None:  # the batched run's own conditions, and its loop beside it
        report["load_average_1min_batched"] = prev.get("load_average_1min_batched",
                                                       prev.get("load_average_1min"))
        report["threads_batched"] = prev.get("threads_batched", prev.get("threads"))
        report["naive_beside_batched"] = prev.get("naive_beside_batched", prev["naive"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shown = {k: v for k, v in report.items() if k not in ("sample", "options")}
    shown["batched"] = {k: v for k, v in batched.items() if k != "p"}
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
