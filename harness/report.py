"""``harness report``: one self-contained HTML file of what the database holds about models.

The report reads stored runs only (it never loads or scans a model). Plots are drawn with
matplotlib's Agg canvas and embedded as base64 PNG data URIs; the styles are inline, so the
file needs nothing but itself to display.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from sqlalchemy.engine import Connection, Engine, make_url

from harness import __version__, paths, store
from harness.cli import DbOption
from harness.db import open_db
from harness.errors import HarnessError
from harness.evaluate import find_model
from harness.store import StoredModel
from harness.verdicts import FINAL, FLAGGED, VERDICTS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TABLE_CAP = 200  # rows of the glitch-token table per model
EXAMPLES = 8  # shared glitch tokens named per pair of models

COLOURS = {"glitch": "#c0392b", "suspect": "#e67e22", "error": "#8e44ad", "ok": "#95a5a6",
           "all": "#7f8c8d", "flagged": "#c0392b"}


@dataclass
class DetectorRun:
    """The latest finished run of one detector on one model, with every finding's score."""

    name: str
    run_id: int
    suspicious_when: str
    options: dict[str, Any]
    finished_utc: datetime | None
    wall_s: float | None
    token_ids: np.ndarray
    scores: np.ndarray  # float, nan where the run stored no score
    verdicts: np.ndarray  # object (str)

    def counts(self) -> dict[str, int]:
        """How many findings of this run carry each verdict."""
        names, n = np.unique(self.verdicts.astype(str), return_counts=True)
        return {str(k): int(v) for k, v in zip(names, n, strict=True)}

    def score_of(self, size: int) -> np.ndarray:
        """The scores spread over token ids ``0..size-1`` (nan where the run has none)."""
        out = np.full(size, np.nan)
        out[self.token_ids] = self.scores
        return out

    def verdict_of(self, size: int) -> np.ndarray:
        """The verdicts spread over token ids ``0..size-1`` ("" where the run has none)."""
        out = np.full(size, "", dtype=object)
        out[self.token_ids] = self.verdicts
        return out


@dataclass
class TokenRow:
    """One row of a model's glitch-token table."""

    token_id: int
    text: str
    raw: bytes
    category: str
    verdict: str
    repeat_prob: float | None
    flagged_by: list[str]
    evidence: dict[str, Any]


@dataclass
class ModelReport:
    """Everything the report shows about one stored model."""

    model: StoredModel
    label: str
    runs: dict[str, DetectorRun]  # detector name -> latest run, the verdict run excluded
    static: list[str]  # names in ``runs`` of the detectors that read the weights only
    final: DetectorRun | None  # the latest run of the ``verdict`` pseudo-detector
    verifier: str | None  # the detector whose run gave the final verdicts' evidence
    rows: list[TokenRow] = field(default_factory=list)
    rows_kind: str = "glitch"  # glitch | suspect | flagged (no final verdicts) | none
    rows_total: int = 0
    glitch_ids: list[int] = field(default_factory=list)
    glitch_raw: list[bytes] = field(default_factory=list)
    glitch_shown: list[str] = field(default_factory=list)  # token_repr of each

    @property
    def model_id(self) -> int:
        """The stored model's id."""
        return self.model.id

    @property
    def last_run_utc(self) -> datetime | None:
        """When the latest of the shown runs finished."""
        times = [r.finished_utc for r in [*self.runs.values(), self.final]
                 if r is not None and r.finished_utc is not None]
        return max(times) if times else None

    def final_counts(self) -> dict[str, int]:
        """Final verdict counts (empty without a verdict run)."""
        return self.final.counts() if self.final is not None else {}


# --- reading the database --------------------------------------------------------------------


def _as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _detector_kinds(names: list[str]) -> tuple[list[str], list[str]]:
    """(static detectors, verifying detectors) among ``names``, by their registered classes
    (a detector whose plugin is gone is neither)."""
    from harness.plugins import registry

    known = registry().detectors
    static = [n for n in names if n in known and not known[n].cls.behavioural]
    verifying = [n for n in names if n in known and known[n].cls.verifies]
    return static, verifying


def _load_run(conn: Connection, run: store.StoredRun) -> DetectorRun:
    ids, scores, verdicts = store.run_findings(conn, run.id)
    try:
        options = json.loads(run.options_json or "{}")
    except json.JSONDecodeError:
        options = {}
    return DetectorRun(run.detector, run.id, run.suspicious_when, options,
                       _as_datetime(run.finished_utc), run.wall_s, ids, scores, verdicts)


def load_model(engine: Engine, model: str, cap: int = TABLE_CAP) -> ModelReport:
    """Read one model's latest runs, final verdicts and glitch tokens from the database.

    ``model`` is resolved as ``harness evaluate`` resolves it (alias, reference, fingerprint).
    A model that is not stored, or has no finished run, raises ``HarnessError`` naming the
    ``harness scan`` command that fills the database.
    """
    model_id, name = find_model(engine, model)
    with engine.connect() as conn:
        m = store.model_by_id(conn, model_id)
        latest = store.latest_done_runs(conn, model_id)
        if not latest:
            raise HarnessError(f"{name!r} has no finished detector run in this database: "
                               f"run `harness scan {model}` first")
        runs = {r.detector: _load_run(conn, r) for r in latest}
    final = runs.pop(FINAL, None)
    static, verifying = _detector_kinds(list(runs))
    report = ModelReport(
        model=replace(m, created_utc=_as_datetime(m.created_utc)), label=name, runs=runs,
        static=static, final=final, verifier=None)
    _load_tokens(engine, report, verifying, cap)
    return report


def _load_tokens(engine: Engine, rep: ModelReport, verifying: list[str], cap: int) -> None:
    """Fill the glitch-token table (or the suspect / flagged ones) and the glitch sets."""
    evidence_runs: list[int] = []
    if rep.final is not None:
        used = rep.final.options.get("runs", {})  # the runs this verdict was drawn from
        for n in verifying:
            if n in used or n in rep.runs:
                rep.verifier = n
                ids = used.get(n) or [rep.runs[n].run_id]
                evidence_runs = [int(r) for r in (ids if isinstance(ids, list) else [ids])]
                break
    with engine.connect() as conn:
        if rep.final is not None:
            glitch = store.glitch_tokens(conn, rep.model_id, rep.final.run_id)
            rep.glitch_ids = [g[0] for g in glitch]
            rep.glitch_raw = [g[1] for g in glitch]
            rep.glitch_shown = [token_repr(g[2], g[1]) for g in glitch]
            kind = "glitch" if glitch else "suspect"
            found = store.findings_by_token(conn, rep.model_id, [rep.final.run_id], [kind])
            # the final verdict's score is the repeat probability: least repeatable first
            found.sort(key=lambda f: (f.min_score is None, f.min_score or 0.0, f.token_id))
        else:
            kind = "flagged"
            found = store.findings_by_token(conn, rep.model_id,
                                            [r.run_id for r in rep.runs.values()], FLAGGED)
            found.sort(key=lambda f: (-f.n_findings, f.token_id))  # most detectors first
        rep.rows_kind = kind if found else "none"
        rep.rows_total = len(found)
        shown = found[:cap]
        evidence: dict[int, dict] = {}
        if evidence_runs and shown:  # each token's latest verifier finding
            evidence = {t: _json(ev) for t, ev in store.latest_evidence(
                conn, evidence_runs, [f.token_id for f in shown]).items()}
    flagged_by = {}
    for det, run in rep.runs.items():
        for t in run.token_ids[np.isin(run.verdicts, FLAGGED)].tolist():
            flagged_by.setdefault(t, []).append(det)
    for f in shown:
        if kind == "flagged":
            by = flagged_by.get(f.token_id, [])
            score = None
            verdict = "glitch" if "glitch" in f.verdicts else "suspect"
        else:
            by = list(_json(f.evidence_json).get("flagged_by") or [])
            score = f.min_score
            verdict = f.verdicts[0]
        rep.rows.append(TokenRow(f.token_id, f.text, f.raw, f.category, verdict,
                                 None if score is None else float(score), by,
                                 evidence.get(f.token_id, {})))


def _json(value: str | None) -> dict:
    try:
        got = json.loads(value or "{}")
    except json.JSONDecodeError:
        return {}
    return got if isinstance(got, dict) else {}


# --- plots ----------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 3.6) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Figure) -> str:
    """The figure as a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _threshold(options: dict[str, Any]) -> float | None:
    t = options.get("threshold")
    return float(t) if isinstance(t, int | float) and math.isfinite(t) else None


def histogram(run: DetectorRun) -> str | None:
    """A histogram of one run's scores with its flagged tokens overlaid (log-scale counts);
    None when the run stored no finite score."""
    ok = np.isfinite(run.scores)
    values = run.scores[ok]
    if values.size == 0:
        return None
    flagged = values[np.isin(run.verdicts[ok], FLAGGED)]
    lo, hi = float(values.min()), float(values.max())
    log_x = lo > 0 and hi / lo > 1e3
    if log_x:
        bins = np.geomspace(lo, hi, 61)
    else:
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 61)
    fig, ax = _figure()
    ax.hist(values, bins=bins, color=COLOURS["all"], alpha=0.75, log=True,
            label=f"all scored tokens ({values.size:,})")
    if flagged.size:
        ax.hist(flagged, bins=bins, color=COLOURS["flagged"], log=True,
                label=f"flagged by {run.name} ({flagged.size:,})")
    threshold = _threshold(run.options)
    if threshold is not None and (not log_x or threshold > 0):
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
                   label=f"threshold {threshold:.4g}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(f"{run.name} score ({run.suspicious_when} = suspicious)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(run.name)
    ax.legend(fontsize="small")
    return _png(fig)


def scatter(rep: ModelReport, static: str) -> tuple[str | None, dict[str, int]]:
    """One static indicator (x) against the final repeat probability (y, log scale), glitch
    tokens marked; returns the image (None without data) and the counts shown."""
    assert rep.final is not None
    size = max(rep.model.vocab_size, int(rep.final.token_ids.max(initial=-1)) + 1,
               int(rep.runs[static].token_ids.max(initial=-1)) + 1)
    x = rep.runs[static].score_of(size)
    y = rep.final.score_of(size)
    verdict = rep.final.verdict_of(size)
    both = np.isfinite(x) & np.isfinite(y)
    counts = {"both": int(both.sum()), "clipped": 0}
    if not both.any():
        return None, counts
    positive = y[both & (y > 0)]
    floor = float(positive.min()) / 10 if positive.size else 1e-6
    clipped = both & (y <= 0)
    counts["clipped"] = int(clipped.sum())
    y = np.where(clipped, floor, y)
    fig, ax = _figure(6.4, 4.2)
    styles = {"ok": dict(marker=".", s=14, alpha=0.6),
              "error": dict(marker="s", s=16, alpha=0.8),
              "suspect": dict(marker="^", s=22, alpha=0.8),
              "glitch": dict(marker="x", s=30, linewidths=1.3)}
    for v, style in styles.items():
        pick = both & (verdict == v)
        counts[v] = int(pick.sum())
        if pick.any():
            ax.scatter(x[pick], y[pick], color=COLOURS[v], label=f"{v} ({pick.sum():,})",
                       **style)
    if rep.verifier is not None and rep.verifier in rep.runs:
        threshold = _threshold(rep.runs[rep.verifier].options)
        if threshold is not None and threshold > 0:
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
                       label=f"threshold {threshold:.4g}")
    ax.set_yscale("log")
    ax.set_xlabel(f"{static} score ({rep.runs[static].suspicious_when} = suspicious)")
    ax.set_ylabel("repeat probability (log scale)")
    ax.set_title(f"{static} vs. verification")
    ax.legend(fontsize="small")
    return _png(fig), counts


def bar_chart(reports: list[ModelReport]) -> str:
    """Glitch (and suspect) token counts per model."""
    fig, ax = _figure(6.4, 1.3 + 0.45 * len(reports))
    labels = [_short(r.label, 45).replace("$", r"\$") for r in reports]  # no mathtext
    glitch = [len(r.glitch_ids) for r in reports]
    suspect = [r.final_counts().get("suspect", 0) for r in reports]
    pos = np.arange(len(reports))
    ax.barh(pos - 0.2, glitch, height=0.4, color=COLOURS["glitch"], label="glitch")
    ax.barh(pos + 0.2, suspect, height=0.4, color=COLOURS["suspect"], label="suspect")
    for p, g, s in zip(pos, glitch, suspect, strict=True):
        ax.text(g, p - 0.2, f" {g:,}", va="center", fontsize="small")
        ax.text(s, p + 0.2, f" {s:,}", va="center", fontsize="small")
    ax.set_yticks(pos, labels)
    ax.invert_yaxis()
    ax.set_xlabel("tokens (final verdict)")
    ax.margins(x=0.15)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return _png(fig)


# --- HTML -----------------------------------------------------------------------------------

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
footer { margin-top: 3em; color: #777; font-size: 0.85em; }
"""


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included)."""
    return html.escape(str(value), quote=True)


def token_repr(value: str, raw: bytes = b"") -> str:
    """How a token is shown: its text as Python's ``repr`` prints it (quotes, escaped control
    characters and invisible code points); a token whose bytes are not UTF-8 (a lone byte
    of a multi-byte character) as its bytes, ``b'\\xf7'``."""
    if raw:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return repr(raw)
    return repr(value)


def show_token(value: str, raw: bytes = b"") -> str:
    """``token_repr`` of a token (or of any text), HTML-escaped: safe for any content."""
    return f'<span class="tok">{esc(token_repr(value, raw))}</span>'


def _show_repr(shown: str) -> str:
    return f'<span class="tok">{esc(shown)}</span>'


def _short(label: str, width: int) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]


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
                            for v in VERDICTS if final.get(v) or v in ("glitch", "suspect"))
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
        shown = show_token(got) if isinstance(got, str) else "<span class='meta'>–</span>"
        prob = f" <span class='meta'>p={_prob(p)}</span>" if isinstance(p, int | float) else ""
        items.append(f"<li><b>{esc(label)}</b>: {shown}{prob}</li>")
    extra = ""
    if ev.get("reencodes") is False:
        extra = "<div class='meta'>the token does not re-encode to itself</div>"
    return f"<ul class='ev'>{''.join(items)}</ul>{extra}"


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
    for r in rep.rows:
        body.append(
            f"<tr><td class='num'>{r.token_id}</td><td>{show_token(r.text, r.raw)}</td>"
            f"<td>{esc(r.category)}</td><td class='v-{esc(r.verdict)}'>{esc(r.verdict)}</td>"
            f"<td class='num'>{_prob(r.repeat_prob)}</td>"
            f"<td>{esc(', '.join(r.flagged_by)) or '–'}</td><td>{_evidence(r.evidence)}</td>"
            "</tr>")
    more = ""
    if rep.rows_total > len(rep.rows):
        view = "glitch_tokens" if rep.rows_kind == "glitch" else "final_verdicts"
        more = (f"<p class='note'>… and {rep.rows_total - len(rep.rows):,} more, not shown: "
                f"<code>harness sql \"SELECT * FROM {view} WHERE model_id = "
                f"{rep.model_id}\"</code> lists them all.</p>")
    evidence = esc(rep.verifier or 'the verifier')
    return (f"<p>{intro}</p><table class='tokens' data-model-id='{rep.model_id}' "
            f"data-kind='{rep.rows_kind}'><thead><tr><th>id</th><th>token</th>"
            "<th>category</th><th>verdict</th><th>repeat prob.</th><th>flagged by</th>"
            f"<th>evidence: {evidence} completion per prompt</th></tr></thead>"
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
        examples = " ".join(_show_repr(t) for t in both[:EXAMPLES])
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
        title = {"glitch": "Glitch tokens", "suspect": "Suspect tokens (none verified)",
                 "flagged": "Flagged tokens (no final verdicts)",
                 "none": "Glitch tokens"}[rep.rows_kind]
        parts.append(f"<h3>{title}</h3>" + _token_table(rep) + "</section>")
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
    if not models:
        raise HarnessError("name at least one scanned model")
    reports: list[ModelReport] = []
    for name in models:
        rep = load_model(engine, name, cap)
        if all(r.model_id != rep.model_id for r in reports):
            reports.append(rep)
    labels = [r.label for r in reports]
    for rep in reports:  # two fingerprints of one reference (e.g. two dtypes): tell them apart
        if labels.count(rep.label) > 1:
            parts = rep.model.fingerprint.split("|")  # backend|source|dtype|tok:hash
            dtype = f"{parts[2]}, " if len(parts) == 4 else ""
            rep.label = f"{rep.label} [{dtype}model {rep.model_id}]"
    url = engine.url
    source = (url.database or ":memory:") if url.get_backend_name() == "sqlite" else \
        url.render_as_string(hide_password=True)
    return render(reports, source)


def cmd_report(
    models: Annotated[list[str], typer.Argument(
        help="Scanned models: aliases, references (as harness scan takes them) or "
             "fingerprints.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    db: DbOption = None,
) -> None:
    """Write one self-contained HTML report (plots embedded) of the stored scans of MODELS."""
    url = paths.db_url(db) if db else paths.default_db_url()
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
