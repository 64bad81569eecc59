"""Plotly figures, one function per figure, each taking result objects (never computing them)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.subplots import make_subplots

from .attribute import Attribution
from .circuits import LayerMap
from .compare import check_same_shape
from .conditions import Condition
from .neurons import NeuronSet
from .plot_search import fresh_front, fresh_fronts, pareto_front  # noqa: F401  (search figures, re-exported: plot.pareto_front)
from .runs import atomic_write_text

log = logging.getLogger(__name__)


def layer_histogram(neurons: NeuronSet, title: str | None = None) -> go.Figure:
    """Bar chart: selected neurons per layer."""
    fig = go.Figure(go.Bar(x=list(range(neurons.n_layers)), y=neurons.per_layer_counts(), name="neurons"))
    fig.update_layout(
        title=title or f"{len(neurons)} selected neurons per layer",
        xaxis_title="layer",
        yaxis_title="neurons",
        template="plotly_white",
    )
    return fig


def attribution_heatmap(attr: Attribution, top_n: int = 64, exclude_layers: tuple[int, ...] = ()) -> go.Figure:
    """Signed diff of each layer's ``top_n`` neurons by |diff| (columns: rank within the layer)."""
    diff = attr.diff.clone()
    order = diff.abs().argsort(-1, descending=True)[:, :top_n]
    vals = diff.gather(1, order)
    layers = [layer for layer in range(attr.n_layers) if layer not in exclude_layers]
    z = vals[layers].tolist()
    text = [[f"L{layer} n{int(i)}" for i in order[layer]] for layer in layers]
    lim = float(vals[layers].abs().max())
    fig = go.Figure(
        go.Heatmap(
            z=z,
            y=layers,
            text=text,
            colorscale="RdBu_r",
            zmin=-lim,
            zmax=lim,
            hovertemplate="%{text}<br>diff=%{z:.3f}<extra></extra>",
            colorbar=dict(title="diff"),
        )
    )
    fig.update_layout(
        title=f"{attr.model_name}: top {top_n} neurons per layer by |mean(pos) − mean(neg)|",
        xaxis_title="rank within layer",
        yaxis_title="layer",
        template="plotly_white",
        height=600,
    )
    return fig


def circuit_map(lm: LayerMap) -> go.Figure:
    """Δ refusal score per layer (that layer's neurons ablated), and cumulative top-down / bottom-up."""
    x = list(range(len(lm.delta)))
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=x,
            y=lm.delta.tolist(),
            name="this layer only",
            customdata=list(lm.counts),
            hovertemplate="L%{x}: Δ=%{y:.3f} (%{customdata} neurons)",
        )
    )
    fig.add_trace(go.Scatter(x=x, y=lm.top_down.tolist(), mode="lines+markers", name="layers ≥ l"))
    fig.add_trace(go.Scatter(x=x, y=lm.bottom_up.tolist(), mode="lines+markers", name="layers ≤ l"))
    fig.update_layout(
        title=f"{lm.model_name}: where ablation removes refusal<br>(baseline score {lm.baseline:.2f}, "
        f"{lm.n_prompts} prompts)",
        xaxis_title="layer",
        yaxis_title="Δ mean refusal log-odds",
        template="plotly_white",
    )
    return fig


def neuron_scatter(
    a: Attribution,
    b: Attribution,
    top_a: NeuronSet | None = None,
    top_b: NeuronSet | None = None,
    background: int = 5000,
    seed: int = 0,
) -> go.Figure:
    """diff in model A vs diff in model B, neuron by neuron; top sets highlighted."""
    check_same_shape(a, b)
    da, db = a.diff.flatten(), b.diff.flatten()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(da.numel(), generator=g)[:background]
    fig = go.Figure(
        go.Scattergl(
            x=da[idx].tolist(),
            y=db[idx].tolist(),
            mode="markers",
            name="random neurons",
            marker=dict(size=3, color="lightgray"),
        )
    )
    for ns, name in ((top_a, f"top in {a.model_name}"), (top_b, f"top in {b.model_name}")):
        if ns is not None:
            flat = [la * a.d_mlp + ix for la, ix in zip(ns.layers, ns.indices)]
            fig.add_trace(
                go.Scattergl(
                    x=da[flat].tolist(),
                    y=db[flat].tolist(),
                    mode="markers",
                    name=name,
                    text=[f"L{la} n{ix}" for la, ix in zip(ns.layers, ns.indices)],
                    marker=dict(size=5, opacity=0.7),
                )
            )
    fig.update_layout(
        title="neuron-by-neuron: diff (harmful − harmless)",
        xaxis_title=f"diff, {a.model_name}",
        yaxis_title=f"diff, {b.model_name}",
        template="plotly_white",
    )
    return fig


def layer_profiles(profiles: dict[str, dict[str, list[float]]]) -> go.Figure:
    """Depth-normalized share of each model's top set per layer (models of different shapes)."""
    fig = go.Figure(
        [go.Scatter(x=p["depth"], y=p["share"], mode="lines+markers", name=name) for name, p in profiles.items()]
    )
    fig.update_layout(
        title="top-set share by relative depth",
        xaxis_title="relative depth (layer + ½) / n_layers",
        yaxis_title="share of the top set",
        template="plotly_white",
    )
    return fig


def dose_response(results: dict[str, Any]) -> go.Figure:
    """First-token refusal share on the validation prompts: CNA fraction × ranking (with random
    controls), CNA scale at the chosen point, CAA strength α (all layers and one layer)."""
    sweep = {Condition.parse(k): e for k, e in results["sweep"].items()}
    chosen = Condition.parse(results["chosen"])
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=("CNA: fraction of MLP neurons", "CNA: neuron scale", "CAA: strength α")
    )
    base = results["sweep"].get("baseline", {}).get("refusal_share")

    def trace(select, x_of, name, col, dash=None):
        pts = sorted((x_of(c), e["refusal_share"], tuple(e["ci"])) for c, e in sweep.items() if select(c))
        x, y, ci = zip(*pts) if pts else ((), (), ())
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=name,
                line=dict(dash=dash),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[c[1] - v for c, v in zip(ci, y)],
                    arrayminus=[v - c[0] for c, v in zip(ci, y)],
                ),
            ),
            row=1,
            col=col,
        )

    frac = lambda c: c.fraction  # noqa: E731
    for by in ("abs", "diff", "effect"):
        trace(lambda c, by=by: c.kind == "cna" and c.ranking == by and c.scale is None, frac, f"CNA {by}", 1)
        trace(lambda c, by=by: c.kind == "random" and c.ranking == by, frac, f"random ({by} counts)", 1, "dot")
    same = lambda c: c.kind == "cna" and (c.ranking, c.fraction) == (chosen.ranking, chosen.fraction)  # noqa: E731
    trace(lambda c: same(c) and c.scale is not None, lambda c: c.scale, f"CNA {chosen.label}", 2)
    trace(lambda c: c.kind == "caa", lambda c: c.alpha, "CAA (all layers)", 3)
    trace(lambda c: c.kind == "caa_layer", lambda c: c.alpha, "CAA (one layer)", 3, "dot")
    fig.update_xaxes(type="log", title_text="fraction", row=1, col=1)
    fig.update_xaxes(title_text="scale (0 = ablate, 1 = unchanged)", row=1, col=2)
    fig.update_xaxes(title_text="α", row=1, col=3)
    fig.update_yaxes(range=[-0.02, 1.02])
    fig.update_yaxes(title_text="share with refusal log-odds > 0", row=1, col=1)
    if base is not None:
        for col in (1, 2, 3):
            fig.add_hline(y=base, line_dash="dash", line_color="gray", row=1, col=col)
    fig.update_layout(
        title=f"Dose-response, {results['config']['model']} (validation, first-token score)",
        template="plotly_white",
        width=1300,
        height=450,
    )
    return fig


def method_curves(results: dict[str, Any], kl_zoom: float = 0.3) -> go.Figure:
    """Judged compliance on JBB harmful against KL on harmless prompts (left; middle: KL ≤ ``kl_zoom``)
    and against MMLU accuracy (right), one curve per method, every curve starting at the baseline; on
    the KL panels also the conditions read blind by hand (``results["hand_labels"]``, Wilson 95 % intervals)."""
    panels = ((1, "kl"), (2, "kl"), (3, "mmlu"))
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=("compliance vs KL", f"KL ≤ {kl_zoom:g} nats", "compliance vs MMLU")
    )
    for i, (method, pts) in enumerate(results.get("curves", {}).items()):
        labels = [Condition.parse(p["condition"]).label for p in pts]
        color = _PALETTE[i % len(_PALETTE)]
        for col, key in panels:
            shown = [(p[key], p["compliance"], t) for p, t in zip(pts, labels) if key in p]
            if not shown:
                continue
            x, y, text = zip(*shown)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    text=text,
                    mode="lines+markers",
                    name=method,
                    legendgroup=method,
                    showlegend=col == 1,
                    line=dict(color=color),
                    hovertemplate="%{text}<br>%{x:.3f}, %{y:.2f}",
                ),
                row=1,
                col=col,
            )
    kl = {p["condition"]: p["kl"] for pts in results.get("curves", {}).values() for p in pts if "kl" in p}
    hand = [(kl[c], h["comply"], c) for c, h in (results.get("hand_labels") or {}).items() if c in kl]
    if hand:
        x, r, text = zip(*hand)
        for col in (1, 2):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[h["rate"] for h in r],
                    error_y=dict(
                        type="data",
                        symmetric=False,
                        array=[h["ci"][1] - h["rate"] for h in r],
                        arrayminus=[h["rate"] - h["ci"][0] for h in r],
                    ),
                    text=[Condition.parse(c).label for c in text],
                    mode="markers",
                    name="read blind by hand",
                    legendgroup="hand",
                    showlegend=col == 1,
                    marker=dict(symbol="diamond-open", size=11, color="black"),
                    hovertemplate="%{text} (hand labels)<br>%{x:.3f}, %{y:.2f}",
                ),
                row=1,
                col=col,
            )
    chosen = results.get("chosen")
    fig.update_xaxes(title_text="KL on harmless prompts (nats)", row=1, col=1)
    fig.update_xaxes(title_text="KL on harmless prompts (nats)", range=[-0.02 * kl_zoom, kl_zoom], row=1, col=2)
    fig.update_xaxes(title_text="MMLU accuracy", row=1, col=3)
    fig.update_yaxes(range=[-0.02, 1.02])
    fig.update_yaxes(title_text="judged compliance (JBB harmful)", row=1, col=1)
    fig.update_layout(
        title=f"Methods, {results['config']['model']} (chosen CNA point {chosen})",
        template="plotly_white",
        width=1600,
        height=460,
    )
    return fig


_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def save_figures(figures: Mapping[str | os.PathLike, go.Figure], png: bool = True) -> list[Path]:
    """Write ``stem.html`` (self-contained but for plotly.js, from its CDN) for each ``stem: figure`` and, if
    static export works (kaleido + Chrome), ``stem.png``, all PNGs from one Chrome. A figure whose HTML on
    disk is the same text (and whose PNG is there) is left alone, so a resumed run redraws only what
    changed; a PNG is written before its HTML, so an interrupted write is redone. Returns the files."""
    todo, files = [], []  # (figure, html, png, html text) of the figures to write
    for stem, fig in figures.items():
        stem = Path(stem)
        html, image = stem.parent / f"{stem.name}.html", stem.parent / f"{stem.name}.png"  # names may hold dots
        text = pio.to_html(fig, include_plotlyjs="cdn", div_id="figure")  # a fixed id: the same figure, the same text
        if not (html.exists() and html.read_text(encoding="utf-8") == text and (image.exists() or not png)):
            image.unlink(missing_ok=True)  # it showed the figure before this one
            stem.parent.mkdir(parents=True, exist_ok=True)
            todo.append((fig, html, image, text))
        files += [html, image]
    if png and todo:
        figs = [t[0] for t in todo]
        try:  # write_images takes the size from its arguments only, not from the figures' layouts
            pio.write_images(
                figs,
                [t[2] for t in todo],
                scale=2,
                width=[f.layout.width for f in figs],
                height=[f.layout.height for f in figs],
            )
        except Exception as e:  # kaleido or a Chrome missing: HTML is still there
            log.warning("static PNG export failed (%s); wrote HTML only", e)
    for _, html, _, text in todo:
        atomic_write_text(html, text)
    return [f for f in files if f.exists()]


def save_figure(fig: go.Figure, stem: str | os.PathLike, png: bool = True) -> list[Path]:
    """:func:`save_figures` of one figure."""
    return save_figures({stem: fig}, png)
