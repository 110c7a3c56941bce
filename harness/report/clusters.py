"""The report's k-means section (``harness clusters``, after Rumbelow & Watkins): per stored
clustering of a model, the seeds' agreement, the cluster sizes, the cluster holding the glitch
tokens and the tokens closest to the centroid of the whole matrix. Read through
``harness.clusters``; drawn with the report's matplotlib helpers; every stored text escaped."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from harness.clusters import ClusteringSummary, latest_summaries
from harness.verdicts import GLITCH, SUSPECT
from harness.vocab import token_repr

SHOWN_CLUSTERS = 15  # rows of the cluster table (the most notable first)
GLITCH_MEMBERS = 60  # glitch/suspect tokens of the glitch cluster listed
TOP = 20  # rows of the closest-to-centroid table


def load_clusterings(engine: Engine, model_id: int) -> list[ClusteringSummary]:
    """The model's latest clustering of each matrix, read back for the report ([] when
    ``harness clusters`` never ran on it)."""
    return latest_summaries(engine, model_id, top=TOP, shown=SHOWN_CLUSTERS)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _tok(shown: str) -> str:
    return f'<span class="tok">{_esc(shown)}</span>'


def _verdict(v: str | None) -> str:
    return f"<span class='v-{_esc(v)}'>{_esc(v)}</span>" if v else "–"


def sizes_plot(s: ClusteringSummary) -> str:
    """Each cluster's size (bars, sorted by the distance of its centroid to the centroid of
    the whole matrix, nearest left), its glitch and suspect tokens in colour."""
    from harness.report.plots import COLOURS, _figure, _png

    views = sorted(s.clusters, key=lambda v: (v.centroid_distance, v.cluster))
    pos = np.arange(len(views))
    size = np.array([v.size for v in views])
    glitch = np.array([v.glitch for v in views])
    suspect = np.array([v.suspect for v in views])
    fig, ax = _figure(6.4, 3.4)
    ax.bar(pos, size, width=0.85, color=COLOURS["all"], label="tokens")
    if s.verdict_run is not None:
        ax.bar(pos, suspect, width=0.85, bottom=glitch, color=COLOURS[SUSPECT], label=SUSPECT)
        ax.bar(pos, glitch, width=0.85, color=COLOURS[GLITCH], label=GLITCH)
    if s.glitch_cluster is not None:
        at = next(i for i, v in enumerate(views) if v.cluster == s.glitch_cluster)
        ax.annotate(f"cluster {s.glitch_cluster}", (at, size[at]), xytext=(0, 8),
                    textcoords="offset points", ha="center", fontsize="small",
                    arrowprops={"arrowstyle": "-", "color": COLOURS[GLITCH]})
    ax.set_yscale("log")
    ax.set_ylim(0.7, max(float(size.max(initial=1)), 1.0) * 6)  # room for the label above
    ax.set_xlabel("clusters, by distance of the centroid to the centroid of the whole matrix")
    ax.set_ylabel("tokens (log scale)")
    ax.set_xticks([])
    ax.set_title(f"{s.clustering.matrix} matrix: k = {s.clustering.k}, seed {s.seed}")
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")
    return _png(fig)


def _intro(s: ClusteringSummary) -> str:
    c = s.clustering
    runs = c.options.get("runs", {})
    seeds = []
    for seed in c.seeds:
        r = runs.get(str(seed), {})
        if r:
            state = "converged" if r.get("converged") else "stopped at the iteration limit"
            seeds.append(f"seed {seed}: {r.get('n_iter')} iterations, {state}, "
                         f"{float(r.get('wall_s', 0.0)):.1f} s")
    if c.agreement is not None:
        pairs = ", ".join(f"{a}–{b}: {float(ari):.3f}" for a, b, ari in c.options.get("pairs", []))
        agreement = (f"<b>{c.agreement:.3f}</b> <span class='meta'>(mean adjusted Rand index "
                     f"over the pairs of seeds: {_esc(pairs)}; 1 = the same partition, "
                     "0 = no more alike than chance)</span>")
    else:
        agreement = "<span class='meta'>one seed: nothing to compare</span>"
    stable = [v.stability for v in s.clusters if v.stability is not None]
    stability = ""
    if stable:
        stability = (f"{sum(x >= 0.9 for x in stable)} of {len(stable)} clusters found again "
                     f"under every other seed (best Jaccard index ≥ 0.9), "
                     f"{sum(x >= 0.5 for x in stable)} at least half (≥ 0.5)")
    rows = [("clustering", f"{c.id}, {_esc(c.created_utc)} UTC, {c.wall_s:.1f} s"),
            ("k, seeds", f"{c.k}; {_esc(', '.join(seeds))}"),
            ("agreement between seeds", agreement)]
    if stability:
        rows.append(("stable clusters", stability))
    if s.verdict_run is None:
        rows.append(("final verdicts", "<span class='note'>none stored: the glitch and suspect "
                                       "counts need a scan</span>"))
    elif s.glitch_cluster is not None:
        view = next(v for v in s.clusters if v.cluster == s.glitch_cluster)
        count = view.glitch if s.glitch_kind == GLITCH else view.suspect
        total = s.glitch_total if s.glitch_kind == GLITCH else \
            sum(v.suspect for v in s.clusters)
        rows.append((f"the {s.glitch_kind} tokens",
                     f"{count:,} of {total:,} in cluster <b>{s.glitch_cluster}</b> "
                     f"({view.size:,} tokens, {view.flagged_share:.0%} of them glitch or "
                     "suspect)"))
    kv = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{kv}</table>'


def _glitch_members(s: ClusteringSummary) -> str:
    if s.glitch_cluster is None or not s.glitch_members:
        return ""
    shown = s.glitch_members[:GLITCH_MEMBERS]
    items = " ".join(f"{_tok(t)}<sub class='meta'>{tid}</sub>" +
                     ("" if v == GLITCH else f"<sup class='v-{_esc(v)}'>{_esc(v)}</sup>")
                     for tid, t, v in shown)
    more = len(s.glitch_members) - len(shown)
    tail = f" <span class='meta'>… {more:,} more</span>" if more > 0 else ""
    return (f"<p>Glitch and suspect tokens of cluster {s.glitch_cluster}, nearest its centroid "
            f"first (id below):</p><p class='cluster-members' "
            f"data-cluster='{s.glitch_cluster}'>{items}{tail}</p>")


def _cluster_table(s: ClusteringSummary, model_id: int) -> str:
    scanned = s.verdict_run is not None
    body = []
    for v in s.clusters[:SHOWN_CLUSTERS]:
        mark = " class='glitch-cluster'" if v.cluster == s.glitch_cluster else ""
        members = " ".join(_tok(t) for _, t in v.members)
        body.append(
            f"<tr{mark}><td class='num'>{v.cluster}</td><td class='num'>{v.size:,}</td>"
            f"<td class='num'>{v.centroid_distance:.4f}</td>"
            f"<td class='num'>{'–' if v.stability is None else f'{v.stability:.2f}'}</td>"
            f"<td class='num'>{v.glitch if scanned else '–'}</td>"
            f"<td class='num'>{v.suspect if scanned else '–'}</td><td>{members}</td></tr>")
    return (f"<table class='clusters' data-model-id='{model_id}' "
            f"data-clustering-id='{s.clustering.id}'><thead><tr><th>cluster</th><th>size</th>"
            "<th>centroid to global centroid</th><th>stability</th><th>glitch</th>"
            "<th>suspect</th><th>members nearest its centroid</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _closest_table(s: ClusteringSummary, model_id: int) -> str:
    body = "".join(
        f"<tr><td class='num'>{i}</td><td class='num'>{n.token_id}</td>"
        f"<td>{_tok(token_repr(n.text, n.raw))}</td><td class='num'>{n.distance:.6f}</td>"
        f"<td class='num'>{'–' if n.cluster is None else n.cluster}</td>"
        f"<td>{_verdict(n.verdict)}</td></tr>"
        for i, n in enumerate(s.closest, 1))
    return (f"<table class='centroid' data-model-id='{model_id}' "
            f"data-clustering-id='{s.clustering.id}'><thead><tr><th>rank</th><th>id</th>"
            "<th>token</th><th>distance</th><th>cluster</th><th>final verdict</th></tr>"
            f"</thead><tbody>{body}</tbody></table>")


def clusters_html(summaries: list[ClusteringSummary], model_id: int) -> str:
    """The k-means section of one model (a note when ``harness clusters`` never ran)."""
    if not summaries:
        return ("<h3>k-means clusters of the embeddings</h3><p class='meta'>No clustering "
                "stored: <code>harness clusters MODEL</code> adds one.</p>")
    parts = []
    for s in summaries:
        m = s.clustering.matrix
        parts.append(
            f"<h3 id='clusters-{model_id}-{_esc(m)}'>k-means clusters of the {_esc(m)} "
            "embeddings</h3>" + _intro(s)
            + "<div class='plots'><figure><img src='" + sizes_plot(s) + "' alt='cluster sizes'>"
            "<figcaption>Cluster sizes (log scale), each cluster's glitch (red) and suspect "
            "(orange) tokens by final verdict, clusters ordered by how near their centroid "
            "sits to the centroid of the whole matrix.</figcaption></figure></div>"
            + _glitch_members(s)
            + f"<p>The {min(SHOWN_CLUSTERS, len(s.clusters))} most notable of {len(s.clusters)} "
              f"clusters (seed {s.seed}): most glitch tokens first, then most suspect, then "
              "the centroid nearest the global centroid. Stability: the mean, over the other "
              "seeds, of the cluster's best Jaccard index with one of their clusters.</p>"
            + _cluster_table(s, model_id)
            + f"<h4>Tokens closest to the centroid of the {_esc(m)} matrix</h4>"
              "<p>Rumbelow &amp; Watkins' table: the tokens whose embedding sits nearest the "
              "mean of all token embeddings (Euclidean distance).</p>"
            + _closest_table(s, model_id))
    return "".join(parts)
