"""The ``harness`` command line (typer); plugins add commands with ``register_commands``."""

from __future__ import annotations

import csv
import inspect
import json
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy.engine import make_url

from harness import __version__, paths
from harness.clusters import DEFAULT_K, DEFAULT_TOP
from harness.db import open_db
from harness.errors import HarnessError
from harness.kmeans import DEFAULT_MAX_ITER, DEFAULT_TOL
from harness.options import parse_assignments
from harness.plugins import get_plugin_manager, registry
from harness.readonly_sql import DEFAULT_TIMEOUT_S, query_readonly
from harness.report import build_report
from harness.runner import DEFAULT_CANDIDATES, FINISHED, Reporter, scan
from harness.summary import top_tokens, verdict_counts
from harness.verdicts import ERROR, FINAL, FLAGGED, GLITCH, SKIPPED, SUSPECT, VERDICTS
from harness.vocab import token_repr


def _console(stream: Any, **kwargs: Any) -> Console:
    """Rich's console on ``stream``, 150 columns wide where the stream is not a terminal (a
    pipe, a log file, CI): rich's 80 would cut the token table's columns to a letter or two
    and break progress notes mid-sentence. ``COLUMNS`` still decides where it is set."""
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(width=150 if wide else None, **kwargs)


out = _console(sys.stdout)
err = _console(sys.stderr, stderr=True)

DbOption = Annotated[str | None, typer.Option(
    "--db", help="Database file or SQLAlchemy URL (default: $HARNESS_DB, else the data dir).")]
BackendOptions = Annotated[list[str] | None, typer.Option(
    "--backend-option", "-b", help="Backend option NAME=VALUE (repeatable); `harness plugins` "
    "lists what each backend takes.")]


def _db_url(db: str | None) -> str:
    return paths.db_url(db) if db else paths.default_db_url()


class RichReporter(Reporter):
    """Draws the scan's stages as rich progress bars on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    @contextmanager
    def status(self, message: str):
        task = self.progress.add_task(message, total=None)
        try:
            yield
        finally:
            self.progress.update(task, visible=False)
            self.progress.remove_task(task)

    def start(self, label: str, total: int) -> Callable[[int], None]:
        task = self.progress.add_task(label, total=total)
        return lambda n: self.progress.advance(task, n)

    def note(self, message: str) -> None:
        self.progress.console.print(f"[dim]{escape(message)}[/]", highlight=False)


def _progress(transient: bool = False) -> Progress:
    """Progress bars on stderr; none when stderr is not a terminal (a log file, a pipe), where
    rich would only print their final state and a stray blank line before an error."""
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=err,
                    transient=transient, disable=not err.is_terminal)


def _parse_options(options: list[str]) -> dict[str, dict[str, Any]]:
    parsed: dict[str, dict[str, Any]] = {}
    for item in options:
        key, sep, value = item.partition("=")
        det, dot, opt = key.partition(".")
        if not sep or not dot or not opt:
            raise HarnessError(f"bad option {item!r}: write DETECTOR.KEY=VALUE, "
                               "e.g. embedding-centroid.z=4")
        parsed.setdefault(det.strip(), {})[opt.strip()] = value
    return parsed


def _backend_options(items: list[str] | None) -> dict[str, str]:
    """The ``-b NAME=VALUE`` options, by name (checked against the backend when it loads)."""
    return parse_assignments(items or [], "--backend-option", "-b threads=4")


def _detector_names(detectors: str | None) -> list[str]:
    """The names ``--detectors`` gives; those that run by default when it is not given."""
    if detectors is None:
        return registry().default_detectors()
    names = [d.strip() for d in detectors.split(",") if d.strip()]
    if not names:
        raise HarnessError("--detectors names no detector")
    return names


def token_markup(text: str) -> str:
    """``token_repr`` of a token's text, escaped for rich markup."""
    return escape(token_repr(text))


def cmd_scan(
    model: Annotated[str, typer.Argument(help="Alias, BACKEND:TARGET, .gguf file or HF folder.")]
    = "smollm2",
    detectors: Annotated[str | None, typer.Option(
        "--detectors", "-d", help="Comma-separated detector names (default: the detectors "
        "that run by default, marked in `harness plugins`).")] = None,
    db: DbOption = None,
    backend: Annotated[str | None, typer.Option(help="Backend to load the model with.")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Detector option DETECTOR.KEY=VALUE (repeatable).")] = None,
    top: Annotated[int, typer.Option(help="How many suspicious tokens to list.")] = 25,
    fresh: Annotated[bool, typer.Option(
        help="Run every detector again instead of reusing stored runs.")] = False,
    full: Annotated[bool, typer.Option(
        "--full", help="Every token through the behavioural detectors, no screen first (the "
                       "exact path; slow).")] = False,
    candidates: Annotated[float | None, typer.Option(
        help="Budget mode: verify only the static detectors' most suspicious tokens, per "
             f"detector a fraction of the vocabulary (below 1, e.g. {DEFAULT_CANDIDATES}) "
             "or a count; no screen.")] = None,
    tokens: Annotated[str | None, typer.Option(
        help="Comma-separated token ids: run the behavioural detectors on exactly these; or "
             "final verdicts (e.g. glitch,suspect): on the tokens the model's latest stored "
             "verdicts call so.")]
    = None,
    backend_option: BackendOptions = None,
) -> None:
    """Scan MODEL: static detectors on every token, a behavioural screen of every token,
    verification of what it does not settle and of what the static detectors flag, and one
    final verdict per token."""
    names = _detector_names(detectors)
    token_ids = token_verdicts = None
    if tokens is not None:
        items = [t.strip() for t in tokens.split(",") if t.strip()]
        if items and all(t in VERDICTS for t in items):
            token_verdicts = items
        else:
            try:
                token_ids = [int(t) for t in items]
            except ValueError:
                raise HarnessError(f"--tokens takes comma-separated token ids or final "
                                   f"verdicts ({', '.join(VERDICTS)}), not {tokens!r}"
                                   ) from None
    engine = open_db(_db_url(db))
    backend_options = _backend_options(backend_option)
    progress = _progress()
    with progress:
        result = scan(model, engine, names, backend=backend, backend_options=backend_options,
                      detector_options=_parse_options(option or []), fresh=fresh,
                      reporter=RichReporter(progress), full=full, candidates=candidates,
                      tokens=token_ids, token_verdicts=token_verdicts)
    out.print(f"[bold]{escape(result.ref.alias or result.ref.ref)}[/] "
              f"({escape(result.ref.ref)}), {result.vocab_size} tokens, "
              f"model loaded in {result.load_s:.1f} s")
    if result.screened is not None:
        out.print(f"  every token screened; {result.candidates:,} verified (not settled by "
                  "the screen, or flagged by a static detector)")
    elif result.candidates is not None:
        scope = "every token" if result.candidates == result.vocab_size else \
            f"{result.candidates} tokens"
        out.print(f"  behavioural detectors ran on {scope}")
    done: dict[str, int] = {}
    failed = False
    for o in result.outcomes + ([result.verdict] if result.verdict else []):
        if o.status in FINISHED:
            counts = verdict_counts(engine, o.run_id)
            summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            timing = f"{o.wall_s:.2f} s" if o.status != "reused" else "stored run reused"
            out.print(f"  {o.detector}: {summary} ({timing}, run {o.run_id})")
            done[o.detector] = o.run_id
        else:
            failed = failed or o.status == "failed"
            out.print(f"  {o.detector}: [yellow]{o.status}[/]: {escape(o.reason or '')}")
    final = done.pop(FINAL, None)
    ranked = top_tokens(engine, result.model_id, done, top, final_run=final)
    if ranked:
        name = escape(result.ref.alias or result.ref.ref)
        table = Table(title=f"Most suspicious tokens of {name}")
        table.add_column("id", justify="right")
        table.add_column("token", overflow="fold", min_width=16)
        table.add_column("category")
        if final is not None:
            table.add_column("verdict")
        table.add_column("flagged", justify="right")
        for det in done:
            table.add_column(det.replace("-", "-\n", 1), justify="right")
        for r in ranked:
            cells = []
            for det in done:
                s = r.scores[det]
                mark = "[red]*[/]" if r.verdicts[det] in FLAGGED else ""
                cells.append(("-" if s is None else f"{s:.4f}") + mark)
            verdict = [_styled(r.final or "-")] if final is not None else []
            table.add_row(str(r.token_id), token_markup(r.text), r.category, *verdict,
                          f"{r.n_flagged}/{len(done)}", *cells)
        out.print(table)
        view = "glitch_tokens" if final is not None else "flagged_tokens"
        out.print("[dim]* flagged by that detector. Query everything with "
                  f"`harness sql \"SELECT * FROM {view}\"`.[/]")
    if failed:
        raise typer.Exit(1)


def _styled(verdict: str) -> str:
    colour = {GLITCH: "bold red", SUSPECT: "yellow", ERROR: "magenta"}.get(verdict)
    return f"[{colour}]{verdict}[/]" if colour else verdict


def cmd_evaluate(
    model: Annotated[str, typer.Argument(help="A scanned model: alias or ref.")],
    truth: Annotated[str, typer.Option(
        help="File of token ids or strings (one a line), or a probe set with a known list "
             "(e.g. repeat-12: the 141 GPT-2/GPT-J glitch tokens).")],
    db: DbOption = None,
    positive: Annotated[str, typer.Option(
        help="Verdicts that count as calling a token glitchy (comma-separated).")] = GLITCH,
    show: Annotated[int, typer.Option(help="How many missed tokens to list.")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Precision, recall and F1 of MODEL's stored verdicts against known glitch tokens."""
    from harness.evaluate import evaluate, load_truth

    wanted = tuple(v.strip() for v in positive.split(",") if v.strip())
    allowed = [v for v in VERDICTS if v != SKIPPED]
    if set(wanted) - set(allowed) or not wanted:
        raise HarnessError(f"--positive takes verdicts {', '.join(allowed)} (got {positive!r})")
    engine = open_db(_db_url(db))
    ev = evaluate(engine, model, load_truth(truth, registry()), wanted)
    if as_json:
        sys.stdout.write(json.dumps(ev.as_dict(), ensure_ascii=False, indent=2) + "\n")
        return
    out.print(f"[bold]{escape(ev.model)}[/] verdict run {ev.run_id}: positive = "
              f"{', '.join(ev.positive)}; truth {ev.n_truth} tokens, "
              f"{len(ev.not_in_vocab)} not in this vocabulary")
    out.print(f"  precision {ev.precision:.3f}  recall {ev.recall:.3f}  F1 {ev.f1:.3f}  "
              f"(true pos {ev.true_pos}, false pos {ev.false_pos}, false neg {ev.false_neg})")
    if ev.missed:
        table = Table(title=f"Missed ({len(ev.missed)})")
        for c in ("id", "token", "verdict", "repeat prob"):
            table.add_column(c)
        for t, s, v, p in ev.missed[:show]:
            table.add_row(str(t), token_markup(s), v, "-" if p is None else f"{p:.4f}")
        out.print(table)


FORMATS = ("table", "json", "csv", "markdown")


def cmd_compare(
    models: Annotated[list[str], typer.Argument(help="Two or more models (alias or ref).")],
    detectors: Annotated[str | None, typer.Option(
        "--detectors", "-d", help="Detectors to compare, scanned where missing (default: "
        "the detectors that run by default).")] = None,
    db: DbOption = None,
    stored: Annotated[bool, typer.Option(
        "--stored", help="Compare what is stored; scan nothing, load no model.")] = False,
    candidates: Annotated[float | None, typer.Option(
        help="Where a scan is needed, the budget mode: candidates per static detector.")]
    = None,
    fmt: Annotated[str, typer.Option(
        "--format", help="table, json, csv or markdown.")] = "table",
    top: Annotated[int, typer.Option(help="How many tokens to list per set.")] = 15,
    backend_option: BackendOptions = None,
) -> None:
    """Compare the glitch tokens of MODELS: counts, overlap, Jaccard index and rank
    correlation per detector and for the final verdict; tokens glitchy in all or in one."""
    from harness.compare import compare, load_side
    from harness.compare_format import render

    if fmt not in FORMATS:
        raise HarnessError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if len(models) < 2:
        raise HarnessError("compare needs at least two models")
    names = _detector_names(detectors)
    backend_options = _backend_options(backend_option)
    engine = open_db(_db_url(db))
    sides = []
    for model in models:
        if stored:
            model_id, label, runs = stored_runs(engine, model, names)
        else:
            progress = _progress(transient=True)
            with progress:
                result = scan(model, engine, names, backend_options=backend_options,
                              reporter=RichReporter(progress), candidates=candidates)
            failed = [o for o in result.outcomes if o.status in ("failed", "skipped")]
            for o in failed:
                err.print(f"[yellow]{escape(model)}: {o.detector} {o.status}[/]: "
                          f"{escape(o.reason or '')}")
            runs = {o.detector: o.run_id for o in result.outcomes if o not in failed}
            if result.verdict is not None:
                runs[FINAL] = result.verdict.run_id
            model_id, label = result.model_id, result.ref.alias or result.ref.ref
        sides.append(load_side(engine, label, model_id, runs))
    render(compare(sides, top), fmt, out)


def stored_runs(engine: Any, model: str, names: list[str]) -> tuple[int, str, dict[str, int]]:
    """A stored model's latest finished run of each detector in ``names`` and of the final
    verdict."""
    from harness import store
    from harness.evaluate import find_model

    model_id, label = find_model(engine, model)
    with engine.connect() as conn:
        latest = store.latest_done_runs(conn, model_id)
    runs = {r.detector: r.id for r in latest if r.detector in names or r.detector == FINAL}
    if not runs:
        raise HarnessError(f"{label!r} has no finished run of {', '.join(names)}: run "
                           f"`harness scan {model}` first")
    return model_id, label, runs


def cmd_models(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List model aliases and what they resolve to."""
    reg = registry()
    aliases = sorted(reg.models.values(), key=lambda a: a.alias)
    if as_json:
        out.print_json(json.dumps([
            {"alias": a.alias, "target": a.describe_target(), "backend": a.backend,
             "description": a.description, "package": a.source} for a in aliases]))
        return
    table = Table(title="Model aliases")
    table.add_column("alias", no_wrap=True)
    table.add_column("resolves to", overflow="fold")
    table.add_column("backend", no_wrap=True)
    table.add_column("package", overflow="fold")
    for a in aliases:
        table.add_row(a.alias, escape(a.describe_target()),
                      a.backend or f"{reg.default_backend()} (default)", a.source)
    out.print(table)
    out.print("[dim]Also: BACKEND:TARGET (e.g. hf:openai-community/gpt2), "
              "or a path to a .gguf file or a Hugging Face model folder.[/]")


def _kind(cls: type) -> str:
    """What a detector class declares itself: static, screen, verifier or behavioural."""
    if not cls.behavioural:
        return "static"
    return "screen" if cls.screens else "verifier" if cls.verifies else "behavioural"


def cmd_plugins(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List every backend, detector, probe set and model alias, with the package it came from."""
    reg = registry()
    data = {
        "backends": [{"name": b.name, "default": b.default, "package": b.source,
                      "options": [{"name": o.name, "type": o.type.__name__,
                                   "default": o.default, "help": o.help} for o in b.options]}
                     for b in reg.backends.values()],
        "detectors": [{"name": n, "version": d.cls.version, "kind": _kind(d.cls),
                       "default": d.cls.default, "requires": sorted(d.cls.requires),
                       "description": d.cls.description, "package": d.source}
                      for n, d in reg.detectors.items()],
        "probes": [{"name": n, "description": p.probe_set.description,
                    "templates": len(p.probe_set.templates), "package": p.source}
                   for n, p in reg.probes.items()],
        "models": [{"name": a.alias, "target": a.describe_target(), "package": a.source}
                   for a in reg.models.values()],
        "plugins": [name for name, _ in get_plugin_manager().list_name_plugin()],
    }
    if as_json:
        out.print_json(json.dumps(data))
        return
    shown = {"backends": ("name", "default", "options", "package"),
             "detectors": ("name", "version", "kind", "default", "requires", "package"),
             "probes": ("name", "templates", "package"), "models": ("name", "package")}
    for kind, cols in shown.items():
        table = Table(title=kind.capitalize() if kind != "probes" else "Probe sets")
        for c in cols:
            table.add_column(c, no_wrap=c in ("name", "kind", "default"), overflow="fold")
        for r in data[kind]:
            if kind == "backends":
                r = {**r, "options": [f"{o['name']}={o['type']}" for o in r["options"]]}
            table.add_row(*[escape(", ".join(r[c]) if isinstance(r[c], list) else
                                   ("yes" if r[c] else "") if isinstance(r[c], bool) else
                                   str(r[c])) for c in cols])
        out.print(table)
    out.print("[dim]Descriptions: harness plugins --json[/]")


def cmd_sql(
    query: Annotated[str, typer.Argument(help="One SELECT statement.")],
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Rows as a JSON list.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Rows as CSV.")] = False,
    timeout: Annotated[float, typer.Option(
        help="Seconds before the query is stopped.")] = DEFAULT_TIMEOUT_S,
) -> None:
    """Run a read-only SQL query on the results database."""
    if as_json and as_csv:
        raise HarnessError("choose one of --json and --csv")
    cols, rows = query_readonly(_db_url(db), query, timeout_s=timeout)

    def cell(v: Any) -> Any:
        # PostgreSQL hands back timestamps, numerics (a sum) and bytes as such
        if isinstance(v, bytes | memoryview):
            return bytes(v).hex()
        if isinstance(v, datetime | date):
            return v.isoformat(sep=" ") if isinstance(v, datetime) else v.isoformat()
        if isinstance(v, Decimal):
            return int(v) if v == v.to_integral_value() else float(v)
        return v

    if as_json:
        sys.stdout.write(json.dumps([{c: cell(v) for c, v in zip(cols, r, strict=True)}
                                     for r in rows], ensure_ascii=False, indent=2) + "\n")
    elif as_csv:
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows([[cell(v) for v in r] for r in rows])
    else:
        table = Table()
        for c in cols:
            table.add_column(escape(c))
        for r in rows:
            table.add_row(*[escape(repr(v) if isinstance(v, bytes) else str(v)) for v in r])
        out.print(table)
        err.print(f"[dim]{len(rows)} row{'s' if len(rows) != 1 else ''}[/]")


def cmd_report(
    models: Annotated[list[str], typer.Argument(
        help="Scanned models: aliases, references (as harness scan takes them) or "
             "fingerprints.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    db: DbOption = None,
) -> None:
    """Write one self-contained HTML report (plots embedded) of the stored scans of MODELS."""
    url = _db_url(db)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and \
            not Path(parsed.database).exists():
        raise HarnessError(f"no database at {parsed.database}: run `harness scan "
                           f"{models[0]}` first")
    if output.is_dir():
        raise HarnessError(f"--output {output} is a folder; give a file name")
    if not output.parent.is_dir():
        raise HarnessError(f"cannot write {output}: no folder {output.parent}")
    engine = open_db(url)
    try:
        page = build_report(engine, models)
    finally:
        engine.dispose()
    output.write_text(page, encoding="utf-8")
    print(f"wrote {output} ({len(page) / 1024:,.0f} KiB)")


def _open_inputs(files: list[str]) -> list[tuple[str, Any]]:
    """(name, binary stream) of each input; ``-`` (or none given) is standard input."""
    streams = []
    for f in files or ["-"]:
        if f == "-":
            streams.append(("<stdin>", sys.stdin.buffer))
            continue
        path = Path(f)
        if path.is_dir():
            raise HarnessError(f"{f} is a folder; give files")
        try:
            streams.append((f, path.open("rb")))
        except OSError as exc:
            raise HarnessError(f"cannot read {f}: {exc.strerror or exc}") from None
    return streams


def cmd_check(
    model: Annotated[str, typer.Argument(help="A scanned model: alias, reference or "
                                              "fingerprint.")],
    files: Annotated[list[str] | None, typer.Argument(
        help="Text files (or JSON lines with --field); none or - reads standard input.")]
    = None,
    field: Annotated[str | None, typer.Option(
        "--field", help="Read JSON lines and check this field's string (a.b for nested "
                        "objects).")] = None,
    suspect: Annotated[bool, typer.Option(
        "--suspect", "--include-suspect",
        help="Report tokens whose final verdict is suspect too.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per finding and line; the summary goes to "
                       "stderr.")] = False,
    db: DbOption = None,
) -> None:
    """Find MODEL's glitch tokens in text, tokenized with the model's own tokenizer (no
    weights are loaded). Each finding: FILE:LINE:COLUMN (1-based line and character column;
    for JSON lines FILE:LINE and the 0-based character offset in the field), the token and
    its final verdict; then the count per token. Exit status 1 when a glitch token (or, with
    --suspect, a suspect one) was found, else 2 when an input or line could not be read (it
    is named on stderr and skipped), else 0."""
    import time
    from collections import Counter

    from harness.check import BadInput, check_json_lines, check_text, open_checker

    engine = open_db(_db_url(db))
    inputs = _open_inputs(files or [])
    checker = open_checker(engine, model, include_suspect=suspect)
    counts: Counter[int] = Counter()
    bad = 0
    t0 = time.perf_counter()
    write = sys.stdout.write
    try:
        for name, stream in inputs:
            events = check_json_lines(checker, name, stream, field) if field else \
                check_text(checker, name, stream)
            for ev in events:
                if isinstance(ev, BadInput):
                    bad += 1
                    err.print(f"[yellow]skipped:[/] {escape(str(ev))}", highlight=False,
                              soft_wrap=True)
                    continue
                counts[ev.token_id] += 1
                if as_json:
                    write(json.dumps(ev.as_dict(), ensure_ascii=False) + "\n")
                else:
                    where = f"{ev.column}" if ev.field is None else \
                        f" {ev.field}+{ev.offset}"
                    write(f"{ev.source}:{ev.line}:{where}: {ev.verdict} {ev.token_id} "
                          f"{token_repr(ev.token)}\n")
            if stream is not sys.stdin.buffer:
                stream.close()
    finally:
        checker.close()
    wall = time.perf_counter() - t0
    found = sum(counts.values())
    kinds = "glitch or suspect" if suspect else "glitch"
    lines = [f"{checker.model}: {found:,} {kinds} token occurrence{'s' if found != 1 else ''}"
             f" of {len(counts)} token{'s' if len(counts) != 1 else ''} in {len(inputs)} "
             f"input{'s' if len(inputs) != 1 else ''} ({wall:.1f} s)"
             + (f"; {bad} unreadable line{'s' if bad != 1 else ''} skipped" if bad else "")]
    for t, n in counts.most_common():
        lines.append(f"  {n:>8,}  {t:>7} {checker.verdicts[t]:<7} "
                     f"{token_repr(checker.texts[t])}")
    summary = "\n".join(lines) + "\n"
    if as_json:
        sys.stderr.write(summary)
    else:
        write(summary)
    if found:
        raise typer.Exit(1)
    if bad:
        raise typer.Exit(2)


def cmd_export(
    model: Annotated[str, typer.Argument(help="A scanned model: alias, reference or "
                                              "fingerprint.")],
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="text (one token a line), json (ids, text, evidence), "
                               "logit-bias (OpenAI-style logit_bias object, ids to -100) or "
                               "llamacpp (--logit-bias ID-inf arguments).")] = "text",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write to this file instead of standard output.")] = None,
    suspect: Annotated[bool, typer.Option(
        "--include-suspect", "--suspect",
        help="Export tokens whose final verdict is suspect too.")]
    = False,
    db: DbOption = None,
) -> None:
    """Export MODEL's glitch tokens (its latest final verdicts) as a block list."""
    from harness.export import FORMATS, load_export, render

    if fmt not in FORMATS:
        raise HarnessError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if output is not None and (output.is_dir() or not output.parent.is_dir()):
        raise HarnessError(f"cannot write {output}: give a file in an existing folder")
    page = render(load_export(open_db(_db_url(db)), model, include_suspect=suspect), fmt)
    if output is None:
        sys.stdout.write(page)
    else:
        output.write_text(page, encoding="utf-8")


def cmd_show(
    model: Annotated[str, typer.Argument(help="A scanned model: alias, reference or "
                                              "fingerprint.")],
    token: Annotated[str, typer.Argument(
        help="A token id, or its exact text (in double quotes as a JSON string to keep "
             "leading spaces: '\" the\"').")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    db: DbOption = None,
) -> None:
    """Everything stored about one token: its text and category, its final verdict, every
    detector's findings for it in every run, and its tokenizer-structure facts (the longer
    tokens that contain it, what its text alone tokenizes to, its nearest embedding
    neighbours and their verdicts)."""
    from harness.evaluate import find_model
    from harness.stored_tokenizer import stored_model_tokenizer
    from harness.token_info import describe_facts, load_token_info

    engine = open_db(_db_url(db))
    model_id, _ = find_model(engine, model)
    try:  # what the text alone tokenizes to, where the tokenizer can be had without weights
        tokenizer = stored_model_tokenizer(engine, model_id)
    except HarnessError:
        tokenizer = None
    try:
        info = load_token_info(engine, model, token, tokenizer)
    finally:
        if tokenizer is not None:
            tokenizer.close()
    if as_json:
        sys.stdout.write(json.dumps(info.as_dict(), ensure_ascii=False, indent=2) + "\n")
        return
    out.print(f"[bold]{escape(info.model)}[/] token {info.token_id} "
              f"{token_markup(info.text)}  raw {escape(repr(info.raw))}  category "
              f"{escape(info.category)}" + (f" ({escape(info.attr)})" if info.attr else ""))
    prob = "" if info.repeat_prob is None else f", repeat probability {info.repeat_prob:.3g}"
    out.print(f"final verdict: {_styled(info.final or 'none (no verdict run)')}{prob}")
    table = Table(title="Findings, every detector and run")
    for c in ("run", "detector", "finished", "score", "verdict", "evidence"):
        table.add_column(c, overflow="fold", justify="right" if c in ("run", "score") else
                         "left")
    for f in info.findings:
        table.add_row(str(f.run_id), escape(f.detector), escape(f"{f.finished_utc:%Y-%m-%d %H:%M}"
                      if f.finished_utc else f.status), "-" if f.score is None else
                      f"{f.score:.4g}", _styled(f.verdict), escape(f.evidence_json or ""))
    out.print(table)
    out.print("[bold]structure[/]" + ("" if info.facts_stored else " (computed now)"))
    for line in describe_facts(info):
        out.print(f"  {escape(line)}", highlight=False)
def _seed_list(seeds: int | None, seed: list[int] | None) -> list[int]:
    """The seeds ``--seeds N`` (0..N-1) or ``--seed S`` (repeatable) give."""
    from harness.clusters import DEFAULT_SEEDS

    if seeds is not None and seed:
        raise HarnessError("give --seeds N or --seed S (repeatable), not both")
    if seed:
        return list(seed)
    n = DEFAULT_SEEDS if seeds is None else seeds
    if n < 1:
        raise HarnessError(f"--seeds must be at least 1 (got {n})")
    return list(range(n))


def cmd_clusters(
    model: Annotated[str, typer.Argument(help="Alias, BACKEND:TARGET, .gguf file or HF folder.")],
    k: Annotated[int, typer.Option("-k", help="Clusters per k-means.")] = DEFAULT_K,
    seeds: Annotated[int | None, typer.Option(
        help="Run k-means with seeds 0..N-1 (default 3).")] = None,
    seed: Annotated[list[int] | None, typer.Option(
        "--seed", help="A seed to run (repeatable), instead of --seeds.")] = None,
    matrix: Annotated[str, typer.Option(
        help="auto (the input matrix, and the output matrix where it is not tied), input, "
             "output or both.")] = "auto",
    top: Annotated[int, typer.Option(
        help="Rows of the table of tokens closest to the centroid of the whole matrix.")]
    = DEFAULT_TOP,
    show: Annotated[int, typer.Option(
        "--clusters", help="How many clusters to list (the most notable first).")] = 12,
    max_iter: Annotated[int, typer.Option(help="Most Lloyd iterations per seed.")]
    = DEFAULT_MAX_ITER,
    tol: Annotated[float, typer.Option(
        help="Stop when an iteration lowers the inertia (sum of squared distances) by no more "
             "than this fraction of it; 0: only when no token changes cluster.")]
    = DEFAULT_TOL,
    as_json: Annotated[bool, typer.Option("--json", help="Everything as JSON on stdout.")]
    = False,
    db: DbOption = None,
    backend: Annotated[str | None, typer.Option(help="Backend to load the model with.")] = None,
    backend_option: BackendOptions = None,
) -> None:
    """k-means of MODEL's token embeddings (after Rumbelow & Watkins, 2023): clusters
    under several seeds and their agreement (adjusted Rand index), each token's cluster
    stored, the cluster holding the glitch tokens, and the tokens closest to the centroid of
    the whole matrix."""
    from harness.clusters import cluster_model, load_summary

    if top < 0 or show < 0:
        raise HarnessError("--top and --clusters must be zero or more")
    seed_list = _seed_list(seeds, seed)
    engine = open_db(_db_url(db))
    progress = _progress(transient=True)
    with progress:
        run = cluster_model(model, engine, k=k, seeds=seed_list, matrix=matrix,
                            backend=backend, backend_options=_backend_options(backend_option),
                            max_iter=max_iter, tol=tol, reporter=RichReporter(progress))
    summaries = [load_summary(engine, run.model_id, m.clustering_id, top, shown=show)
                 for m in run.matrices]
    if as_json:
        sys.stdout.write(json.dumps({
            "model": run.label, "ref": run.ref.ref, "model_id": run.model_id,
            "tokens": run.n_tokens, "tied": run.tied, "load_s": run.load_s, "notes": run.notes,
            "clusterings": [s.as_dict() for s in summaries]}, ensure_ascii=False, indent=2)
            + "\n")
        return
    out.print(f"[bold]{escape(run.label)}[/] ({escape(run.ref.ref)}), {run.n_tokens:,} tokens, "
              f"model loaded in {run.load_s:.1f} s")
    for note in run.notes:
        out.print(f"  [dim]{escape(note)}[/]")
    for m, summary in zip(run.matrices, summaries, strict=True):
        _print_clustering(m, summary, show)


def _print_clustering(m: Any, s: Any, show: int) -> None:
    """One matrix's clustering: the seeds, their agreement, the clusters, the tokens closest
    to the centroid."""
    out.print(f"\n[bold]{m.matrix} embeddings[/] ({m.rows:,} × {m.dim}), k = {m.k}, "
              f"clustering {m.clustering_id}, {m.wall_s:.1f} s")
    for r in m.seeds:
        state = "converged" if r.converged else "[yellow]stopped at --max-iter[/]"
        empty = f", {r.empty} empty clusters" if r.empty else ""
        out.print(f"  seed {r.seed}: {r.n_iter} iterations, {state}, {r.wall_s:.1f} s, "
                  f"inertia {r.inertia:,.1f}{empty}")
    if m.agreement is not None:
        pairs = ", ".join(f"{a}–{b}: {ari:.3f}" for a, b, ari in m.pairs)
        out.print(f"  agreement between the seeds (adjusted Rand index, mean of "
                  f"{len(m.pairs)} pair{'s' if len(m.pairs) != 1 else ''}): "
                  f"[bold]{m.agreement:.3f}[/] ({pairs})")
    else:
        out.print("  [dim]one seed: no agreement to measure (give --seeds 2 or more)[/]")
    if s.verdict_run is None:
        out.print("  [dim]no final verdicts stored for this model: run `harness scan` for the "
                  "glitch and suspect counts per cluster[/]")
    elif s.glitch_cluster is not None:
        view = next(v for v in s.clusters if v.cluster == s.glitch_cluster)
        count = view.glitch if s.glitch_kind == GLITCH else view.suspect
        total = s.glitch_total if s.glitch_kind == GLITCH else \
            sum(v.suspect for v in s.clusters)
        out.print(f"  the {s.glitch_kind} tokens: {count} of {total} in cluster "
                  f"[bold]{s.glitch_cluster}[/] ({view.size:,} tokens)")
    stable = [v.stability for v in s.clusters if v.stability is not None]
    title = (f"Clusters of seed {s.seed} ({min(show, len(s.clusters))} of {len(s.clusters)}, "
             "most glitch tokens first, then nearest the global centroid)")
    table = Table(title=title)
    for col, justify in (("cluster", "right"), ("size", "right"), ("to centroid", "right"),
                         ("stability", "right"), ("glitch", "right"), ("suspect", "right"),
                         ("members nearest its centroid", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for v in s.clusters[:show]:
        mark = " [red]◀[/]" if v.cluster == s.glitch_cluster else ""
        table.add_row(f"{v.cluster}{mark}", f"{v.size:,}", f"{v.centroid_distance:.4f}",
                      "-" if v.stability is None else f"{v.stability:.2f}",
                      str(v.glitch) if s.verdict_run is not None else "-",
                      str(v.suspect) if s.verdict_run is not None else "-",
                      " ".join(escape(t) for _, t in v.members))
    if show:
        out.print(table)
    if stable:
        n90 = sum(x >= 0.9 for x in stable)
        n50 = sum(x >= 0.5 for x in stable)
        out.print(f"  [dim]stability: mean best Jaccard index of the cluster's tokens with a "
                  f"cluster of each other seed; {n90} of {len(stable)} clusters ≥ 0.9, "
                  f"{n50} ≥ 0.5[/]")
    if s.closest:
        table = Table(title=f"Tokens closest to the centroid of the {m.matrix} matrix")
        for col in ("rank", "id", "token", "distance", "cluster", "verdict"):
            table.add_column(col, justify="left" if col in ("token", "verdict") else "right",
                             overflow="fold")
        for i, n in enumerate(s.closest, 1):
            table.add_row(str(i), str(n.token_id), token_markup_raw(n.text, n.raw),
                          f"{n.distance:.6f}", "-" if n.cluster is None else str(n.cluster),
                          _styled(n.verdict) if n.verdict else "-")
        out.print(table)
    out.print(f"[dim]Each token's cluster: `harness sql \"SELECT * FROM token_clusters WHERE "
              f"clustering_id = {m.clustering_id}\"`.[/]")


def token_markup_raw(text: str, raw: bytes) -> str:
    """``token_repr`` of a token (its bytes where they are not UTF-8), escaped for rich."""
    return escape(token_repr(text, raw))


def cmd_elicit(
    model: Annotated[str, typer.Argument(help="Alias, BACKEND:TARGET, .gguf file or HF folder.")],
    target: Annotated[str, typer.Argument(
        help="The text the model should say next (with --ids: comma-separated token ids).")],
    positions: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 8,
    steps: Annotated[int, typer.Option(help="Optimisation steps at most.")] = 100,
    restarts: Annotated[int, typer.Option(
        help="Random starts, all in one batch; restart R starts from seed SEED+R.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the first restart.")] = 0,
    lr: Annotated[float, typer.Option(help="Adam's learning rate.")] = 0.3,
    reg: Annotated[float, typer.Option(
        help="Weight of the distance to the nearest token in the loss.")] = 0.1,
    swaps: Annotated[int, typer.Option(
        help="Gradient-ranked one-token changes tried per restart and step (0: pure PEZ).")]
    = 16,
    stop_at: Annotated[float, typer.Option(
        help="A restart stops once its prompt gives the target this probability.")] = 0.9,
    ids: Annotated[bool, typer.Option(
        "--ids", help="TARGET is token ids (e.g. a token no text encodes to).")] = False,
    allow_target: Annotated[bool, typer.Option(
        "--allow-target", help="Let the prompt hold the target's own tokens (the model may "
                               "then just copy them).")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    db: DbOption = None,
    backend: Annotated[str | None, typer.Option(help="Backend to load the model with.")] = None,
    backend_option: BackendOptions = None,
) -> None:
    """Optimise prompts that make MODEL say TARGET (Rumbelow & Watkins' prompt generation): gradient
    descent in the embedding space, projected onto real tokens; every restart is stored."""
    from harness.elicitation import ElicitOptions, run_session

    options = ElicitOptions(positions=positions, steps=steps, lr=lr, reg=reg, swaps=swaps,
                            stop_at=stop_at, allow_target=allow_target)
    engine = open_db(_db_url(db))
    progress = _progress(transient=True)
    with progress:
        s = run_session(engine, model, target, restarts=restarts, seed=seed, options=options,
                        as_ids=ids, backend=backend,
                        backend_options=_backend_options(backend_option),
                        reporter=RichReporter(progress))
    if as_json:
        sys.stdout.write(json.dumps({
            "model": s.label, "model_id": s.model_id, "session": s.session,
            "target": s.target_text, "target_ids": s.target_ids,
            "options": {**options.__dict__, "restarts": restarts, "seed": seed},
            "wall_s": round(s.wall_s, 3),
            "restarts": [{"restart": f.row.restart, "seed": f.row.seed,
                          "probability": f.probability, "steps": f.steps,
                          "prompt_ids": f.prompt_ids, "prompt_text": t,
                          "wall_s": round(f.wall_s, 3)}
                         for f, t in zip(s.results, s.prompt_texts, strict=True)],
            "token_frequencies": [{"id": t, "text": x, "count": n}
                                  for t, x, n in s.frequencies]},
            ensure_ascii=False, indent=2) + "\n")
        return
    table = Table(title=f"Prompts that make {escape(s.label)} say "
                        f"{token_markup(s.target_text)} {s.target_ids}")
    for c in ("restart", "seed", "p(target)", "steps", "prompt", "prompt ids"):
        table.add_column(c, justify="right" if c in ("restart", "seed", "steps") else "left",
                         overflow="fold")
    for f, t in sorted(zip(s.results, s.prompt_texts, strict=True),
                       key=lambda ft: -ft[0].probability):
        table.add_row(str(f.row.restart), str(f.row.seed), f"{f.probability:.4g}",
                      str(f.steps), token_markup(t), " ".join(map(str, f.prompt_ids)))
    out.print(table)
    freq = Table(title="Tokens the optimiser kept choosing (count over restarts)")
    for c in ("id", "token", "count"):
        freq.add_column(c, justify="right" if c != "token" else "left")
    for t, x, n in s.frequencies:
        freq.add_row(str(t), token_markup(x), str(n))
    out.print(freq)
    out.print(f"[dim]{len(s.results)} restarts in {s.wall_s:.1f} s, stored as session "
              f"{s.session}: harness sql \"SELECT * FROM elicitations WHERE session = "
              f"'{s.session}'\"[/]")


def cmd_db_path(db: DbOption = None) -> None:
    """Print where the results database is."""
    print(paths.display_url(_db_url(db)))


def build_app() -> typer.Typer:
    app = typer.Typer(name="harness", no_args_is_help=True, pretty_exceptions_enable=False,
                      add_completion=False,
                      help="Find glitch tokens in language models; every result goes to SQLite.")
    app.command("scan")(cmd_scan)
    app.command("evaluate")(cmd_evaluate)
    app.command("compare")(cmd_compare)
    app.command("models")(cmd_models)
    app.command("plugins")(cmd_plugins)
    app.command("sql")(cmd_sql)
    app.command("report")(cmd_report)
    app.command("check")(cmd_check)
    app.command("export")(cmd_export)
    app.command("show")(cmd_show)
    app.command("clusters")(cmd_clusters)
    app.command("elicit")(cmd_elicit)
    db_app = typer.Typer(help="The results database.", no_args_is_help=True)
    db_app.command("path")(cmd_db_path)
    app.add_typer(db_app, name="db")

    @app.callback(invoke_without_command=True)
    def _root(version: Annotated[bool, typer.Option("--version")] = False) -> None:
        if version:
            print(f"glitch-harness {__version__}")
            raise typer.Exit()

    get_plugin_manager().hook.register_commands(app=app)
    for info in app.registered_commands:
        if info.short_help is None:  # typer's list keeps the docstring's line breaks
            doc = inspect.cleandoc(info.help or (info.callback and info.callback.__doc__) or "")
            info.short_help = " ".join(doc.partition("\n\n")[0].split()) or None
    return app


def _click_classes(name: str) -> tuple[type, ...]:
    """Click's exception class ``name``, from click and from the copy of click that newer
    typer releases carry inside them (``typer._click``): whichever parses the command line."""
    found = {getattr(click.exceptions, name)}
    found.update(c for c in typer.BadParameter.__mro__ if c.__name__ == name)
    if hasattr(typer, name):  # typer.Exit, typer.Abort
        found.add(getattr(typer, name))
    return tuple(found)


USAGE_ERRORS = _click_classes("UsageError")
CLICK_ERRORS = _click_classes("ClickException")
EXITS = _click_classes("Exit")
ABORTS = _click_classes("Abort")


def _usage_error(exc: Any) -> int:
    """A mistake in the command line: its usage line and the reason, on stderr."""
    message = exc.format_message()
    if not message:  # a group called without a command: click printed its help already
        return exc.exit_code
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        err.print(escape(ctx.get_usage().strip()), highlight=False, soft_wrap=True)
    hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    flag = getattr(exc, "option_name", None)  # an unknown option: a backend's, given as a flag?
    if flag:
        key = flag.lstrip("-").replace("-", "_")
        owners = [b.name for b in registry().backends.values()
                  if any(o.name == key for o in b.options)]
        if owners:
            hint = (f"; {flag} is an option of backend {', '.join(owners)}: write "
                    f"-b {key}=VALUE (--backend-option)")
    err.print(f"[red]error:[/] {escape(message)}{escape(hint)}", highlight=False,
              soft_wrap=True)
    return exc.exit_code


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line on stderr (a command-line mistake also its
    usage line) and exit 2, never a traceback."""
    try:
        app = build_app()
        code = app(args=argv, prog_name="harness", standalone_mode=False)
        if isinstance(code, int) and code:  # a command's typer.Exit(code), returned by click
            sys.exit(code)
    except HarnessError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except EXITS as exc:
        sys.exit(exc.exit_code)
    except USAGE_ERRORS as exc:
        sys.exit(_usage_error(exc))
    except CLICK_ERRORS as exc:
        err.print(f"[red]error:[/] {escape(exc.format_message())}", highlight=False,
                  soft_wrap=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, *ABORTS):
        err.print("interrupted: finished batches are saved; run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
