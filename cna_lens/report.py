"""Summaries of a reproduction run: bootstrap CIs, per-condition rates, judge/first-token agreement and
the markdown report in the paper's format (pure functions of the run's rows and results)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: instruct → CNA-ablated JBB refusal (%), paper Table (arXiv 2605.12290), for the report.
PAPER_JBB = {
    "Qwen2.5-1.5B-Instruct": (93, 12),
    "Qwen2.5-3B-Instruct": (90, 58),
    "Qwen2.5-7B-Instruct": (87, 2),
    "Llama-3.2-1B-Instruct": (90, 34),
    "Llama-3.1-70B-Instruct": (86, 18),
}


def bootstrap_ci(values: Sequence[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap CI of the mean, ``[low, high]``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return [float("nan"), float("nan")]
    means = np.random.default_rng(seed).choice(x, size=(n, x.size), replace=True).mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per dataset and condition: n, refusal rate + CI, mean quality + CI, distinct-2."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["condition"]), []).append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (ds, cond), rs in sorted(groups.items()):
        ref = [float(r["refused"]) for r in rs]
        q = [r["quality"] for r in rs]
        out.setdefault(ds, {})[cond] = {
            "n": len(rs),
            "refusal_rate": float(np.mean(ref)),
            "refusal_ci": bootstrap_ci(ref),
            "quality": float(np.mean(q)),
            "quality_ci": bootstrap_ci(q),
            "distinct2": float(np.mean([r["distinct2"] for r in rs])),
        }
    return out


def agreement(rows: list[dict[str, Any]], logodds: dict[str, float]) -> float | None:
    """Share of baseline JBB harmful prompts where first-token score > 0 agrees with the judge."""
    pairs = [
        (r["refused"], logodds[r["prompt_id"]] > 0)
        for r in rows
        if r["condition"] == "baseline" and r["dataset"] == "jbb_harmful" and r["prompt_id"] in logodds
    ]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def report(results: dict[str, Any]) -> str:
    """A markdown table in the paper's format (refusal %, 95 % CI, quality) plus capability."""
    cfg = results["config"]
    gens = results["generations"]
    lines = [
        f"# CNA reproduction: {cfg['model']}",
        "",
        f"Status: **{results.get('status', 'complete')}**.",
        "",
        f"Greedy, {cfg['max_new_tokens']} new tokens, dtype {cfg['dtype']}; regex judge over the first 500 "
        f"characters. Operating point chosen on `{cfg['val_harmful']}` (first-token score): `{results['chosen']}`.",
        "",
        "| condition | JBB harmful refusal % [95 % CI] | quality | JBB benign refusal % | XSTest safe refusal % "
        "| KL (alpaca) | MMLU |",
        "|---|---|---|---|---|---|---|",
    ]
    for cond, g in gens.get("jbb_harmful", {}).items():
        b = gens.get("jbb_benign", {}).get(cond)
        x = gens.get("xstest_safe", {}).get(cond)
        xs = f"{_pct(x['refusal_rate'])} (n={x['n']})" if x else "—"
        cap = results["capability"].get(cond, {})
        lo, hi = g["refusal_ci"]
        lines.append(
            f"| `{cond}` (n={g['n']}) | {_pct(g['refusal_rate'])} [{_pct(lo)}–{_pct(hi)}] | {g['quality']:.3f} | "
            f"{_pct(b['refusal_rate']) if b else '—'} | "
            f"{xs} | {cap.get('kl_mean', float('nan')):.3f} | "
            f"{cap.get('mmlu_acc', float('nan')):.2f} |"
        )
    lines += [
        "",
        "Paper (instruct → CNA-ablated JBB refusal %): " + "; ".join(f"{k} {a}→{b}" for k, (a, b) in PAPER_JBB.items()),
        "",
        f"First-token score vs judge agreement (baseline JBB harmful): {results['judge_first_token_agreement']}",
        f"Split-half Jaccard of the chosen top set: {results['split_half_jaccard']}",
        "",
        "Wall time per stage (s, summed over resumed runs): "
        + ", ".join(f"{k} {v:.0f}" for k, v in results.get("timings_s", {}).items()),
        "",
    ]
    return "\n".join(lines)
