"""Does `torch.compile` make the screen's first prompt faster on a CPU?

The word-pair list's forward pass (2,048 tokens, two new positions each after the shared
prefix) in one process: eager, the whole model compiled (inductor), and only the MLPs and
norms compiled (where elementwise work would fuse; attention left as it is). Times are the
mean of two passes after the first, which compiles.

    .venv/bin/python benchmarks/compile_screen.py smollm2

Writes benchmarks/results/compile_screen_<model>.json and prints it. Needs the hf backend.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from harness.plugins import registry
from harness.probe_sets import plan_prompt
from harness.refs import resolve
from harness.runner import load_backend
from probes import SCREEN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learned_screen import forward  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    reg = registry()
    be = load_backend(resolve(args.model, reg), reg)
    plan = plan_prompt(SCREEN.templates[0], "t", be.encode, be.bos_ids())
    ids = range(1000, 1000 + args.tokens)
    tails = torch.tensor([list(plan.tail_for(t)) for t in ids], device=be.device)

    def run(model):
        return forward(be, tuple(plan.prefix), tails, False, model).last_hidden_state

    def timed(model) -> tuple[dict, torch.Tensor]:
        t0 = time.perf_counter()
        run(model)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(2):
            hidden = run(model)
        ms = 1000 * (time.perf_counter() - t0) / 2 / len(ids)
        return {"first_pass_s": round(first, 2), "ms_per_token": round(ms, 3)}, hidden

    report: dict = {"model": args.model, "machine": platform.machine(),
                    "threads": torch.get_num_threads(), "tokens": len(ids), "runs": {}}
    with torch.inference_mode():
        base = be.model.base_model
        report["runs"]["eager"], eager = timed(base)
        got, hidden = timed(torch.compile(base))
        got["max_abs_difference"] = float((hidden - eager).abs().max())
        report["runs"]["whole_model_compiled"] = got
        for layer in base.layers:
            for part in ("mlp", "input_layernorm", "post_attention_layernorm"):
                setattr(layer, part, torch.compile(getattr(layer, part), dynamic=True))
        got, hidden = timed(base)
        got["max_abs_difference"] = float((hidden - eager).abs().max())
        report["runs"]["mlp_and_norms_compiled"] = got
    print(json.dumps(report, indent=2))
    out = args.out or ROOT / "benchmarks" / "results" / f"compile_screen_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
