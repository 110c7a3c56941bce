"""``harness compare`` output: a rich table, JSON, CSV (one row per detector and model pair)
or Markdown."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.compare import Comparison
from harness.vocab import token_repr

PAIR_COLUMNS = ("detector", "model_a", "model_b", "aligned_by", "shared_tokens", "flagged_a",
                "flagged_b", "flagged_a_shared", "flagged_b_shared", "both", "jaccard",
                "spearman")


def render(c: Comparison, fmt: str, console: Console) -> None:
    """Write ``c`` in ``fmt`` (table, json, csv or markdown) to stdout."""
    if fmt == "json":
        sys.stdout.write(json.dumps(c.as_dict(), ensure_ascii=False, indent=2) + "\n")
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(PAIR_COLUMNS)
        for p in c.pairs:
            w.writerow([_num(p[k]) for k in PAIR_COLUMNS])
    elif fmt == "markdown":
        sys.stdout.write(markdown(c))
    else:
        _tables(c, console)


def _num(v: Any) -> Any:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v)


def _label(d: str) -> str:
    return "final verdict (glitch)" if d == "verdict" else f"{d} (glitch or suspect)"


def _token(e: dict[str, Any]) -> str:
    ids = ", ".join(f"{m} {i}" for m, i in e["token_ids"].items())
    return f"{token_repr(e['text'])} ({ids})"


def _tables(c: Comparison, console: Console) -> None:
    for d in c.detectors:
        table = Table(title=f"{_label(d)}", title_justify="left")
        for col in ("model A", "model B", "aligned by", "shared", "flagged A", "flagged B",
                    "both", "Jaccard", "Spearman ρ"):
            table.add_column(col, justify="left" if col.startswith(("model", "aligned"))
                             else "right")
        for p in (p for p in c.pairs if p["detector"] == d):
            table.add_row(escape(p["model_a"]), escape(p["model_b"]), p["aligned_by"],
                          str(p["shared_tokens"]),
                          f"{p['flagged_a']} ({p['flagged_a_shared']} shared)",
                          f"{p['flagged_b']} ({p['flagged_b_shared']} shared)",
                          str(p["both"]), _num(p["jaccard"]) or "-",
                          _num(p["spearman"]) or "-")
        console.print(table)
        counts = "; ".join(f"{escape(m)}: " + ", ".join(f"{v} {n}" for v, n in
                                                          sorted(cs.items()))
                           for m, cs in c.counts[d].items())
        console.print(f"  verdicts: {counts}")
        shown = c.in_all[d]
        console.print(f"  flagged in every model ({len(shown)} shown): "
                      + (", ".join(escape(_token(e)) for e in shown) or "none"))
        for m, entries in c.only_in[d].items():
            console.print(f"  only in {escape(m)} ({len(entries)} shown): "
                          + (", ".join(escape(token_repr(e["text"])) for e in entries) or "none"))
        console.print()


def markdown(c: Comparison) -> str:
    """The comparison as Markdown: one section per detector."""
    lines = [f"# Comparison of {', '.join(c.models)}", ""]
    for d in c.detectors:
        lines += [f"## {_label(d)}", "",
                  "| model A | model B | aligned by | shared | flagged A | flagged B | both "
                  "| Jaccard | Spearman ρ |", "|---|---|---|---|---|---|---|---|---|"]
        for p in (p for p in c.pairs if p["detector"] == d):
            lines.append(f"| {p['model_a']} | {p['model_b']} | {p['aligned_by']} | "
                         f"{p['shared_tokens']} | {p['flagged_a']} | {p['flagged_b']} | "
                         f"{p['both']} | {_num(p['jaccard']) or '-'} | "
                         f"{_num(p['spearman']) or '-'} |")
        lines.append("")
        in_all = ", ".join(f"`{token_repr(e['text'])}`" for e in c.in_all[d]) or "none"
        lines += [f"Flagged in every model: {in_all}", ""]
        for m, entries in c.only_in[d].items():
            only = ", ".join(f"`{token_repr(e['text'])}`" for e in entries) or "none"
            lines += [f"Only in {m}: {only}", ""]
    return "\n".join(lines) + "\n"
