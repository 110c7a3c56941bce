"""The whole default scan, stage by stage, against today's code, in one run.

Two checkouts of the harness run side by side with this virtual environment, each command in a
fresh database with the model cache warm:

- baseline: the harness at `--baseline` (default 33d6abe, the last commit before the
  whole-vocabulary pipeline), checked out with `git worktree` into a temporary folder; its
  default scan verifies only the static detectors' candidates (2 % of the vocabulary each);
- current: this tree; its default scan screens every token and verifies what the screen does
  not settle and what a static detector flags.

Measured:

1. `harness scan MODEL` with each checkout's defaults: wall time, and per stage the run's own
   time (`runs.wall_s`), how many tokens each stage examined, the glitch count;
2. the cascade on glitch tokens: `--glitch N` tokens that the current scan verified as glitch
   tokens, through `repeat-probe` with verify-3, in one process per checkout: the baseline's
   code, the current code with its scouts off (the exact cascade) and on (the default);
   tokens/s, and whether the verdicts agree;
3. the physical bounds, at the float32 matrix-multiply rate this CPU reaches on the model's
   shapes: for the first stage, one forward pass of the screen's new tokens per vocabulary
   token (plus the projection of the read position onto the vocabulary); for a glitch token,
   the exact cascade's work (every verify-3 prompt's new tokens, two greedy steps each).

    .venv/bin/python benchmarks/default_scan.py [smollm2|gemma3-270m] [--glitch 48]
        [--baseline REV] [--skip-baseline-scan] [--cascade-only REFERENCE_DB]

Writes benchmarks/results/default_scan_<model>.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "33d6abe"

# Run in a child process: the harness from the folder given first on the command line, with
# that folder's own built-in plugins (the entry points its pyproject.toml names; this venv's
# name the current tree's modules, and a module a tree lacks would be found in the current
# tree by the editable install's finder).
CHILD = r"""
import importlib, importlib.metadata, sys, tomllib
tree = sys.argv[1]
sys.path.insert(0, tree)
import pluggy
with open(tree + "/pyproject.toml", "rb") as f:
    OWN = tomllib.load(f)["project"]["entry-points"]
_load = pluggy.PluginManager.load_setuptools_entrypoints
def load(self, group, name=None):
    own = OWN.get(group, {})
    for n, module in own.items():
        if self.get_plugin(n) is None and not self.is_blocked(n):
            self.register(importlib.import_module(module), n)
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] == "glitch-harness":
            for ep in dist.entry_points:
                if ep.group == group and ep.name not in own:
                    self.set_blocked(ep.name)
    return _load(self, group, name)
pluggy.PluginManager.load_setuptools_entrypoints = load
mode = sys.argv[2]
if mode == "cli":
    from harness.cli import main
    main(sys.argv[3:])
else:  # glitch: time repeat-probe on the given tokens
    import json, time
    import numpy as np
    from harness.plugins import registry
    from harness.refs import resolve
    from harness.runner import load_backend
    from harness.detector import ScanContext
    from harness.vocab import analyze
    model, ids, options = sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
    reg = registry()
    be = load_backend(resolve(model, reg, None), reg)
    vocab = be.vocab()
    cats = analyze(vocab, be.encode_batch)
    entry = reg.detectors["repeat-probe"]
    det = (entry[0] if isinstance(entry, tuple) else entry.cls)(**options)  # older trees: tuples
    ctx = ScanContext(backend=be, vocab=vocab, categories=cats)
    det.prepare(ctx)
    list(det.run(ctx, np.asarray(ids[:4])))  # warm-up: prefix caches, allocator
    t0 = time.perf_counter()
    found = [f for batch in det.run(ctx, np.asarray(ids)) for f in batch]
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "verdicts": {f.token_id: f.verdict for f in found}}))
"""


def child(tree: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), *args], text=True,
                          capture_output=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed in {tree}:\n{proc.stderr[-3000:]}")
    return proc


def timed_scan(tree: Path, model: str, work: Path, *extra: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    db = work / "results.db"
    t0 = time.perf_counter()
    child(tree, "cli", "scan", model, "--db", str(db), "--top", "5", *extra,
          env={"HARNESS_HOME": str(work)})
    wall = time.perf_counter() - t0
    with sqlite3.connect(db) as conn:
        stages = conn.execute(
            "SELECT r.detector, r.wall_s, count(f.token_id), sum(f.verdict = 'glitch') FROM runs r "
            "LEFT JOIN findings f ON f.run_id = r.id GROUP BY r.id ORDER BY r.id").fetchall()
        glitch = conn.execute("SELECT token_id FROM glitch_tokens ORDER BY token_id").fetchall()
    return {"wall_s": round(wall, 1),
            "stages": [{"detector": d, "wall_s": round(w or 0, 1), "tokens": n,
                        "glitch": int(g or 0)} for d, w, n, g in stages],
            "glitch": len(glitch), "glitch_ids": [t for (t,) in glitch]}


def glitch_rate(tree: Path, model: str, ids: list[int], options: dict) -> dict:
    out = json.loads(child(tree, "glitch", model, json.dumps(ids), json.dumps(options))
                     .stdout.strip().splitlines()[-1])
    return {"wall_s": round(out["wall_s"], 2),
            "tokens_per_s": round(len(ids) / out["wall_s"], 3),
            "verdicts": {int(k): v for k, v in out["verdicts"].items()}}


def matmul_rate(m: int, k: int, n: int, repeat: int = 10) -> float:
    """Sustained float32 GFLOP/s of (m x k) @ (k x n) on this CPU."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * m * k * n * repeat / (time.perf_counter() - t0) / 1e9


def shapes(model: str) -> dict:
    """What the bounds need of the model: the body's parameters, the vocabulary projection's
    shape, and the new tokens per vocabulary token of the screen's first prompt and of each
    verify-3 prompt; of each screen prompt, each verify-3 prompt's scout, and their labels."""
    from harness.plugins import registry
    from harness.probe_sets import plan_probe_set
    from harness.refs import resolve
    from harness.runner import load_backend
    from probes import SCREEN, VERIFY_3

    reg = registry()
    be = load_backend(resolve(model, reg, None), reg)
    rows, d = be.model.get_input_embeddings().weight.shape
    params = sum(p.numel() for p in be.model.parameters())
    screen, verify = (plan_probe_set(p, be.encode, be.bos_ids()) for p in (SCREEN, VERIFY_3))
    out = {"rows": rows, "d": d, "vocab": len(be.vocab()),
           "body": params - rows * d * (1 if be.embeddings_tied() else 2),
           "inner": getattr(be.model.config.get_text_config(), "intermediate_size", 4 * d),
           "screen_new": len(screen[0].tail),
           "verify_new": [len(p.tail) for p in verify],
           "screen_labels": [p.label for p in screen],
           "screen_prompts_new": [len(p.tail) for p in screen],
           "verify_labels": [p.label for p in verify],
           "scouts_new": [p.checkpoint or 0 for p in verify]}
    be.close()
    return out


def model_rate(m: dict) -> float:
    """This CPU's float32 GFLOP/s on the model's shapes: the better of an MLP product and a
    block of the vocabulary projection."""
    return max(matmul_rate(2048, m["d"], m["inner"]), matmul_rate(1024, m["d"], m["rows"] // 8))


def physical_bound(m: dict, screen_tokens_per_s: float | None,
                   glitch_tokens_per_s: float | None) -> dict:
    """The first stage: FLOPs per screened token (the body on the screen's new tokens, one
    projection onto the vocabulary) and the time the CPU's matmul rate allows for the whole
    vocabulary. A glitch token: the body on every verify-3 prompt's new tokens plus two
    greedy steps each, three projections each."""
    rate = model_rate(m)
    head = 2 * m["rows"] * m["d"]
    flops = 2 * m["body"] * m["screen_new"] + head
    bound = m["vocab"] * flops / (rate * 1e9)
    out = {"matmul_gflops": round(rate, 1), "body_params": m["body"], "first_stage": {
        "new_tokens_per_token": m["screen_new"], "gflop_per_token": round(flops / 1e9, 4),
        "bound_s": round(bound, 1)}}
    if screen_tokens_per_s:
        measured = m["vocab"] / screen_tokens_per_s
        out["first_stage"].update(measured_s=round(measured, 1),
                                  tokens_per_s=round(screen_tokens_per_s, 1),
                                  measured_over_bound=round(measured / bound, 2))
    steps = 3
    new = sum(m["verify_new"]) + len(m["verify_new"]) * (steps - 1)
    gflop = (2 * m["body"] * new + head * len(m["verify_new"]) * steps) / 1e9
    out["glitch_token"] = {"new_tokens_per_prompt": m["verify_new"],
                           "gflop_per_token": round(gflop, 2),
                           "bound_tokens_per_s": round(rate / gflop, 3)}
    if glitch_tokens_per_s:
        out["glitch_token"]["measured_tokens_per_s"] = glitch_tokens_per_s
        out["glitch_token"]["bound_over_measured"] = round(rate / gflop / glitch_tokens_per_s,
                                                           2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--glitch", type=int, default=48, help="glitch tokens to time")
    ap.add_argument("--skip-baseline-scan", action="store_true")
    ap.add_argument("--cascade-only", type=Path, metavar="DB",
                    help="no scans: time the cascade on the glitch tokens of repeat-probe "
                         "findings in DB (a reference built by fidelity.py)")
    ap.add_argument("--keep", type=Path, help="keep the scans' databases in this folder")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report: dict = {"model": args.model, "machine": platform.machine(),
                    "cpus": os.cpu_count(), "baseline": args.baseline}
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        tmp = Path(tmp)
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.baseline], check=True, capture_output=True)
        try:
            work = args.keep or tmp
            if args.cascade_only:
                with sqlite3.connect(args.cascade_only) as conn:
                    current = {"glitch_ids": [t for (t,) in conn.execute(
                        "SELECT DISTINCT f.token_id FROM findings f JOIN runs r ON r.id = "
                        "f.run_id WHERE r.detector = 'repeat-probe' AND f.verdict = 'glitch' "
                        "ORDER BY f.token_id")]}
            else:
                current = timed_scan(ROOT, args.model, work / "current")
                report["current_scan"] = {k: v for k, v in current.items()
                                          if k != "glitch_ids"}
                print(json.dumps(report["current_scan"], indent=1), flush=True)
            if not args.skip_baseline_scan and not args.cascade_only:
                old = timed_scan(base, args.model, work / "baseline")
                report["baseline_scan"] = {k: v for k, v in old.items() if k != "glitch_ids"}
                print(json.dumps(report["baseline_scan"], indent=1), flush=True)
            ids = current["glitch_ids"]
            ids = [ids[k] for k in sorted(set(
                round(i * (len(ids) - 1) / max(1, args.glitch - 1))
                for i in range(min(args.glitch, len(ids)))))]
            runs = {"baseline": glitch_rate(base, args.model, ids, {}),
                    "exact": glitch_rate(ROOT, args.model, ids, {"scout_below": 0}),
                    "scouts": glitch_rate(ROOT, args.model, ids, {})}
            exact = runs["exact"]["verdicts"]
            report["glitch_cascade"] = {
                "tokens": len(ids),
                **{k: {"wall_s": v["wall_s"], "tokens_per_s": v["tokens_per_s"],
                       "verdicts_agree_with_exact": sum(v["verdicts"][t] == exact[t]
                                                        for t in ids)}
                   for k, v in runs.items()},
                "speedup_scouts_vs_baseline": round(runs["baseline"]["wall_s"]
                                                    / runs["scouts"]["wall_s"], 2),
                "speedup_scouts_vs_exact": round(runs["exact"]["wall_s"]
                                                 / runs["scouts"]["wall_s"], 2)}
            print(json.dumps(report["glitch_cascade"], indent=1), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(base)], capture_output=True)
    screen = next((s for s in report.get("current_scan", {}).get("stages", [])
                   if s["detector"] == "repeat-screen"), None)
    exact = report["glitch_cascade"]["exact"]["tokens_per_s"]
    report["bounds"] = physical_bound(shapes(args.model),
                                      screen and screen["tokens"] / screen["wall_s"], exact)
    print(json.dumps(report["bounds"], indent=1))
    out = args.out or ROOT / "benchmarks" / "results" / f"default_scan_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
