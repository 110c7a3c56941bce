"""The detectors' own Python per token, with the model taken out: `repeat-probe` (verify-3)
and `repeat-screen` over SmolLM2's 49,152 tokens against a backend whose `probe` answers at
once, with the tokenizer the `hf` backend uses (transformers' fast tokenizer of the GGUF).

On a GPU the model's share of a whole-vocabulary scan shrinks until this is what is left
(`verify3_gpu.py` on an H200: 19 % of the worst case outside `probe`). Side by side, in one
process: the tokenizer's `decode_batch` through transformers' `batch_decode` (before) and
through the Rust tokenizer directly (now), twice each, alternating.

    .venv/bin/python benchmarks/detector_python.py   # about 2 minutes
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from detectors.repeat_probe import RepeatProbe
from detectors.repeat_screen import RepeatScreen
from harness.backend import Capability, ProbeResult
from harness.detector import ScanContext
from harness.tokenizers.hf import HFTokenizer
from models.aliases import smollm2_gguf

OUT = Path(__file__).parent / "results" / "detector_python.json"


class InstantBackend:
    """Every probe answers probability ``p`` at once (``p`` far under the threshold: every
    prompt runs for every token, the verifier's worst case)."""

    name = "instant"
    capabilities = frozenset({Capability.SCORE, Capability.GENERATE})

    def __init__(self, tok: HFTokenizer, p: float) -> None:
        self.tok, self.p = tok, p
        self.encode, self.decode = tok.encode, tok.decode
        self.encode_batch, self.decode_batch = tok.encode_batch, tok.decode_batch
        self.bos_ids = tok.bos_ids

    def context_length(self) -> int:
        return 8192

    def probe(self, requests):
        return [ProbeResult(probs=[self.p] * q.steps, ids=[13] * q.steps) for q in requests]


def timed(det, tok: HFTokenizer, p: float, ids: np.ndarray) -> float:
    be = InstantBackend(tok, p)
    ctx = ScanContext(backend=be, vocab=None, categories=np.array([]))
    det.prepare(ctx)
    start = time.perf_counter()
    n = sum(len(batch) for batch in det.run(ctx, ids))
    assert n == len(ids)
    return time.perf_counter() - start


def main() -> None:
    tok = HFTokenizer.from_gguf(Path(smollm2_gguf()))
    ids = np.arange(tok.n_tokens())
    now = HFTokenizer.decode_batch

    def before(self, seqs):
        return self.tok.batch_decode([list(s) for s in seqs], skip_special_tokens=False)

    runs: dict[str, list[float]] = {"before": [], "now": []}
    for name in ("before", "now", "before", "now"):
        HFTokenizer.decode_batch = before if name == "before" else now
        runs[name].append(round(timed(RepeatProbe(), tok, 0.001, ids), 2))
        print(f"repeat-probe, worst case, decode {name}: {runs[name][-1]} s", flush=True)
    HFTokenizer.decode_batch = now
    screen = {"all settled": round(timed(RepeatScreen(), tok, 0.5, ids), 2),
              "none settled": round(timed(RepeatScreen(), tok, 0.001, ids), 2)}
    print(f"repeat-screen: {screen}")
    result = {"tokens": len(ids), "repeat_probe_worst_case_s": runs,
              "ratio": round(min(runs["before"]) / min(runs["now"]), 2),
              "repeat_screen_s": screen}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
