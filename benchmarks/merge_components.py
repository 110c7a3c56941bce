"""Do glitch tokens stand out in the tokenizer's merges? (a signal that would cost nothing)

Many missed glitch tokens were thought to be byte-pair intermediates: tokens the training data
shows almost only inside the longer token a merge builds from them. Counted here from a GGUF
file's own merge list: per token, how many merges take it as a component; the share of the
reference glitch tokens (`--truth`: ids, one per line) and of the whole vocabulary at each
count.

    .venv/bin/python benchmarks/merge_components.py smollm2 --truth GLITCH_IDS.txt

Writes benchmarks/results/merge_components_<model>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import gguf

from harness.plugins import registry
from harness.refs import resolve

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--truth", type=Path, required=True, help="glitch token ids, one a line")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    target = resolve(args.model, registry()).target
    reader = gguf.GGUFReader(target)
    tokens = reader.fields[gguf.Keys.Tokenizer.LIST].contents()
    uses: Counter[str] = Counter()
    for merge in reader.fields[gguf.Keys.Tokenizer.MERGES].contents():
        left, right = merge.split(" ", 1)
        uses[left] += 1
        uses[right] += 1
    glitch = [int(x) for x in args.truth.read_text().split()]

    def shares(ids: list[int]) -> dict[str, float]:
        counts = Counter(min(uses[tokens[t]], 3) for t in ids)
        return {("3+" if k == 3 else str(k)): round(counts[k] / len(ids), 4)
                for k in sorted(counts)}

    report = {"model": args.model, "vocab": len(tokens), "reference_glitch": len(glitch),
              "merges_taking_the_token": {"reference_glitch": shares(glitch),
                                          "vocabulary": shares(list(range(len(tokens))))},
              "reference_glitch_by_count": {t: uses[tokens[t]] for t in glitch}}
    print(json.dumps({k: v for k, v in report.items() if k != "reference_glitch_by_count"},
                     indent=1))
    out = args.out or ROOT / "benchmarks" / "results" / f"merge_components_{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
