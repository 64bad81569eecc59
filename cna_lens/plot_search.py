"""Figures of a selection search (``pareto.json``): its trials and front on validation, and the
front and reference curves re-measured on fresh prompts. Re-exported by :mod:`cna_lens.plot`."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from .pareto import fresh_points, pareto_mask


def _kl_compliance(point: Any) -> tuple[float, float, str]:
    """``(kl, compliance, label)`` of a reference point: a ``(kl, compliance)`` pair, or a dict with
    ``kl`` / ``compliance`` (top level or under ``values``) and an optional ``label``."""
    if isinstance(point, dict):
        v = point.get("values", point)
        return float(v["kl"]), float(v["compliance"]), str(point.get("label", ""))
    kl, comp = point
    return float(kl), float(comp), ""


def pareto_front(result: dict[str, Any], references: dict[str, list[Any]] | None = None) -> go.Figure:
    """Compliance vs KL of a search (``pareto.json``): every trial, the compliance × KL front as a
    line, the chosen point (at its validation numbers), the candidates re-measured on fresh prompts
    (``confirmation``, if any), the KL cap, and reference curves (the search's own CNA-by-|diff| shares
    and CAA α, plus ``references``: name → points, e.g. directional ablation). A curve named
    "… (layer)" is drawn as markers only: its points are layers, not strengths in order."""
    trials = result["trials"]
    fig = go.Figure()
    for on_front, name, marker in (
        (False, "trials", dict(size=6, color="lightgray")),
        (True, "Pareto-optimal trials", dict(size=8, color="royalblue")),
    ):
        _points(fig, [t for t in trials if t["pareto_2d"] == on_front], name, marker)
    line = sorted((t["values"]["kl"], t["values"]["compliance"]) for t in trials if t["pareto_2d"])
    if line:
        _step_line(fig, line, "front")
    curves = {**result.get("references", {}), **(references or {})}
    _curves_and_baseline(fig, curves, result["baseline"]["values"]["compliance"])
    if result.get("confirmation"):  # the candidates' fresh-prompt measurements, not comparable point by point
        conf = result["confirmation"]
        fresh = conf["baseline"]["values"]["compliance"]
        name = f"candidates on fresh prompts (baseline there {fresh:.2f})"
        _points(
            fig, conf["candidates"], name, dict(symbol="diamond-open", size=10, color="darkorange"), ", fresh prompts"
        )
    if result.get("chosen"):
        c = result["chosen"]
        v = c.get("validation", c["values"])  # drawn among the trials: its validation numbers
        fig.add_trace(
            go.Scatter(
                x=[v["kl"]],
                y=[v["compliance"]],
                mode="markers",
                name=f"chosen: {c['label']}" + (" (validation)" if "validation" in c else ""),
                marker=dict(symbol="star", size=16, color="crimson"),
            )
        )
    title = f"{result['model']}: compliance vs KL, validation prompts ({result['objective']}, {len(trials)} trials)"
    return _layout(fig, [t["values"]["kl"] for t in trials], curves, result["rule"]["kl_cap"], title)


def fresh_front(result: dict[str, Any]) -> go.Figure:
    """Compliance vs KL on the confirmation's fresh prompts (``pareto.json`` of a search run with
    ``Rule(confirm_front=True)``): the validation front's points and the other candidates re-measured
    (the line: the front among them there), the reference curves and the baseline on the same prompts,
    and the chosen point.
    No point here was selected on these prompts, so methods compare at equal KL without the winner's curse."""
    conf = result.get("confirmation") or {}
    if "front" not in conf:
        raise ValueError("no fresh-prompt front in this result: run the search with --confirm K --confirm-front")
    fig, pts = go.Figure(), fresh_points(conf)
    cands = pts[len(conf["front"]) :]
    _points(fig, conf["front"], "validation front, re-measured", dict(size=9, color="royalblue"))
    _points(fig, cands, "other candidates, re-measured", dict(symbol="diamond-open", size=10, color="darkorange"))
    _step_line(fig, _front_line(pts), "front among them here")
    _curves_and_baseline(fig, conf["references"], conf["baseline"]["values"]["compliance"])
    if result.get("chosen"):
        c = result["chosen"]["values"]
        fig.add_trace(
            go.Scatter(
                x=[c["kl"]],
                y=[c["compliance"]],
                mode="markers",
                name="chosen",
                marker=dict(symbol="star", size=16, color="crimson"),
            )
        )
    title = f"{result['model']}: compliance vs KL, fresh prompts ({_prompt_names(conf)})"
    kls = [t["values"]["kl"] for t in pts]
    return _layout(fig, kls, conf["references"], result["rule"]["kl_cap"], title)


def fresh_fronts(results: dict[str, dict[str, Any]]) -> go.Figure:
    """Several searches of one model re-measured on the same fresh prompts (``--confirm-front``): each
    one's front among its re-measured points (front and candidates) as a step line with its points, and
    the reference curves and baseline of the first (the same prompts and statistics give the same ones)."""
    confs = {k: r.get("confirmation") or {} for k, r in results.items()}
    if not confs or any("front" not in c for c in confs.values()):
        raise ValueError("every result needs a fresh-prompt front: run each search with --confirm K --confirm-front")
    if len({c["data"]["digest"] for c in confs.values()}) > 1:
        raise ValueError("these searches were re-measured on different fresh prompts; they do not share one axis")
    fig = go.Figure()
    for name, conf in confs.items():
        line = _front_line(fresh_points(conf))
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in line],
                y=[p[1] for p in line],
                text=[name] * len(line),
                mode="lines+markers",
                name=name,
                line=dict(shape="hv", width=2),
                hovertemplate="%{text}<br>KL=%{x:.3g} nats<br>compliance=%{y:.2f}<extra></extra>",
            )
        )
    first = next(iter(confs.values()))
    _curves_and_baseline(fig, first["references"], first["baseline"]["values"]["compliance"])
    res = next(iter(results.values()))
    n = f"{len(results)} search{'es' if len(results) != 1 else ''}"
    title = f"{res['model']}: the fronts of {n} on fresh prompts<br><sup>{_prompt_names(first)}</sup>"
    return _layout(fig, [], first["references"], res["rule"]["kl_cap"], title).update_layout(width=1100)


def _points(fig: go.Figure, rows: list[dict], name: str, marker: dict, note: str = "") -> None:
    """Search rows (``values``, ``number``, ``label``, ``n_neurons``) as markers at (KL, compliance)."""
    fig.add_trace(
        go.Scatter(
            x=[t["values"]["kl"] for t in rows],
            y=[t["values"]["compliance"] for t in rows],
            text=[f"#{t['number']} {t['label']} ({t['n_neurons']} neurons{note})" for t in rows],
            mode="markers",
            name=name,
            marker=marker,
            hovertemplate="%{text}<br>KL=%{x:.3g} nats<br>compliance=%{y:.2f}<extra></extra>",
        )
    )


def _step_line(fig: go.Figure, line: list[tuple[float, float]], name: str) -> None:
    """A front through sorted (KL, compliance) points, as steps."""
    xs, ys = [p[0] for p in line], [p[1] for p in line]
    fig.add_trace(
        go.Scatter(x=xs, y=ys, mode="lines", name=name, line=dict(shape="hv", color="royalblue"), hoverinfo="skip")
    )


def _front_line(points: list[dict]) -> list[tuple[float, float]]:
    """The (KL, compliance) of the points no other dominates (higher compliance, lower KL), by KL."""
    xy = [(t["values"]["kl"], t["values"]["compliance"]) for t in points]
    return sorted(p for p, on in zip(xy, pareto_mask([(c, k) for k, c in xy], [True, False])) if on)


def _prompt_names(conf: dict[str, Any]) -> str:
    """The confirmation's prompt sets, e.g. ``harmful_train[32:96], alpaca_val[32:96]``."""
    return ", ".join(str(v) for k, v in conf["data"].items() if k != "digest")


def _curves_and_baseline(fig: go.Figure, curves: dict[str, list[Any]], base_compliance: float) -> None:
    """Reference curves (a "… (layer)" curve as markers only: layers, not strengths in order) and the baseline."""
    for name, pts in curves.items():
        xyl = sorted(_kl_compliance(p) for p in pts)
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in xyl],
                y=[p[1] for p in xyl],
                text=[p[2] for p in xyl],
                mode="markers+text" if name.endswith("(layer)") else "lines+markers+text",
                textposition="top center",
                name=name,
                line=dict(dash="dot"),
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[0],
            y=[base_compliance],
            mode="markers",
            name="baseline",
            marker=dict(symbol="square", size=10, color="black"),
        )
    )


def _layout(fig: go.Figure, kls: list[float], curves: dict[str, list[Any]], cap: float, title: str) -> go.Figure:
    """Axes, the KL cap and the title; the x range shows every point up to 5 × the cap (zoom out for the rest)."""
    kls = kls + [_kl_compliance(p)[0] for pts in curves.values() for p in pts]
    xmax = min(max(kls, default=1.0), 5 * cap or float("inf")) or 1.0
    fig.add_vline(x=cap, line_dash="dash", line_color="gray", annotation_text="KL cap")
    fig.update_layout(
        title=title,
        xaxis_title="KL(base ‖ steered), next token on harmless prompts (nats)",
        yaxis_title="compliance on harmful prompts",
        yaxis=dict(range=[-0.02, 1.05]),
        xaxis=dict(range=[-0.01, 1.05 * xmax]),
        template="plotly_white",
        width=900,
        height=600,
    )
    return fig
