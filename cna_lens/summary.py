"""Tables of a reproduction run from its saved stages (pure functions of the stored numbers).

* capability: KL on harmless prompts; MMLU accuracy with a Wilson interval and an exact McNemar
  test against the baseline on the same items;
* perplexity of the completions under the unmodified model, as the geometric mean
  ``exp(mean log ppl)`` with a bootstrap interval, over all completions and over the prompts that
  both the condition and the baseline answer (judge label ≠ refuse);
* first-token score vs judge: does ``score > 0`` on a prompt predict the judge's ``refuse``?
* curves per method (KL, judged compliance, MMLU) and the matched table at the chosen point.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .conditions import Condition
from .controls import matched_table
from .report import bootstrap_ci
from .scoring import mcnemar, proportion_ci


def capability_table(entries: Mapping[str, Any], answers: Sequence[str], baseline: str = "baseline") -> dict:
    """``{condition: {kl_mean, kl_ci, [mmlu_acc, mmlu_ci, mmlu_n, mcnemar {b01, b10, p}]}}``;
    ``answers``: the MMLU items' correct letters, in the order of the stored predictions."""
    out: dict[str, Any] = {}
    base = entries.get(baseline, {}).get("mmlu_predictions")
    for cond, e in entries.items():
        row = {"kl_mean": e["kl_mean"], "kl_ci": e["kl_ci"]}
        preds = e.get("mmlu_predictions")
        if preds is not None:
            ok = [p == a for p, a in zip(preds, answers)]
            row |= {"mmlu_acc": sum(ok) / len(ok), "mmlu_ci": proportion_ci(sum(ok), len(ok)), "mmlu_n": len(ok)}
            if base is not None and cond != baseline:
                b01, b10, p = mcnemar([x == a for x, a in zip(base, answers)], ok)
                row["mcnemar"] = {"better": b01, "worse": b10, "p": p}
        out[cond] = row
    return out


def _geo(values: Sequence[float]) -> dict[str, Any]:
    logs = [math.log(v) for v in values if math.isfinite(v) and v > 0]
    if not logs:
        return {"n": 0, "ppl": float("nan"), "ci": [float("nan"), float("nan")]}
    lo, hi = bootstrap_ci(logs)
    return {"n": len(logs), "ppl": math.exp(float(np.mean(logs))), "ci": [math.exp(lo), math.exp(hi)]}


def perplexity_table(
    ppl: Mapping[tuple[str, str], float], labels: Mapping[tuple[str, str], str], baseline: str = "baseline"
) -> dict[str, Any]:
    """Per condition: all completions, and the prompts both it and ``baseline`` answer (``matched``,
    with the baseline's value on the same prompts). Keys of both maps: ``(condition, prompt_id)``."""
    by: dict[str, dict[str, float]] = defaultdict(dict)
    for (cond, pid), v in ppl.items():
        by[cond][pid] = v
    answers = lambda c, p: labels.get((c, p)) not in (None, "refuse")  # noqa: E731
    out = {}
    for cond, rows in sorted(by.items()):
        entry: dict[str, Any] = {"all": _geo(list(rows.values()))}
        if cond != baseline and baseline in by:
            both = [p for p in rows if p in by[baseline] and answers(cond, p) and answers(baseline, p)]
            entry["matched"] = _geo([rows[p] for p in both])
            entry["matched_baseline"] = _geo([by[baseline][p] for p in both])
        out[cond] = entry
    return out


def first_token_vs_judge(scores: Mapping[str, Mapping[str, float]], labels: Mapping[tuple[str, str], str]) -> dict:
    """How well the first-token refusal score predicts the judge: per condition, the share of prompts
    with score > 0 next to the judged refusal rate; pooled over conditions, the accuracy of
    ``score > 0 ⇔ refuse``; across conditions, Pearson r of the two rates."""
    per, hits, n = {}, 0, 0
    for cond, s in scores.items():
        pairs = [(s[p] > 0, labels[cond, p] == "refuse") for p in s if (cond, p) in labels]
        if not pairs:
            continue
        hits += sum(a == b for a, b in pairs)
        n += len(pairs)
        per[cond] = {
            "n": len(pairs),
            "first_token_refusal": sum(a for a, _ in pairs) / len(pairs),
            "judged_refusal": sum(b for _, b in pairs) / len(pairs),
        }
    x = [v["first_token_refusal"] for v in per.values()]
    y = [v["judged_refusal"] for v in per.values()]
    r = float(np.corrcoef(x, y)[0, 1]) if len(per) > 2 and np.std(x) > 0 and np.std(y) > 0 else None
    return {"per_condition": per, "pooled_accuracy": hits / n if n else None, "n": n, "pearson_r": r}


def curves(
    conditions: Sequence[Condition],
    compliance: Mapping[str, Any],
    capability: Mapping[str, Any],
) -> dict[str, list[dict[str, Any]]]:
    """``{method: [{condition, kl, compliance, mmlu?}, …]}`` for the JBB harmful conditions, one method
    per kind (CNA curves per ranking); the baseline starts every curve."""
    base = _point(Condition("baseline"), compliance, capability)
    out: dict[str, list[dict[str, Any]]] = {}
    for c in conditions:
        p = _point(c, compliance, capability)
        if c.kind == "baseline" or p is None:
            continue
        method = f"cna:{c.ranking}" if c.kind == "cna" and c.scale is None else c.kind
        out.setdefault(method, [dict(base)] if base else []).append(p)
    return {m: sorted(pts, key=lambda q: q["kl"]) for m, pts in out.items()}


def _point(c: Condition, compliance: Mapping[str, Any], capability: Mapping[str, Any]) -> dict[str, Any] | None:
    comp, cap = compliance.get(c.key), capability.get(c.key)
    if comp is None or cap is None:
        return None
    p = {"condition": c.key, "kl": cap["kl_mean"], "compliance": comp["comply"]["rate"]}
    if "mmlu_acc" in cap:
        p["mmlu"] = cap["mmlu_acc"]
    return p


def matched(curves_: Mapping[str, Sequence[Mapping[str, Any]]], at: Mapping[str, Any]) -> dict[str, Any]:
    """Every method at the chosen point's KL and at its judged compliance (linear along each curve;
    MMLU is interpolated too where every point of the curve has it)."""
    table = {}
    for method, pts in curves_.items():
        if len(pts) < 2:
            continue
        keys = ["kl", "compliance"] + (["mmlu"] if all("mmlu" in p for p in pts) else [])
        table[method] = [{k: float(p[k]) for k in keys} for p in pts]
    return matched_table(table, at_kl=float(at["kl"]), at_compliance=float(at["compliance"]))
