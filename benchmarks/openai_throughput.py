"""Tokens verified per second by `repeat-probe` through an OpenAI-compatible server.

SmolLM2-135M is served by `python -m llama_cpp.server` on loopback and reached through the
`openai` backend (`--tokenizer smollm2`); the detector verifies the same candidates as
`behavioural_probe.py` (the static detectors' candidates, a random sample fixed by seed 0)
with the same probe set (`verify-3`), once with 1 request in flight and once with 4, against
a server running 1 thread and one running 2. The backend is loaded afresh for each setting;
its load time is reported apart. Every completion request is counted (probe requests and the
exact-value requests made where a bound did not settle the verdict), and the host's load
average is recorded: this 2-core machine is shared, and llama_cpp.server evaluates one
request at a time.

    .venv/bin/python benchmarks/openai_throughput.py [--sample 40] [--concurrency 1,4]
                                                     [--threads 1,2] [--probes verify-3]

Writes benchmarks/results/openai_throughput.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.llama_server

from backends.openai_api import OpenAIBackend  # noqa: E402
from detectors.repeat_probe import RepeatProbe  # noqa: E402
from harness.db import open_db  # noqa: E402
from harness.detector import ScanContext  # noqa: E402
from harness.plugins import registry  # noqa: E402
from harness.runner import DEFAULT_CANDIDATES, scan, select_candidates  # noqa: E402
from tests.llama_server import start_llama_server  # noqa: E402

THRESHOLD = 0.01


def candidates_sample(size: int) -> list[int]:
    """behavioural_probe.py's candidates (static detectors, default fraction), sampled with
    seed 0."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_db(f"sqlite:///{tmp}/bench.db")
        static = scan("smollm2", engine, registry().default_static())
        run_ids = [o.run_id for o in static.outcomes]
        candidates = select_candidates(engine, run_ids, static.vocab_size, DEFAULT_CANDIDATES)
    rng = np.random.default_rng(0)
    return sorted(rng.choice(candidates, min(size, len(candidates)), replace=False).tolist())


def verify(url: str, concurrency: int, probes: str, tokens: list[int]) -> dict:
    t0 = time.perf_counter()
    be = OpenAIBackend(f"smollm2@{url}", tokenizer="smollm2", concurrency=concurrency)
    load_s = time.perf_counter() - t0
    counts = {"requests": 0}
    complete = be.transport.complete

    def counted(*args, **kwargs):
        counts["requests"] += 1
        return complete(*args, **kwargs)

    be.transport.complete = counted
    try:
        vocab = be.vocab()
        ctx = ScanContext(backend=be, vocab=vocab, categories=np.array([]))
        det = RepeatProbe(probes=probes)
        det.prepare(ctx)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        found = [f for batch in det.run(ctx, np.asarray(tokens)) for f in batch]
        wall = time.perf_counter() - t0
    finally:
        be.close()
    return {
        "concurrency": concurrency, "load_s": round(load_s, 2), "verify_s": round(wall, 1),
        "tokens_per_s": round(len(tokens) / wall, 3), "requests": counts["requests"],
        "requests_per_s": round(counts["requests"] / wall, 2),
        "glitch": sum(f.verdict == "glitch" for f in found),
        "errors": sum(f.verdict == "error" for f in found),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "verdicts": {f.token_id: f.verdict for f in found},
        "describe": be.describe(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=40)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--threads", default="1,2", help="llama_cpp.server threads")
    ap.add_argument("--probes", default="verify-3")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/openai_throughput.json"))
    args = ap.parse_args()

    tokens = candidates_sample(args.sample)
    runs = []
    for threads in (int(x) for x in args.threads.split(",")):
        with start_llama_server(threads=threads) as server:
            for c in (int(x) for x in args.concurrency.split(",")):
                runs.append({"server_threads": threads,
                             **verify(server.url, c, args.probes, tokens)})
                print(f"server threads {threads}, concurrency {c}: "
                      f"{runs[-1]['tokens_per_s']} tokens/s", file=sys.stderr)
    first = runs[0]["verdicts"]
    result = {
        "model": "smollm2 (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "server": "python -m llama_cpp.server --n_threads N --n_ctx 2048 (N: server_threads)",
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "probe_set": args.probes, "tokens": tokens,
        "backend": {k: v for k, v in runs[0]["describe"].items()
                    if k in ("server", "prompt_as", "score_via", "top_logprobs")},
        "runs": [{k: v for k, v in r.items() if k not in ("verdicts", "describe")}
                 for r in runs],
        "verdicts_agree_across_runs": all(r["verdicts"] == first for r in runs),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
