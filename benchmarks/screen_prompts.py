"""What the screen's third prompt buys: the first stage and verification of a random sample,
with the screen as it was (two prompts) and as it is (three, and ``hopeless_below``), side by
side in one process.

The screen's third prompt (`input-output-2`, the opening of verify-3's copying device) is asked
only for the tokens the first two leave unsettled, and not for those a prompt leaves below
``hopeless_below``. Every token it settles skips verification; every token it does not settle
costs its 30 new tokens for nothing. Measured on `--sample` random tokens of the vocabulary:

- each screen's time and the tokens it leaves unsettled;
- `repeat-probe` (verify-3 with its scouts, the default) on each screen's unsettled tokens:
  time and verdicts;
- fidelity: tokens the new screen settles that verification calls glitch (must be none), and
  whether both pipelines end with the same glitch tokens;
- both projected to the whole vocabulary (times the vocabulary over the sample). Tokens a
  static detector flags are verified either way and are left out of both.

    .venv/bin/python benchmarks/screen_prompts.py gemma3-270m --sample 8000

Writes benchmarks/results/screen_prompts_<model>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from detectors.repeat_probe import RepeatProbe
from detectors.repeat_screen import RepeatScreen
from harness.detector import ScanContext
from harness.plugins import registry
from harness.refs import resolve
from harness.runner import load_backend
from probes import SCREEN

ROOT = Path(__file__).resolve().parents[1]


def run(detector, ctx: ScanContext, ids: np.ndarray) -> tuple[dict, float]:
    """Findings by token, and the wall time of the detector's run (after ``prepare``)."""
    detector.prepare(ctx)
    t0 = time.perf_counter()
    found = {f.token_id: f for batch in detector.run(ctx, ids) for f in batch}
    return found, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="gemma3-270m")
    ap.add_argument("--sample", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    reg = registry()
    be = load_backend(resolve(args.model, reg, None), reg)
    vocab = be.vocab()
    ctx = ScanContext(backend=be, vocab=vocab, categories=np.array([]))
    rng = np.random.default_rng(args.seed)
    ids = np.sort(rng.choice(len(vocab), min(args.sample, len(vocab)), replace=False))

    before = RepeatScreen(hopeless_below=0)
    before.probe_set = replace(SCREEN, templates=SCREEN.templates[:2], labels=SCREEN.labels[:2])
    now = RepeatScreen()
    run(now, ctx, ids[:8])  # warm-up: prefix caches, allocator
    report: dict = {"model": args.model, "machine": platform.machine(), "vocab": len(vocab),
                    "sample": len(ids), "seed": args.seed}
    scale = len(vocab) / len(ids)
    glitch: dict[str, set[int]] = {}
    settled: dict[str, set[int]] = {}
    for name, screen in (("before", before), ("now", now)):
        found, screen_s = run(screen, ctx, ids)
        settled[name] = {int(t) for t in ids if found[t].verdict == "ok"}
        left = np.array([t for t in ids if int(t) not in settled[name]], dtype=np.int64)
        checked, verify_s = run(RepeatProbe(), ctx, left)
        glitch[name] = {t for t, f in checked.items() if f.verdict == "glitch"}
        report[name] = {"screen_s": round(screen_s, 1), "unsettled": len(left),
                        "verify_s": round(verify_s, 1), "glitch": len(glitch[name]),
                        "total_s": round(screen_s + verify_s, 1),
                        "whole_vocabulary_min": round((screen_s + verify_s) * scale / 60, 1)}
        print(name, json.dumps(report[name]), flush=True)
    report["speedup"] = round(report["before"]["total_s"] / report["now"]["total_s"], 3)
    report["fidelity"] = {
        "glitch_settled_by_new_screen": sorted(glitch["before"] & settled["now"]),
        "same_glitch_tokens": glitch["before"] == glitch["now"]}
    print(json.dumps({k: report[k] for k in ("speedup", "fidelity")}))
    out = args.out or ROOT / "benchmarks" / "results" / f"screen_prompts_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
