"""Plotly figures, one function per figure, each taking result objects (never computing them)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .neurons import NeuronSet

log = logging.getLogger(__name__)


def layer_histogram(neurons: NeuronSet, title: str | None = None) -> go.Figure:
    """Bar chart: selected neurons per layer."""
    fig = go.Figure(go.Bar(x=list(range(neurons.n_layers)), y=neurons.per_layer_counts(), name="neurons"))
    fig.update_layout(title=title or f"{len(neurons)} selected neurons per layer", xaxis_title="layer",
                      yaxis_title="neurons", template="plotly_white")
    return fig


def dose_response(results: dict[str, Any]) -> go.Figure:
    """First-token refusal share on the validation prompts: CNA fraction × ranking (with random
    controls), CNA scale at the chosen point, and CAA strength α."""
    sweep = results["sweep"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("CNA: fraction of MLP neurons", "CNA: neuron scale",
                                                        "CAA: strength α"))
    base = sweep.get("baseline", {}).get("refusal_share")

    def entries(prefix: str) -> list[tuple[float, float, tuple[float, float]]]:
        pts = [(float(c[len(prefix):]), e["refusal_share"], tuple(e["ci"])) for c, e in sweep.items()
               if c.startswith(prefix) and ":" not in c[len(prefix):]]
        return sorted(pts)

    def trace(pts, name, col, dash=None):
        x, y, ci = zip(*pts) if pts else ((), (), ())
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, line=dict(dash=dash),
                                 error_y=dict(type="data", symmetric=False, array=[c[1] - v for c, v in zip(ci, y)],
                                              arrayminus=[v - c[0] for c, v in zip(ci, y)])), row=1, col=col)

    for by in ("abs", "diff", "effect"):
        trace(entries(f"cna:{by}:"), f"CNA {by}", 1)
        trace(entries(f"random:{by}:"), f"random ({by} counts)", 1, "dot")
    trace(entries(f"{results['chosen']}:"), f"CNA {results['chosen']}", 2)
    trace(entries("caa:"), "CAA", 3)
    fig.update_xaxes(type="log", title_text="fraction", row=1, col=1)
    fig.update_xaxes(title_text="scale (0 = ablate, 1 = unchanged)", row=1, col=2)
    fig.update_xaxes(title_text="α", row=1, col=3)
    fig.update_yaxes(title_text="share with refusal log-odds > 0", range=[0, 1], row=1, col=1)
    if base is not None:
        for col in (1, 2, 3):
            fig.add_hline(y=base, line_dash="dash", line_color="gray", row=1, col=col)
    fig.update_layout(title=f"Dose-response, {results['config']['model']} (validation, first-token score)",
                      template="plotly_white", width=1300, height=450)
    return fig


def save_figure(fig: go.Figure, stem: str | os.PathLike, png: bool = True) -> list[Path]:
    """Write ``stem.html`` (self-contained) and, if static export works (kaleido + Chrome), ``stem.png``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".html")]
    fig.write_html(written[0], include_plotlyjs="cdn")
    if png:
        try:
            fig.write_image(stem.with_suffix(".png"), scale=2)
            written.append(stem.with_suffix(".png"))
        except Exception as e:  # kaleido or a Chrome missing: HTML is still there
            log.warning("static PNG export failed (%s); wrote HTML only", e)
    return written
