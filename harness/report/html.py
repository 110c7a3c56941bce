"""The report as one self-contained HTML page: inline styles, plots embedded as data URIs,
every stored text HTML-escaped; the file needs nothing but itself to display."""

from __future__ import annotations

import html
import itertools
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from harness import __version__
from harness.paths import display_url
from harness.report.clusters import clusters_html
from harness.report.data import TABLE_CAP, ModelReport, load_models
from harness.report.plots import bar_chart, histogram, scatter
from harness.verdicts import FLAGGED, GLITCH, SUSPECT, VERDICTS
from harness.vocab import token_repr

EXAMPLES = 8  # shared glitch tokens named per pair of models

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1180px; margin: 0 auto; padding: 1.5em 2em; background: #fff; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #c0392b; padding-bottom: 0.2em; margin-top: 2.2em; }
h3 { margin-top: 1.6em; }
.meta { color: #555; }
code, .tok { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace;
             font-size: 0.92em; }
.tok { background: #f4f4f4; padding: 0 0.25em; border-radius: 3px; white-space: pre-wrap;
       word-break: break-all; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 12em; }
.plots { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; flex: 1 1 520px; max-width: 660px; }
figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #444; margin-top: 0.3em; }
.v-glitch { color: #c0392b; font-weight: 600; }
.v-suspect { color: #d35400; }
.v-error { color: #8e44ad; }
.note { background: #fff8e1; border-left: 4px solid #e67e22; padding: 0.4em 0.8em; }
ul.ev { margin: 0; padding-left: 1.1em; }
tr.glitch-cluster td { background: #fdecea; }
footer { margin-top: 3em; color: #777; font-size: 0.85em; }
"""


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included)."""
    return html.escape(str(value), quote=True)


def token_html(text: str, raw: bytes = b"") -> str:
    """``token_repr`` of a token (or of any text) as an HTML-escaped span: safe for any
    content."""
    return _tok_span(token_repr(text, raw))


def _tok_span(shown: str) -> str:
    return f'<span class="tok">{esc(shown)}</span>'


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "unknown"


def _prob(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"


def _figure_html(src: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="{src}" alt="{esc(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _header(rep: ModelReport) -> str:
    final = rep.final_counts()
    if rep.final is not None:
        summary = ", ".join(f'<span class="v-{v}">{final.get(v, 0):,} {v}</span>'
                            for v in VERDICTS if final.get(v) or v in (GLITCH, SUSPECT))
        final_cell = f"{summary} <span class='meta'>(verdict run {rep.final.run_id})</span>"
    else:
        final_cell = ("none stored: the scans ran no behavioural detector (run "
                      f"<code>harness scan {esc(rep.model.ref)}</code> with the default detectors)")
    rows = [("model", f"<b>{esc(rep.model.alias or rep.model.ref)}</b>"
             + (f" <span class='meta'>({esc(rep.model.ref)})</span>" if rep.model.alias else "")),
            ("backend", esc(rep.model.backend)),
            ("vocabulary", f"{rep.model.vocab_size:,} tokens"),
            ("fingerprint", f"<code>{esc(rep.model.fingerprint)}</code>"),
            ("first scanned", _when(rep.model.created_utc)),
            ("latest run finished", _when(rep.last_run_utc)),
            ("final verdicts", final_cell)]
    kv = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    det_rows = []
    for run in rep.runs.values():
        c = run.counts()
        cells = "".join(f'<td class="num">{c.get(v, 0):,}</td>' for v in VERDICTS)
        wall = f"{run.wall_s:.1f} s" if run.wall_s is not None else "–"
        det_rows.append(f"<tr><td><b>{esc(run.name)}</b></td><td class='num'>{run.run_id}</td>"
                        f"<td class='num'>{run.token_ids.size:,}</td>{cells}"
                        f"<td>{_when(run.finished_utc)}</td><td class='num'>{wall}</td></tr>")
    head = "".join(f"<th>{v}</th>" for v in VERDICTS)
    return (f'<table class="kv">{kv}</table>'
            "<h3>Verdicts of each detector (latest runs)</h3>"
            f"<table><tr><th>detector</th><th>run</th><th>tokens</th>{head}"
            f"<th>finished</th><th>wall</th></tr>{''.join(det_rows)}</table>")


def _histograms(rep: ModelReport) -> str:
    figs = []
    for run in rep.runs.values():
        src = histogram(run)
        if src is None:
            figs.append(f"<p class='note'>{esc(run.name)}: run {run.run_id} stored no "
                        "scores.</p>")
            continue
        flagged = int(np.isin(run.verdicts, FLAGGED).sum())
        scope = ("every token" if run.token_ids.size >= rep.model.vocab_size
                 else f"{run.token_ids.size:,} of {rep.model.vocab_size:,} tokens")
        figs.append(_figure_html(
            src, f"histogram of {run.name} scores",
            f"<b>{esc(run.name)}</b> (run {run.run_id}, {scope}): distribution of the scores, "
            f"counts on a log scale; the {flagged:,} tokens it flagged (glitch or suspect) in "
            "red. The suspicious end is the "
            f"{'low' if run.suspicious_when == 'low' else 'high'} end."))
    return f"<div class='plots'>{''.join(figs)}</div>"


def _scatters(rep: ModelReport) -> str:
    if rep.final is None:
        return ("<p class='note'>No final verdicts are stored for this model, so there is no "
                "repeat probability to plot the static indicators against.</p>")
    if not rep.static:
        return "<p class='note'>No static detector run is stored for this model.</p>"
    figs = []
    for name in rep.static:
        src, n = scatter(rep, name)
        if src is None:
            figs.append(f"<p class='note'>{esc(name)}: no token has both a score and a "
                        "repeat probability.</p>")
            continue
        clipped = (f" {n['clipped']:,} tokens with probability 0 (text mode) are drawn at "
                   "the bottom edge." if n["clipped"] else "")
        figs.append(_figure_html(
            src, f"{name} against repeat probability",
            f"<b>{esc(name)}</b> score against the repeat probability from "
            f"{esc(rep.verifier or 'the verifier')} (log scale), for the {n['both']:,} "
            f"tokens that have both (of {rep.model.vocab_size:,}; only the probed candidates "
            f"have a repeat probability): {n.get('glitch', 0):,} verified glitch tokens as red "
            f"crosses, {n.get('suspect', 0):,} suspect as orange triangles, "
            f"{n.get('ok', 0):,} ok as grey dots, as in Land &amp; Bartolo's "
            f"“Fishing for Magikarp” plots.{clipped}"))
    return f"<div class='plots'>{''.join(figs)}</div>"


def _evidence(ev: dict[str, Any]) -> str:
    if "error" in ev:
        return f"<span class='v-error'>error: {esc(ev['error'])}</span>"
    completions = ev.get("completion") or {}
    probs = ev.get("p") or {}
    if not completions and not probs:
        return "<span class='meta'>–</span>"
    items = []
    for label in dict.fromkeys([*probs, *completions]):
        p = probs.get(label)
        got = completions.get(label)
        shown = token_html(got) if isinstance(got, str) else "<span class='meta'>–</span>"
        prob = f" <span class='meta'>p={_prob(p)}</span>" if isinstance(p, int | float) else ""
        items.append(f"<li><b>{esc(label)}</b>: {shown}{prob}</li>")
    extra = ""
    if ev.get("reencodes") is False:
        extra = "<div class='meta'>the token does not re-encode to itself</div>"
    return f"<ul class='ev'>{''.join(items)}</ul>{extra}"


def _structure(rep: ModelReport, structure: dict[str, Any] | None) -> str:
    """A token's structure facts as a collapsed block: the longer tokens that contain it,
    whether its text alone reaches it, its embedding neighbours (linked to their rows)."""
    if not structure:
        return "<span class='meta'>–</span>"
    inside = structure.get("contained_in", {})
    n = inside.get("count", 0)
    examples = ", ".join(token_html(x) for _, x in inside.get("examples", []))
    items = [f"<li>inside {n:,} longer token{'s' if n != 1 else ''}"
             + (f": {examples}" if examples else "") + "</li>"]
    if "reachable_alone" in structure:
        items.append("<li>its text alone tokenizes to it</li>" if structure["reachable_alone"]
                     else "<li>its text alone tokenizes to other tokens"
                     + (", reached only inside longer ones" if
                        structure.get("only_inside_longer") else "") + "</li>")
    if structure.get("neighbours"):
        near = "; ".join(
            f"<a href='#t{rep.model_id}-{nid}'>{token_html(text)}</a> "
            f"<span class='v-{esc(verdict)}'>{esc(verdict or '–')}</span> "
            f"<span class='meta'>{cos:.2f}</span>"
            for nid, text, verdict, cos in structure["neighbours"])
        items.append(f"<li>nearest embeddings: {near}</li>")
    summary = f"in {n:,}" + (", not alone" if structure.get("reachable_alone") is False else "")
    return f"<details><summary>{esc(summary)}</summary><ul class='ev'>{''.join(items)}</ul>" \
           "</details>"


ELICITED = 0.01  # the elicit detector's threshold: below it a token stays unspeakable


def _elicitation(e: Any) -> str:
    """A token's best stored elicitation: its probability and the prompt, as text and ids."""
    if e is None:
        return "<span class='meta'>–</span>"
    mark = "" if e.probability >= ELICITED else " class='v-glitch'"
    return (f"<span{mark}>p={_prob(e.probability)}</span> after "
            f"{_tok_span(repr(e.prompt_text))}<div class='meta'>ids "
            f"{esc(' '.join(map(str, e.prompt_ids)))}, {e.n_positions} positions, "
            f"{e.steps} steps, session {esc(e.session)}</div>")


def _token_table(rep: ModelReport) -> str:
    if rep.rows_kind == "none":
        what = "final verdict glitch or suspect" if rep.final is not None else "flagged"
        return f"<p>No token has a {what}.</p>"
    intro = {
        "glitch": f"{rep.rows_total:,} tokens have the final verdict <b>glitch</b> "
                  "(the model could not repeat them), least repeatable first.",
        "suspect": f"<span class='note'>No token was verified as a glitch token.</span> "
                   f"Shown instead: the {rep.rows_total:,} <b>suspect</b> tokens (flagged by "
                   "a detector, not verified as glitch tokens).",
        "flagged": f"<span class='note'>No final verdicts are stored.</span> Shown instead: "
                   f"the {rep.rows_total:,} tokens some detector <b>flagged</b> (not "
                   "verified).",
    }[rep.rows_kind]
    body = []
    elicited = any(r.elicitation is not None for r in rep.rows)
    for r in rep.rows:
        body.append(
            f"<tr id='t{rep.model_id}-{r.token_id}'><td class='num'>{r.token_id}</td>"
            f"<td>{token_html(r.text, r.raw)}</td>"
            f"<td>{esc(r.category)}</td><td class='v-{esc(r.verdict)}'>{esc(r.verdict)}</td>"
            f"<td class='num'>{_prob(r.repeat_prob)}</td>"
            f"<td>{esc(', '.join(r.flagged_by)) or '–'}</td><td>{_evidence(r.evidence)}</td>"
            f"<td>{_structure(rep, r.structure)}</td>"
            + (f"<td>{_elicitation(r.elicitation)}</td>" if elicited else "") + "</tr>")
    more = ""
    if rep.rows_total > len(rep.rows):
        view = "glitch_tokens" if rep.rows_kind == GLITCH else "final_verdicts"
        more = (f"<p class='note'>… and {rep.rows_total - len(rep.rows):,} more, not shown: "
                f"<code>harness sql \"SELECT * FROM {view} WHERE model_id = "
                f"{rep.model_id}\"</code> lists them all.</p>")
    evidence = esc(rep.verifier or 'the verifier')
    if elicited:
        tried = [r.elicitation for r in rep.rows if r.elicitation is not None]
        said = sum(e.probability >= ELICITED for e in tried)
        intro += (f" {len(tried):,} of them have an optimised prompt (<code>harness elicit"
                  f"</code> or the <code>elicit</code> detector): {said:,} of those the model "
                  f"says with probability at least {ELICITED} after it, {len(tried) - said:,} "
                  "stay unspeakable.")
    return (f"<p>{intro}</p><table class='tokens' data-model-id='{rep.model_id}' "
            f"data-kind='{rep.rows_kind}'><thead><tr><th>id</th><th>token</th>"
            "<th>category</th><th>verdict</th><th>repeat prob.</th><th>flagged by</th>"
            f"<th>evidence: {evidence} completion per prompt</th>"
            "<th>structure</th>"
            + ("<th>best optimised prompt (elicitation)</th>" if elicited else "")
            + "</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>{more}")


def _keys(rep: ModelReport, by_id: bool) -> list[Any]:
    """What aligns ``rep``'s glitch tokens with another model's: the token id, or the raw
    bytes; a row without bytes (padding past the tokenizer) aligns with nothing."""
    if by_id:
        return list(rep.glitch_ids)
    return [raw if raw else ("row", rep.model_id, t)
            for t, raw in zip(rep.glitch_ids, rep.glitch_raw, strict=True)]


def _overlap(reports: list[ModelReport]) -> str:
    rows = []
    for a, b in itertools.combinations(reports, 2):
        same = a.model.tokenizer_hash == b.model.tokenizer_hash
        key_a, key_b = _keys(a, same), _keys(b, same)
        text_a: dict[Any, str] = {}
        for k, t in zip(key_a, a.glitch_shown, strict=True):
            text_a.setdefault(k, t)  # tokens with the same bytes count once
        set_b = set(key_b)
        both = [t for k, t in text_a.items() if k in set_b]
        n_a, n_b = len(text_a.keys() - set_b), len(set_b - text_a.keys())
        union = len(text_a.keys() | set_b)
        examples = " ".join(_tok_span(t) for t in both[:EXAMPLES])
        if len(both) > EXAMPLES:
            examples += f" <span class='meta'>… {len(both) - EXAMPLES:,} more</span>"
        rows.append(
            f"<tr><td>{esc(a.label)}</td><td>{esc(b.label)}</td>"
            f"<td>{'token id (same tokenizer)' if same else 'raw bytes (different tokenizers)'}"
            f"</td><td class='num'>{len(both):,}</td><td class='num'>{n_a:,}</td>"
            f"<td class='num'>{n_b:,}</td><td class='num'>"
            f"{(len(both) / union if union else 0):.2f}</td><td>{examples or '–'}</td></tr>")
    chart = _figure_html(
        bar_chart(reports), "glitch tokens per model",
        "Tokens with the final verdict glitch (red) and suspect (orange) per model.")
    return ("<h2 id='overlap'>Overlap between the models</h2>"
            "<p>Glitch tokens (final verdict) of each pair of models: token ids are compared "
            "when both models share a tokenizer (same tokenizer hash), else the tokens' raw "
            "bytes (embedding rows past the tokenizer have no bytes and align with nothing "
            "then).</p>"
            "<table class='overlap'><thead><tr><th>model A</th><th>model B</th>"
            "<th>aligned by</th><th>in both</th><th>only A</th><th>only B</th>"
            "<th>Jaccard</th><th>shared glitch tokens (A's text)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table><div class='plots'>{chart}</div>")


def render(reports: list[ModelReport], source: str = "") -> str:
    """The HTML document for already-loaded models."""
    parts = []
    toc = "".join(f"<li><a href='#model-{r.model_id}'>{esc(r.label)}</a> "
                  f"({len(r.glitch_ids):,} glitch)</li>" for r in reports)
    if len(reports) > 1:
        toc += "<li><a href='#overlap'>Overlap between the models</a></li>"
    parts.append(f"<ul>{toc}</ul>")
    for rep in reports:
        parts.append(f"<section id='model-{rep.model_id}'><h2>{esc(rep.label)}</h2>")
        parts.append(_header(rep))
        parts.append("<h3>Indicator distributions</h3>" + _histograms(rep))
        parts.append("<h3>Static indicators against verification</h3>" + _scatters(rep))
        title = {GLITCH: "Glitch tokens", SUSPECT: "Suspect tokens (none verified)",
                 "flagged": "Flagged tokens (no final verdicts)",
                 "none": "Glitch tokens"}[rep.rows_kind]
        parts.append(f"<h3>{title}</h3>" + _token_table(rep))
        parts.append(clusters_html(rep.clusterings, rep.model_id) + "</section>")
    if len(reports) > 1:
        parts.append(_overlap(reports))
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    names = ", ".join(r.label for r in reports)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>glitch-harness report: {esc(names)}</title><style>{CSS}</style></head>"
            "<body><h1>Glitch-token report</h1>"
            f"<p class='meta'>{len(reports)} model{'s' if len(reports) != 1 else ''} from "
            f"<code>{esc(source)}</code>; everything below was read from stored runs "
            "(nothing was scanned to make it).</p>"
            + "\n".join(parts)
            + f"<footer>glitch-harness {esc(__version__)}, generated {generated}.</footer>"
              "</body></html>\n")


def build_report(engine: Engine, models: list[str], cap: int = TABLE_CAP) -> str:
    """One self-contained HTML report of ``models`` (aliases, references or fingerprints, as
    ``harness evaluate`` takes them) from the runs stored in ``engine``'s database."""
    return render(load_models(engine, models, cap), display_url(engine.url))
