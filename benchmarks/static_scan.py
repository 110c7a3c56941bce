"""Time `harness scan` with the two static detectors on the real offline models.

For each model: a first run with an empty model cache (the GGUF is dequantized and cached as
safetensors), a second run with the cache warm, each in a fresh database so the detectors run
again; wall time and peak memory from /usr/bin/time. Then, in one process, the detectors'
own compute time against a baseline that loops over the vocabulary in Python, side by side.

    .venv/bin/python benchmarks/static_scan.py [smollm2 gemma3-270m]

Writes benchmarks/results/static_scan.json and prints a table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HARNESS = str(Path(sys.executable).parent / "harness")


def timed_scan(model: str, cache: Path, home: Path) -> dict:
    env = {**os.environ, "HARNESS_CACHE": str(cache), "HARNESS_HOME": str(home)}
    proc = subprocess.run(["/usr/bin/time", "-v", HARNESS, "scan", model, "--top", "5"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"scan failed: {proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours = int(wall.group(1) or 0)
    seconds = hours * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    load = float(re.search(r"model loaded in ([\d.]+) s", proc.stdout).group(1))
    runs = dict(re.findall(r"^\s+([\w-]+): .*\(([\d.]+) s, run", proc.stdout, re.M))
    return {"wall_s": round(seconds, 2), "peak_rss_mib": round(rss / 1024),
            "model_load_s": load, "detector_s": {k: float(v) for k, v in runs.items()}}


def naive_centroid(emb: np.ndarray) -> np.ndarray:
    centroid = emb.mean(axis=0)
    return np.array([np.linalg.norm(row - centroid) for row in emb])


def naive_cosine(unemb: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    mean = unemb[ref_ids].mean(axis=0)
    return np.array([1 - row @ mean / (np.linalg.norm(row) * np.linalg.norm(mean))
                     for row in unemb])


def detector_compute(model: str, cache: Path) -> dict:
    os.environ["HARNESS_CACHE"] = str(cache)
    from harness.detector import ScanContext
    from harness.plugins import registry
    from harness.refs import resolve
    from harness.runner import load_backend
    from harness.vocab import analyze

    reg = registry()
    backend = load_backend(resolve(model, reg), reg)
    vocab = backend.vocab()
    ctx = ScanContext(backend, vocab, analyze(vocab, backend.encode_batch))
    ids = np.arange(len(vocab))
    out = {}
    for name in ("embedding-centroid", "unembedding-cosine"):
        det = reg.detectors[name][0]()
        t = time.perf_counter()
        det.prepare(ctx)
        n = sum(len(b) for b in det.run(ctx, ids))
        out[name] = round(time.perf_counter() - t, 3)
        assert n == len(vocab)
    emb = backend.input_embeddings()
    t = time.perf_counter()
    naive_centroid(emb)
    out["baseline-python-loop-centroid"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    naive_cosine(backend.output_embeddings(), np.arange(16))
    out["baseline-python-loop-cosine"] = round(time.perf_counter() - t, 3)
    backend.close()
    return out


def main() -> None:
    models = sys.argv[1:] or ["smollm2", "gemma3-270m"]
    results = {}
    for model in models:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            first = timed_scan(model, tmp / "cache", tmp / "home1")
            second = timed_scan(model, tmp / "cache", tmp / "home2")
            compute = detector_compute(model, tmp / "cache")
        results[model] = {"first_run": first, "second_run": second, "in_process": compute}
        print(json.dumps({model: results[model]}, indent=2), flush=True)
    info = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0]}
    path = ROOT / "benchmarks" / "results" / "static_scan.json"
    path.write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    print(f"\n{'model':<12} {'run':<7} {'wall s':>7} {'peak MiB':>9} {'load s':>7}")
    for model, r in results.items():
        for run in ("first_run", "second_run"):
            x = r[run]
            print(f"{model:<12} {run[:6]:<7} {x['wall_s']:>7} {x['peak_rss_mib']:>9} "
                  f"{x['model_load_s']:>7}")
        c = r["in_process"]
        print(f"  detectors (compute only): centroid {c['embedding-centroid']} s vs python loop "
              f"{c['baseline-python-loop-centroid']} s; cosine {c['unembedding-cosine']} s vs "
              f"python loop {c['baseline-python-loop-cosine']} s")


if __name__ == "__main__":
    main()
