"""The report's plots, drawn with matplotlib's Agg canvas (no display needed) and returned as
base64 PNG data URIs for the HTML page to embed."""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.report.data import DetectorRun, ModelReport
from harness.verdicts import ERROR, FLAGGED, GLITCH, OK, SUSPECT

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLOURS = {GLITCH: "#c0392b", SUSPECT: "#e67e22", ERROR: "#8e44ad", OK: "#95a5a6",
           "all": "#7f8c8d", "flagged": "#c0392b"}


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
    styles = {OK: dict(marker=".", s=14, alpha=0.6),
              ERROR: dict(marker="s", s=16, alpha=0.8),
              SUSPECT: dict(marker="^", s=22, alpha=0.8),
              GLITCH: dict(marker="x", s=30, linewidths=1.3)}
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
    suspect = [r.final_counts().get(SUSPECT, 0) for r in reports]
    pos = np.arange(len(reports))
    ax.barh(pos - 0.2, glitch, height=0.4, color=COLOURS[GLITCH], label=GLITCH)
    ax.barh(pos + 0.2, suspect, height=0.4, color=COLOURS[SUSPECT], label=SUSPECT)
    for p, g, s in zip(pos, glitch, suspect, strict=True):
        ax.text(g, p - 0.2, f" {g:,}", va="center", fontsize="small")
        ax.text(s, p + 0.2, f" {s:,}", va="center", fontsize="small")
    ax.set_yticks(pos, labels)
    ax.invert_yaxis()
    ax.set_xlabel("tokens (final verdict)")
    ax.margins(x=0.15)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return _png(fig)


def _short(label: str, width: int) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]

