"""How fast ``harness check`` reads text: megabytes per second with SmolLM2's tokenizer on a
real corpus of at least 50 MB, against tokenizing everything.

The corpus is the documentation on this machine: every UTF-8 text file under
/usr/share/doc (Debian's changelogs, copyright files, READMEs; ``.gz`` files decompressed),
in path order, at most 2 MB from one file, until ``--mb`` megabytes (default 60), written
once to the harness cache. The glitch tokens are SmolLM2's verified ones: those of the
``smollm2`` scan in ``--db`` (default: the default results database, read only), else the 57
of a full default scan on this machine (``DEFAULT_SCAN_GLITCH``; the database is
opened read only); they go into a scratch
database with the vocabulary of the GGUF file, as a scan stored through llama.cpp would.

Measured, each on the same text:

- ``check``: ``harness check smollm2 CORPUS --json`` as a subprocess, end to end (start,
  tokenizer load, reading, the Aho-Corasick prefilter, batched llama.cpp tokenization of the
  pieces around candidates, output), and the ``check_text`` loop alone in this process;
- ``full``: the same finder with the prefilter off: every byte tokenized by llama.cpp in
  64 KiB groups cut at line starts (what the batching alone gives);
- ``per_line``: the naive way, one llama.cpp ``llama_tokenize`` call per line, on the first
  ``--sample-mb`` megabytes;
- ``hf_batch``: transformers' conversion of the GGUF tokenizer (``tokenizers``,
  ``encode_batch`` over lines, both cores), on the same sample, and how many lines it splits
  differently from llama.cpp.

    .venv/bin/python benchmarks/check_speed.py [--mb 60] [--sample-mb 5] [--db PATH]

Writes benchmarks/results/check_speed.json and prints a summary.
"""

from __future__ import annotations

import argparse
import gzip
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
sys.path.insert(0, str(ROOT))

from sqlalchemy.engine import make_url  # noqa: E402

from harness import paths  # noqa: E402
from harness.check import check_text, open_checker  # noqa: E402
from harness.db import open_db  # noqa: E402
from harness.token_finder import TokenFinder  # noqa: E402
from harness.tokenizers.gguf import GGUFTokenizer  # noqa: E402
from models.aliases import smollm2_gguf  # noqa: E402
from tests.crafted_db import store_scan  # noqa: E402

PER_FILE = 2_000_000
DEFAULT_SCAN_GLITCH = (
    0, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 190, 3420, 3944, 6812, 8153, 8891, 11121, 18257,
    19245, 23964, 24700, 28951, 29925, 29955, 32188, 32608, 34047, 35279, 35854, 36198, 36676,
    36743, 36744, 36902, 39121, 39145, 39362, 39936, 40264, 41276, 41541, 41598, 41824, 42455,
    43194, 43420, 43858, 44774, 45139, 45175, 45691, 46687, 46841, 48047, 48120)


def build_corpus(mb: float) -> tuple[Path, int, int]:
    """The corpus file (cached), its size in bytes and how many files it came from."""
    target = int(mb * 1e6)
    out = paths.cache_dir() / "benchmarks" / f"usr-share-doc-{target}.txt"
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        return out, out.stat().st_size, json.loads(meta.read_text())["files"]
    out.parent.mkdir(parents=True, exist_ok=True)
    size = files = 0
    with out.open("wb") as sink:
        for p in sorted(Path("/usr/share/doc").rglob("*")):
            if size >= target:
                break
            if not p.is_file() or p.is_symlink():
                continue
            try:
                data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
                data.decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError):
                continue
            if b"\x00" in data or not data.strip():
                continue
            data = data[:PER_FILE]
            cut = data.rfind(b"\n") + 1 or len(data)  # whole lines, whole characters
            data = data[:cut]
            sink.write(data if data.endswith(b"\n") else data + b"\n")
            size += len(data) + (not data.endswith(b"\n"))
            files += 1
    meta.write_text(json.dumps({"files": files, "bytes": out.stat().st_size}))
    return out, out.stat().st_size, files


def glitch_ids(db: str | None) -> tuple[list[int], str]:
    """SmolLM2's glitch tokens in a SQLite results database, opened read only (opening it
    through the harness would migrate it), else ``DEFAULT_SCAN_GLITCH``."""
    url = make_url(paths.db_url(db) if db else paths.default_db_url())
    if url.get_backend_name() == "sqlite" and url.database and Path(url.database).is_file():
        try:
            with sqlite3.connect(f"file:{url.database}?mode=ro", uri=True) as conn:
                ids = [t for (t,) in conn.execute(
                    "SELECT token_id FROM glitch_tokens WHERE model_alias = 'smollm2' AND "
                    "model_id = (SELECT max(model_id) FROM glitch_tokens WHERE "
                    "model_alias = 'smollm2') ORDER BY token_id")]
        except sqlite3.Error:
            ids = []
        if ids:
            return ids, f"smollm2 final verdicts in {url.database}"
    return list(DEFAULT_SCAN_GLITCH), "DEFAULT_SCAN_GLITCH (a full default scan here)"


def mb_s(n_bytes: int, seconds: float) -> float:
    return round(n_bytes / 1e6 / seconds, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=60.0)
    ap.add_argument("--sample-mb", type=float, default=5.0)
    ap.add_argument("--db", default=None)
    args = ap.parse_args()

    corpus, n_bytes, n_files = build_corpus(args.mb)
    ids, source = glitch_ids(args.db)
    gguf = smollm2_gguf()
    work = Path(tempfile.mkdtemp(prefix="check-speed-"))
    db = work / "results.db"
    tok = GGUFTokenizer(gguf)
    vocab = tok.vocab()
    store_scan(open_db(f"sqlite:///{db}"), f"llamacpp:{gguf}", vocab,
               {t: ("glitch", 1e-5) for t in ids}, alias="smollm2")
    print(f"corpus {corpus} ({n_bytes / 1e6:.1f} MB, {n_files} files); "
          f"{len(ids)} glitch tokens from {source}")

    # check, end to end, as a user runs it
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "check", "smollm2",
                           str(corpus), "--json", "--db", str(db)], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    cli_s = time.perf_counter() - t0
    assert proc.returncode in (0, 1), proc.stderr
    cli_found = len(proc.stdout.splitlines())

    # the check loop alone, and the same finder with every byte tokenized
    engine = open_db(f"sqlite:///{db}")
    checker = open_checker(engine, "smollm2")
    t0 = time.perf_counter()
    with corpus.open("rb") as f:
        found = sum(1 for _ in check_text(checker, "corpus", f))
    check_s = time.perf_counter() - t0
    full = TokenFinder(checker.finder.tok, vocab.raw, ids, prefilter=False)
    checker.finder = full
    t0 = time.perf_counter()
    with corpus.open("rb") as f:
        found_full = sum(1 for _ in check_text(checker, "corpus", f))
    full_s = time.perf_counter() - t0
    assert found == found_full == cli_found, (found, found_full, cli_found)

    # the naive baseline and transformers' tokenizer, on a sample
    sample = corpus.read_bytes()[:int(args.sample_mb * 1e6)]
    sample = sample[:sample.rfind(b"\n") + 1].decode("utf-8")
    lines = sample.splitlines(keepends=True)
    sample_bytes = len(sample.encode("utf-8"))
    t0 = time.perf_counter()
    per_line = [tok.encode(x) for x in lines]
    per_line_s = time.perf_counter() - t0
    hf = None
    try:
        from harness.tokenizers.hf import HFTokenizer

        t0 = time.perf_counter()
        hf_tok = HFTokenizer.from_gguf(Path(gguf))
        hf_load_s = time.perf_counter() - t0
        backend = hf_tok.tok.backend_tokenizer
        t0 = time.perf_counter()
        enc = backend.encode_batch(lines, add_special_tokens=False)
        hf_s = time.perf_counter() - t0
        differ = sum(e.ids != p for e, p in zip(enc, per_line, strict=True))
        hf = {"mb_s": mb_s(sample_bytes, hf_s), "seconds": round(hf_s, 2),
              "conversion_s": round(hf_load_s, 1), "lines_split_differently": differ,
              "lines": len(lines)}
    except Exception as exc:  # transformers missing or unable to convert
        hf = {"error": f"{type(exc).__name__}: {exc}"}
    checker.close()

    result = {
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "corpus": {"source": "/usr/share/doc (UTF-8 text files, .gz decompressed, at most "
                             "2 MB each, path order)", "bytes": n_bytes, "files": n_files},
        "tokenizer": "SmolLM2-135M-Instruct GGUF via llama.cpp (vocab only)",
        "glitch_tokens": len(ids), "glitch_source": source, "findings": found,
        "check_cli": {"mb_s": mb_s(n_bytes, cli_s), "seconds": round(cli_s, 2)},
        "check_loop": {"mb_s": mb_s(n_bytes, check_s), "seconds": round(check_s, 2)},
        "full_tokenization_batched": {"mb_s": mb_s(n_bytes, full_s),
                                      "seconds": round(full_s, 2)},
        "per_line_llama_cpp": {"mb_s": mb_s(sample_bytes, per_line_s),
                               "seconds": round(per_line_s, 2),
                               "sample_bytes": sample_bytes},
        "hf_tokenizers_encode_batch": hf,
    }
    result["speedup_check_vs_per_line"] = round(
        result["check_cli"]["mb_s"] / result["per_line_llama_cpp"]["mb_s"], 1)
    result["speedup_check_vs_full_batched"] = round(
        result["check_cli"]["mb_s"] / result["full_tokenization_batched"]["mb_s"], 1)
    out = ROOT / "benchmarks" / "results" / "check_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
