"""Pareto fronts of search trials, the rule (fixed before the search) that picks one point, and
the search's result file ``pareto.json``.

A point ``a`` dominates ``b`` when it is at least as good in every objective and better in one
(``compliance`` is maximised, ``kl`` and ``over_refusal`` minimised). The front is the set of points
no other point dominates; equal points do not dominate each other, so both stay on the front.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .runs import read_json
from .selection import Selection

FORMAT_VERSION = 1

#: objective name → True where larger is better
OBJECTIVES: dict[str, bool] = {"compliance": True, "kl": False, "over_refusal": False}


def pareto_mask(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """True for each point that no other point dominates (O(n²); a search has hundreds of points)."""
    signs = [1.0 if m else -1.0 for m in maximize]
    pts = []
    for i, p in enumerate(points):
        if len(p) != len(signs):
            raise ValueError(f"point {i} has {len(p)} values, expected {len(signs)} (one per objective)")
        if any(not math.isfinite(v) for v in p):
            raise ValueError(f"point {i} has a non-finite value {list(p)}")
        pts.append([s * v for s, v in zip(signs, p)])

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(q, p) for q in pts if q is not p) for p in pts]


def front(rows: Sequence[Mapping[str, Any]], objectives: Sequence[str]) -> list[bool]:
    """:func:`pareto_mask` of result rows (each with ``values``: ``{objective: value}``)."""
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; known: {list(OBJECTIVES)}")
    return pareto_mask([[r["values"][o] for o in objectives] for r in rows], [OBJECTIVES[o] for o in objectives])


@dataclass(frozen=True)
class Rule:
    """The operating point: the highest compliance among points with ``kl ≤ kl_cap`` (nats) and
    ``over_refusal ≤ baseline over-refusal + over_refusal_slack``; ties go to the lower KL, then to
    fewer neurons, then to the earlier trial. Default cap 0.3 nats: the KL goal set for the 1.5B."""

    kl_cap: float = 0.3
    over_refusal_slack: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kl_cap", "over_refusal_slack"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Rule.{name} must be a finite number >= 0, got {v!r}")

    def describe(self) -> str:
        return (
            f"highest compliance with KL <= {self.kl_cap:g} nats and over-refusal <= baseline + "
            f"{self.over_refusal_slack:g}; ties: lower KL, fewer neurons, earlier trial"
        )

    def choose(self, rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, float]) -> Mapping[str, Any] | None:
        """The chosen row (``values``, ``n_neurons``, ``number``), or None when no row meets the caps."""
        limit = baseline["over_refusal"] + self.over_refusal_slack + 1e-12  # shares are k/n: exact ties pass
        ok = [r for r in rows if r["values"]["kl"] <= self.kl_cap and r["values"]["over_refusal"] <= limit]
        if not ok:
            return None
        return min(
            ok, key=lambda r: (-r["values"]["compliance"], r["values"]["kl"], r.get("n_neurons", 0), r["number"])
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.describe()}


def build_result(
    header: Mapping[str, Any],
    rows: list[dict[str, Any]],
    baseline: Mapping[str, Any],
    references: Mapping[str, Any],
    rule: Rule,
) -> dict[str, Any]:
    """The ``pareto.json`` object: ``rows`` (one per complete trial, with ``number``, ``values``,
    ``selection``) gain ``pareto`` (all objectives), ``pareto_2d`` (compliance × KL) and ``label``;
    ``chosen`` is the rule's pick (None when no trial meets it)."""
    for r, p3, p2 in zip(rows, front(rows, list(OBJECTIVES)), front(rows, ["compliance", "kl"])):
        r["pareto"], r["pareto_2d"] = p3, p2
        r["label"] = Selection.from_dict(r["selection"]).describe()
    chosen = rule.choose(rows, baseline["values"])
    result = {
        "kind": "cna_lens.SearchResult",
        "format_version": FORMAT_VERSION,
        **header,
        "objectives": {o: "maximize" if OBJECTIVES[o] else "minimize" for o in OBJECTIVES},
        "n_trials": len(rows),
        "baseline": dict(baseline),
        "references": dict(references),
        "rule": rule.to_dict(),
        "chosen": None if chosen is None else {k: chosen[k] for k in ("number", "label", "selection", "values")},
        "trials": rows,
    }
    judged = [r["agreement"] for r in rows if "agreement" in r]
    if judged:
        result["agreement"] = {
            "per_prompt": sum(judged) / len(judged),
            "text": "share of (trial, prompt) pairs where first-token log-odds > 0 matches a judged refuse/evade",
        }
    return result


def load_result(out: str | Path) -> dict[str, Any]:
    """``pareto.json`` of a search directory (kind and format checked)."""
    return read_json(Path(out) / "pareto.json", "cna_lens.SearchResult", FORMAT_VERSION)
