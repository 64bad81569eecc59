"""Summaries of a reproduction run: bootstrap CIs, per-condition regex rates and the markdown report
(pure functions of the run's rows and results)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .conditions import Condition

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


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.0f}"


def _rate(entry: dict[str, Any] | None, label: str, ci: bool = False) -> str:
    if not entry:
        return "—"
    r = entry[label]
    return f"{_pct(r['rate'])} [{_pct(r['ci'][0])}–{_pct(r['ci'][1])}]" if ci else _pct(r["rate"])


def hand_label_table(results: dict[str, Any]) -> list[str]:
    """Markdown rows for the conditions whose JBB-harmful completions were read blind by hand
    (``results["hand_labels"]``), beside the run's judge."""
    hand = results.get("hand_labels") or {}
    if not hand:
        return []
    judged = (results.get("compliance") or {}).get("jbb_harmful", {})
    lines = [
        "",
        "## Read blind by two readers (JBB harmful; cna_lens/data/jbb_labels_heldout.jsonl, docs/judge.md)",
        "",
        "| condition | labelled as | comply % [CI] | evade % | refuse % | judge's comply % |",
        "|---|---|---|---|---|---|",
    ]
    for cond, h in hand.items():
        lines.append(
            f"| {_label(cond, results)} `{cond}` | `{h['labelled_as']}` | {_rate(h, 'comply', True)} | "
            f"{_rate(h, 'evade')} | {_rate(h, 'refuse')} | {_rate(judged.get(cond), 'comply')} |"
        )
    return lines


def _num(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _label(cond: str, results: dict[str, Any]) -> str:
    """The condition's label, its pipes escaped for a markdown table cell."""
    label = results.get("conditions", {}).get(cond, {}).get("label") or Condition.parse(cond).label
    return label.replace("|", "\\|")


def sweep_table(results: dict[str, Any]) -> list[str]:
    """The validation sweep: share of ``val_harmful`` prompts with first-token refusal log-odds > 0, the
    CNA grid (fractions × rankings, next to its per-layer-count random control) then every other point."""
    entries = {Condition.parse(k): e for k, e in results.get("sweep", {}).items()}
    grid = [c for c in entries if c.kind == "cna" and c.scale is None]
    fractions, rankings = sorted({c.fraction for c in grid}), sorted({c.ranking for c in grid})
    share = lambda c: _num(entries[c]["refusal_share"], ".2f") if c in entries else "—"  # noqa: E731
    lines = ["| top fraction | " + " | ".join(f"CNA by {b} | random ({b})" for b in rankings) + " |"]
    lines.append("|---|" + "---|" * (2 * len(rankings)))
    for f in fractions:
        cells = [share(Condition(k, b, f)) for b in rankings for k in ("cna", "random")]
        lines.append(f"| {100 * f:g} % | " + " | ".join(cells) + " |")
    rest = [c for c in entries if c not in grid and c.kind != "random"]
    lines += ["", "| other point | refusal share |", "|---|---|"]
    lines += [f"| {_label(c.key, results)} `{c.key}` | {share(c)} |" for c in rest]
    return lines


def operating_point_table(results: dict[str, Any]) -> list[str]:
    """The judged validation sweep next to the first-token one, and both rules' choices."""
    op = results.get("operating_point")
    if not op:
        return []
    lines = [
        f"## Operating point (validation, judged generations of {op['max_new_tokens']} tokens)",
        "",
        f"First-token rule: `{op['first_token']}`; judged rule: `{op['judge']}`; used: **{op['rule']}**. "
        f"Pearson r of first-token non-refusal vs judged comply share across these points: "
        f"{_num(op.get('pearson_r'), '.3f')}; mean |gap| {_num(op.get('mean_abs_gap'), '.3f')}.",
        "",
        "| condition | first-token refusal % | comply % [CI] | evade % | refuse % [CI] |",
        "|---|---|---|---|---|",
    ]
    for cond, e in op["judged"].items():
        lines.append(
            f"| {_label(cond, results)} `{cond}` | {_pct(e.get('first_token_refusal'))} | {_rate(e, 'comply', True)} | "
            f"{_rate(e, 'evade')} | {_rate(e, 'refuse', True)} |"
        )
    return [*lines, ""]


def report(results: dict[str, Any]) -> str:
    """``report.md``: judged compliance (three-way judge, Wilson 95 % CIs) next to the regex refusal
    rate, capability (KL, MMLU with McNemar p), perplexity, matched-set quality, the matched tables and
    the validation sweep. The README and docs tables are copied from it."""
    cfg = results["config"]
    gens = results.get("generations", {})
    comp = results.get("compliance", {})
    cap = results.get("capability", {})
    ppl = results.get("perplexity", {})
    n_mmlu = next((c["mmlu_n"] for c in cap.values() if "mmlu_n" in c), 0)
    lines = [
        f"# CNA reproduction: {cfg['model']}",
        "",
        f"Status: **{results.get('status', 'complete')}**.",
        "",
        f"Greedy, {cfg['max_new_tokens']} new tokens, dtype {cfg['dtype']}. Judge: `{cfg.get('judge')}` "
        "(refuse / comply / evade, Wilson 95 % CIs); regex: refusal phrasing in the first 500 characters. "
        f"Operating point chosen on `{cfg['val_harmful']}` "
        f"({'judged short generations' if cfg.get('choose_by') == 'judge' else 'first-token score'}): "
        f"`{results['chosen']}`.",
        "",
        "## JBB harmful",
        "",
        "| condition | comply % [CI] | evade % | refuse % [CI] | regex refusal % | KL (alpaca) "
        f"| MMLU ({n_mmlu}) | McNemar p | perplexity | matched ppl (baseline) | matched quality Δ (n) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    harmful = comp.get("jbb_harmful", {})
    for cond, g in gens.get("jbb_harmful", {}).items():
        e, c, p = harmful.get(cond), cap.get(cond, {}), ppl.get(cond, {})
        mq = (e or {}).get("matched_quality")
        mp, mb = p.get("matched"), p.get("matched_baseline")
        lines.append(
            f"| {_label(cond, results)} `{cond}` | {_rate(e, 'comply', True)} | {_rate(e, 'evade')} | "
            f"{_rate(e, 'refuse', True)} | {_pct(g['refusal_rate'])} | {_num(c.get('kl_mean'), '.3f')} | "
            f"{_num(c.get('mmlu_acc'), '.3f')} | {_num(c.get('mcnemar', {}).get('p'), '.2g')} | "
            f"{_num(p.get('all', {}).get('ppl'), '.2f')} | "
            + (f"{mp['ppl']:.2f} ({mb['ppl']:.2f}), n={mp['n']}" if mp and mp["n"] else "—")
            + " | "
            + (f"{mq['diff']:+.3f} ({mq['n']})" if mq else "—")
            + " |"
        )
    lines += hand_label_table(results)
    lines += [
        "",
        "## Over-refusal (judged refusal %)",
        "",
        "| condition | JBB benign | XSTest safe | regex JBB benign |",
    ]
    lines.append("|---|---|---|---|")
    for cond, g in gens.get("jbb_benign", {}).items():
        x = comp.get("xstest_safe", {}).get(cond)
        lines.append(
            f"| {_label(cond, results)} `{cond}` | {_rate(comp.get('jbb_benign', {}).get(cond), 'refuse', True)} | "
            f"{_rate(x, 'refuse', True)} | {_pct(g['refusal_rate'])} |"
        )
    for field, point in (("matched", "the chosen point"), ("matched_selection", "the searched selection")):
        m = results.get(field) or {}
        for name, key in (("at_kl", "KL"), ("at_compliance", "compliance")):
            if name in m:
                lines += ["", f"## Methods at {point}'s {key} ({m[name]['target']:.3g})", ""]
                lines += ["| method | KL | compliance | MMLU |", "|---|---|---|---|"]
                for method, row in m[name]["methods"].items():
                    cells = (
                        ["—"] * 3 if row is None else [_num(row.get(k), ".3f") for k in ("kl", "compliance", "mmlu")]
                    )
                    lines.append(f"| {method} | " + " | ".join(cells) + " |")
    ft = results.get("first_token_vs_judge") or {}
    held = results.get("heldout") or {}
    jv = results.get("judge_validation") or {}
    lines += [
        "",
        "Paper (instruct → CNA-ablated JBB refusal %): " + "; ".join(f"{k} {a}→{b}" for k, (a, b) in PAPER_JBB.items()),
        "",
        "Classifier judge vs human labels: XSTest held out by model κ "
        f"{_num(jv.get('xstest_held_out_kappa', {}).get('classifier'), '.3f')}; JBB hand labels κ "
        f"{_num(jv.get('jbb_kappa', {}).get('classifier_cross_validated'), '.3f')} (cross-validated); "
        "blind hand labels of held-out conditions κ "
        f"{_num(jv.get('heldout_kappa', {}).get('classifier'), '.3f')} (docs/judge.md).",
        f"First-token score > 0 vs judged refusal (JBB harmful, all conditions): accuracy "
        f"{_num(ft.get('pooled_accuracy'), '.3f')} over {ft.get('n', 0)} completions; Pearson r of the "
        f"per-condition rates {_num(ft.get('pearson_r'), '.3f')}.",
        "Held-out transfer (harmful_test, first-token refusal share): "
        + (", ".join(f"`{c}` {_pct(v['first_token_refusal'])} % (n={v['n']})" for c, v in held.items()) or "—"),
        f"Refusal direction layer: {results.get('direction', {}).get('layer')}. "
        f"Split-half Jaccard of the chosen top set: {_num(results.get('split_half_jaccard'), '.3f')}.",
        "",
        *operating_point_table(results),
        "## Validation sweep (share of validation prompts refused by first-token score)",
        "",
        *sweep_table(results),
        "",
        "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results.get("timings_s", {}).items()),
        "",
    ]
    return "\n".join(lines)
