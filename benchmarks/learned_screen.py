"""Can a learned probe on the token's own position settle tokens before the screen's read?

GlitchProber's route to a cheap first stage: a simple classifier on intermediate activations,
one forward position a token. Here the position is the word-pair list's first new token (the
token under test, inside its quotes); the label is what the screen's read one position later
decides (probability at least 0.02 and the model's greedy token beginning to spell the token).
A token the probe settles would skip the read position and the layers after the probe's, the
rest would run the word-pair list as today.

At scan time a new model's glitch tokens are unknown, so the only threshold a scan could set
is one from the screen's own labels: above every token of a calibration sample that the
word-pair list leaves unsettled. Measured here, on a random sample of ordinary tokens split
into fit / calibration / test thirds, and on the reference glitch tokens (`--truth`: token
ids, one per line, as `harness evaluate` takes them): for a linear probe (logistic regression)
and a small MLP at several layers, the share of test tokens that threshold settles, the
unsettled tokens it settles all the same, and the glitch tokens it settles; for comparison
the share a threshold just above the highest glitch token's score would settle (fitted to the
reference, so not available to a scan). Also each layer's estimated cost of the first prompt
from the measured time of one and two new positions.

    .venv/bin/python benchmarks/learned_screen.py smollm2 --truth GLITCH_IDS.txt

Needs the `hf` backend (it reads hidden states). Writes
benchmarks/results/learned_screen_<model>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from detectors.repeat_screen import RepeatScreen, begins_spelling
from harness.plugins import registry
from harness.probe_sets import plan_prompt
from harness.refs import resolve
from harness.runner import load_backend
from probes import SCREEN

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = RepeatScreen.defaults["threshold"]
CHUNK = 1024


def forward(be, prefix: tuple[int, ...], tails: torch.Tensor, hidden: bool, model=None):
    """The model's body (``model``, else the backend's own) over ``tails`` (rows of new
    tokens) after the shared ``prefix``."""
    _, shared = be._after_prefix(prefix, tails.shape[0], tails.shape[1])
    with shared.active():
        return (be.model.base_model if model is None else model)(
            input_ids=tails, use_cache=False, output_hidden_states=hidden,
            position_ids=shared.positions(tails.shape[0], tails.shape[1], tails.device))


def collect(be, plan, ids: list[int], layers: list[int]) -> dict[str, np.ndarray]:
    """Hidden states at the token's position (``layers``) and the screen's read."""
    raw = be.vocab().raw
    feats: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    probs, spells = [], []
    with torch.inference_mode():
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            tails = torch.tensor([list(plan.tail_for(t)) for t in chunk], device=be.device)
            out = forward(be, tuple(plan.prefix), tails, hidden=True)
            for layer in layers:
                feats[layer].append(out.hidden_states[layer][:, 0].float().cpu().numpy())
            logp, best = be._read(out.last_hidden_state[:, -1],
                                  torch.tensor(chunk, device=be.device))
            probs.append(logp.exp().cpu().numpy())
            spells += [int(g) == t or begins_spelling(raw[t], raw[int(g)])
                       for t, g in zip(chunk, best.tolist(), strict=True)]
    p = np.concatenate(probs)
    return {"settled": (p >= THRESHOLD) & np.array(spells), "p": p,
            **{f"h{layer}": np.concatenate(feats[layer]) for layer in layers}}


def timing(be, plan, ids: list[int]) -> dict[str, float]:
    """Milliseconds a token for the word-pair list's first new position and for both (the
    screen's first prompt: both positions and the read)."""
    got = {}
    with torch.inference_mode():
        for name, width in (("one_position", 1), ("both_positions_and_read", 2)):
            t0 = time.perf_counter()
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                tails = torch.tensor([list(plan.tail_for(t))[:width] for t in chunk],
                                     device=be.device)
                out = forward(be, tuple(plan.prefix), tails, hidden=False)
                if width == 2:
                    be._read(out.last_hidden_state[:, -1], torch.tensor(chunk, device=be.device))
            got[name] = round(1000 * (time.perf_counter() - t0) / len(ids), 3)
    return got


def fit_linear(x: torch.Tensor, y: torch.Tensor):
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss = loss + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: (z @ w + b).detach()


def fit_mlp(x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(),
                              torch.nn.Dropout(0.2), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(1), y).backward()
        opt.step()
    net.eval()
    return lambda z: net(z).squeeze(1).detach()


def evaluate(x: np.ndarray, settled: np.ndarray, split, glitch: np.ndarray, fit) -> dict:
    fit_rows, cal, test = split
    mu, sd = x[fit_rows].mean(0), x[fit_rows].std(0) + 1e-6
    z = torch.tensor((x - mu) / sd, dtype=torch.float32)
    score = fit(z[fit_rows], torch.tensor(settled[fit_rows], dtype=torch.float32))(z).numpy()
    bar = float(score[cal][~settled[cal]].max())
    by_probe = score[test] > bar
    fitted_bar = float(score[glitch].max())
    return {"settled_share": round(float(by_probe.mean()), 4),
            "unsettled_settled": int(by_probe[~settled[test]].sum()),
            "glitch_settled": int((score[glitch] > bar).sum()),
            "settled_share_above_every_glitch_token": round(
                float((score[test] > fitted_bar).mean()), 4),
            "unsettled_settled_above_every_glitch_token": int(
                (score[test] > fitted_bar)[~settled[test]].sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--truth", type=Path, required=True, help="glitch token ids, one a line")
    ap.add_argument("--sample", type=int, default=8000)
    ap.add_argument("--layers", default="6,10,14,18,22,26,30")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    reg = registry()
    be = load_backend(resolve(args.model, reg), reg)
    if not hasattr(be, "model"):
        raise SystemExit("learned_screen needs the hf backend (it reads hidden states)")
    n_layers = int(be.model.config.num_hidden_layers)
    layers = [int(x) for x in args.layers.split(",")]
    vocab = len(be.vocab().raw)
    glitch_ids = [int(x) for x in args.truth.read_text().split()]
    known = set(glitch_ids)
    rng = np.random.default_rng(args.seed)
    sample = [int(t) for t in rng.choice(vocab, args.sample, replace=False)
              if int(t) not in known]
    plan = plan_prompt(SCREEN.templates[0], "t", be.encode, be.bos_ids())
    costs = timing(be, plan, sample[:2 * CHUNK])
    data = collect(be, plan, sample + glitch_ids, layers)
    settled = data["settled"]
    n = len(sample)
    order = rng.permutation(n)
    third = n // 3
    split = (order[:third], order[third:2 * third], order[2 * third:])
    glitch = np.arange(n, n + len(glitch_ids))
    report: dict = {
        "model": args.model, "machine": platform.machine(), "threshold": THRESHOLD,
        "sample": n, "reference_glitch": len(glitch_ids),
        "settled_share_sample": round(float(settled[:n].mean()), 4),
        "reference_glitch_settled_by_the_screen": int(settled[n:].sum()),
        "split": {"fit": third, "calibration": third, "test": n - 2 * third,
                  "test_unsettled": int((~settled[split[2]]).sum())},
        "ms_per_token": costs, "layers_of_model": n_layers, "probes": {}}
    one, both = costs["one_position"], costs["both_positions_and_read"]
    for layer in layers:
        x = data[f"h{layer}"]
        row = {}
        for kind, fit in (("linear", fit_linear), ("mlp", fit_mlp)):
            got = evaluate(x, settled, split, glitch, fit)
            # a settled token pays the probe's layers of one position; the rest all of it
            front = one * layer / n_layers
            got["estimated_ms_per_token"] = round(
                front + (1 - got["settled_share"]) * (both - front), 3)
            row[kind] = got
        report["probes"][f"layer_{layer}"] = row
        print(layer, json.dumps(row), flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"learned_screen_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
