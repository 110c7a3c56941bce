"""Time `harness scan` with the two static detectors on the real offline models.

For each model: a first run with an empty model cache (the GGUF is dequantized and cached as
safetensors), a second run with the cache warm, each in a fresh database so the detectors run
again; wall time and peak memory from /usr/bin/time. Then, in one process, the detectors'
own time (findings ready to insert) against the same computation written as a loop
over the vocabulary in Python, side by side, with the share of verdicts they agree on.

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

from harness.detector import Finding

ROOT = Path(__file__).resolve().parents[1]
HARNESS = str(Path(sys.executable).parent / "harness")


def timed_scan(model: str, cache: Path, home: Path) -> dict:
    env = {**os.environ, "HARNESS_CACHE": str(cache), "HARNESS_HOME": str(home)}
    proc = subprocess.run(["/usr/bin/time", "-v", HARNESS, "scan", model, "--top", "5",
                           "-d", "embedding-centroid,unembedding-cosine"],
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


def naive_centroid(emb: np.ndarray, z_threshold: float = 3.5) -> list[Finding]:
    """The same findings as embedding-centroid, written as a loop over the vocabulary."""
    centroid = emb.mean(axis=0, dtype=np.float64)
    seen: dict[bytes, int] = {}
    dist, norm = [], []
    for row in emb:
        dist.append(float(np.linalg.norm(row - centroid)))
        norm.append(float(np.linalg.norm(row)))
        seen[row.tobytes()] = seen.get(row.tobytes(), 0) + 1
    med = float(np.median(dist))
    mad = float(np.median([abs(d - med) for d in dist])) * 1.4826
    out = []
    for i, row in enumerate(emb):
        z = (dist[i] - med) / mad
        dups = seen[row.tobytes()] - 1
        verdict = "suspect" if z <= -z_threshold or dups > 0 else "ok"
        out.append(Finding(i, dist[i], verdict, {"norm": norm[i], "z": z, "duplicates": dups}))
    return out


def naive_cosine(unemb: np.ndarray, ref_ids: np.ndarray, z_threshold: float = 3.5
                 ) -> list[Finding]:
    """The same findings as unembedding-cosine, written as a loop over the vocabulary."""
    mean = unemb.mean(axis=0, dtype=np.float64)
    centered = unemb - mean
    pc = np.linalg.eigh(centered.T @ centered)[1][:, -1]
    rows = [row - (row @ pc) * pc for row in unemb]
    ref = np.mean([rows[i] for i in ref_ids], axis=0)
    cos = [1 - float(r @ ref / (np.linalg.norm(r) * np.linalg.norm(ref))) for r in rows]
    med = float(np.median(cos))
    mad = float(np.median([abs(c - med) for c in cos])) * 1.4826
    return [Finding(i, c, "suspect" if (c - med) / mad <= -z_threshold else "ok",
                    {"z": (c - med) / mad}) for i, c in enumerate(cos)]


def detector_compute(model: str, cache: Path) -> dict:
    """Each detector (prepare + run, findings ready to insert) against its Python-loop twin."""
    os.environ["HARNESS_CACHE"] = str(cache)
    from harness.detector import FindingArrays, ScanContext
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
        det = reg.detectors[name].cls()
        t = time.perf_counter()
        opts = det.prepare(ctx)
        batches = list(det.run(ctx, ids))
        rows = [r for b in batches for r in (b.rows() if isinstance(b, FindingArrays) else b)]
        fast_s = time.perf_counter() - t
        fast = np.concatenate([b.verdicts for b in batches])
        t = time.perf_counter()
        if name == "embedding-centroid":
            slow = naive_centroid(backend.input_embeddings())
        else:
            slow = naive_cosine(backend.output_embeddings(), np.array(opts["reference_ids"])
                                if opts["reference_size"] <= 256 else det._ref_ids)
        slow_s = time.perf_counter() - t
        agree = float(np.mean(fast == np.array([f.verdict for f in slow])))
        out[name] = {"vectorised_s": round(fast_s, 3), "python_loop_s": round(slow_s, 3),
                     "speedup": round(slow_s / fast_s, 1), "verdict_agreement": agree,
                     "rows": len(rows)}
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
        for det, c in r["in_process"].items():
            print(f"  {det}: {c['vectorised_s']} s vectorised vs {c['python_loop_s']} s "
                  f"Python loop ({c['speedup']}x), verdicts agree on "
                  f"{100 * c['verdict_agreement']:.2f}%")


if __name__ == "__main__":
    main()
