"""Can the screen's first prompt cost one new token per vocabulary token instead of two?

The word-pair list ends with the token under test and the quote that closes it (2 new tokens
after the shared prefix, the read at the second). A prompt whose read is the token's own
position, the copy written right after the token (`"catcat"`, `" the the"`), would halve the
first stage's forward passes, its floor. Measured here, one process, the same batches: each
prompt's time per token and how many tokens it settles as the screen's first prompt does
(probability at least 0.02 and the model's greedy token beginning to spell the token; also by
probability alone), on a random sample of ordinary tokens and on the reference glitch tokens
(`--truth`: token ids, one per line, as `harness evaluate` takes them).

    .venv/bin/python benchmarks/one_position_screen.py smollm2 --truth GLITCH_IDS.txt

Writes benchmarks/results/one_position_screen_<model>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from detectors.repeat_screen import RepeatScreen, begins_spelling
from harness.backend import ProbeRequest
from harness.plugins import registry
from harness.probe_sets import plan_prompt
from harness.refs import resolve
from harness.runner import load_backend
from probes import _PAIRS as WORDS  # the word-pair list's own words
from probes import SCREEN

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = RepeatScreen.defaults["threshold"]
PROMPTS = {
    "pair-list": SCREEN.templates[0],
    "doubled-quoted": "Each item is a word written twice, the copy right after it: "
                      + ", ".join(f'"{w}{w}"' for w in WORDS) + ', "{token}{repeat}',
    "doubled-list": "Each item is a word and its exact copy, written together:\n["
                    + ",".join(f'"{w}{w}"' for w in WORDS) + ',"{token}{repeat}',
}


def measure(be, raw: list[bytes], template: str, ids: list[int]) -> dict:
    plan = plan_prompt(template, "t", be.encode, be.bos_ids())
    t0 = time.perf_counter()
    res = be.probe([ProbeRequest(plan.tail_for(t), t, 1, plan.prefix) for t in ids])
    wall = time.perf_counter() - t0
    p = np.array([r.max_prob for r in res])
    spells = np.array([r.ids[0] == t or begins_spelling(raw[t], raw[r.ids[0]])
                       for t, r in zip(ids, res, strict=True)])
    settled = (p >= THRESHOLD) & spells
    return {"new_tokens": len(plan.tail), "tokens": len(ids),
            "ms_per_token": round(1000 * wall / len(ids), 2),
            "settled": int(settled.sum()), "settled_share": round(float(settled.mean()), 4),
            "settled_by_probability_alone": int((p >= THRESHOLD).sum()),
            "settled_ids": [t for t, s in zip(ids, settled, strict=True) if s]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--truth", type=Path, required=True, help="glitch token ids, one a line")
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    reg = registry()
    be = load_backend(resolve(args.model, reg), reg)
    raw = be.vocab().raw
    glitch = [int(x) for x in args.truth.read_text().split()]
    rng = np.random.default_rng(args.seed)
    known = set(glitch)
    sample = [int(t) for t in rng.choice(len(raw), args.sample, replace=False)
              if int(t) not in known]
    report: dict = {"model": args.model, "machine": platform.machine(),
                    "threshold": THRESHOLD, "prompts": {}}
    for name, template in PROMPTS.items():
        got = {"ordinary_sample": measure(be, raw, template, sample),
               "reference_glitch": measure(be, raw, template, glitch)}
        got["ordinary_sample"].pop("settled_ids")
        report["prompts"][name] = got
        print(name, json.dumps(got), flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"one_position_screen_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
