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
from .scoring import mcnemar
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
    fewer neurons, then to the earlier trial. Default cap 0.3 nats: the KL goal set for the 1.5B.

    ``confirm_top = k > 0``: the rule's first k points on validation are measured again on fresh
    prompts (:mod:`cna_lens.confirm`) and the same rule chooses among them on those numbers alone.
    The best of n noisy validation scores is biased upward (the winner's curse); a fresh measurement
    of k candidates is not, apart from the max over k.

    ``confirm_front``: on the same fresh prompts, also re-measure the compliance × KL front's points with
    KL ≤ ``kl_cap`` and the reference curves, so that the methods compare at equal KL free of the
    selection among trials (reported beside the choice, not used for it).

    ``quality_margin = m``: a point counts only if its answers keep their quality, q = 1 − repeated
    4-grams / 4-grams, on the prompts both it and the baseline answer (regex judge): mean(q_S − q_base) ≥ −m
    (:func:`cna_lens.scoring.matched_quality`; greedy answers of ``quality_tokens`` tokens). It applies
    where quality is measured: on every trial when the search has quality prompts (``SearchData.quality``;
    the margin then also steers the proposals, as an Optuna constraint), and with ``confirm_top`` on the
    candidates, on the confirmation's quality prompts. KL measures the next token; this measures what a
    long answer turns into (loops)."""

    kl_cap: float = 0.3
    over_refusal_slack: float = 0.0
    confirm_top: int = 0
    confirm_front: bool = False
    quality_margin: float | None = None
    quality_tokens: int = 150

    def __post_init__(self) -> None:
        for name in ("kl_cap", "over_refusal_slack"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Rule.{name} must be a finite number >= 0, got {v!r}")
        v = self.confirm_top
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"Rule.confirm_top must be an int >= 0, got {v!r}")
        if not isinstance(self.confirm_front, bool):
            raise ValueError(f"Rule.confirm_front must be a bool, got {self.confirm_front!r}")
        if self.confirm_front and not self.confirm_top:
            raise ValueError("Rule.confirm_front re-measures on the confirmation's fresh prompts: set confirm_top >= 1")
        m = self.quality_margin
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0):
            raise ValueError(f"Rule.quality_margin must be None or a finite number >= 0, got {m!r}")
        v = self.quality_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"Rule.quality_tokens must be an int >= 1, got {v!r}")

    def describe(self) -> str:
        text = (
            f"highest compliance with KL <= {self.kl_cap:g} nats and over-refusal <= baseline + "
            f"{self.over_refusal_slack:g}; ties: lower KL, fewer neurons, earlier trial"
        )
        if self.confirm_top:
            text += f"; the first {self.confirm_top} on validation re-measured on fresh prompts, chosen on those"
        if self.quality_margin is not None:
            text += (
                f"; only points whose {self.quality_tokens}-token answers to the quality prompts keep "
                f"quality >= baseline - {self.quality_margin:g}"
            )
        if self.confirm_front:
            text += " (the compliance x KL front and the reference curves re-measured there too, not used to choose)"
        return text

    def quality_ok(self, row: Mapping[str, Any]) -> bool:
        """Whether a row passes ``quality_margin``: always when it is None or the row has no ``quality``
        measurement; never when its answers share no answered prompt with the baseline's (``diff`` NaN)."""
        if self.quality_margin is None or "quality" not in row:
            return True
        return row["quality"]["diff"] >= -self.quality_margin - 1e-12  # means of k/n-like ratios: exact ties pass

    def rank(self, rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, float]) -> list[Mapping[str, Any]]:
        """The rows that meet the caps (and :meth:`quality_ok`), best first (the order :meth:`choose` picks from)."""
        limit = baseline["over_refusal"] + self.over_refusal_slack + 1e-12  # shares are k/n: exact ties pass
        ok = [
            r
            for r in rows
            if r["values"]["kl"] <= self.kl_cap and r["values"]["over_refusal"] <= limit and self.quality_ok(r)
        ]
        return sorted(
            ok, key=lambda r: (-r["values"]["compliance"], r["values"]["kl"], r.get("n_neurons", 0), r["number"])
        )

    def choose(self, rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, float]) -> Mapping[str, Any] | None:
        """The chosen row (``values``, ``n_neurons``, ``number``), or None when no row meets the caps."""
        ranked = self.rank(rows, baseline)
        return ranked[0] if ranked else None

    def candidates(self, rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, float]) -> list[Mapping[str, Any]]:
        """The rows to re-measure on fresh prompts: the first ``confirm_top`` of :meth:`rank`."""
        return self.rank(rows, baseline)[: self.confirm_top]

    def front_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The compliance × KL front's rows with neurons and KL ≤ ``kl_cap``, by KL (``confirm_front``)."""
        on = [r for r, p in zip(rows, front(rows, ["compliance", "kl"])) if p and r.get("n_neurons", 1)]
        return sorted(
            (r for r in on if r["values"]["kl"] <= self.kl_cap), key=lambda r: (r["values"]["kl"], r["number"])
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.describe()}


#: What ``pareto.json`` keeps of each re-measured candidate (``values``: fresh prompts).
CANDIDATE_KEYS = (
    "number",
    "label",
    "n_neurons",
    "validation",
    "values",
    "judged",
    "first_token_compliance",
    "labels",
    "quality",
    "validation_quality",
)


def build_result(
    header: Mapping[str, Any],
    rows: list[dict[str, Any]],
    baseline: Mapping[str, Any],
    references: Mapping[str, Any],
    rule: Rule,
    confirmation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``pareto.json`` object: ``rows`` (one per complete trial, with ``number``, ``values``,
    ``selection``) gain ``pareto`` (all objectives), ``pareto_2d`` (compliance × KL) and ``label``;
    ``chosen`` is the rule's pick (None when no trial meets it). With ``rule.confirm_top``, the pick
    is made on ``confirmation`` (``baseline`` and ``trials``: number → measurement on fresh prompts):
    ``chosen["values"]`` are then the fresh numbers and ``chosen["validation"]`` the trial's own; it
    stays None until every candidate is measured. With ``rule.quality_margin`` the pick is made among the
    candidates that pass :meth:`Rule.quality_ok` (None when none does)."""
    for r, p3, p2 in zip(rows, front(rows, list(OBJECTIVES)), front(rows, ["compliance", "kl"])):
        r["pareto"], r["pareto_2d"] = p3, p2
        r["label"] = Selection.from_dict(r["selection"]).describe()
    chosen = rule.choose(rows, baseline["values"])
    confirmed = None
    if rule.confirm_top:
        measured = (confirmation or {}).get("trials", {})
        cands = rule.candidates(rows, baseline["values"])
        need = ("values", "quality") if rule.quality_margin is not None else ("values",)
        if cands and all(k in measured.get(str(r["number"]), {}) for r in cands for k in need):
            again = [fresh_row(r, measured) for r in cands]
            confirmed = {
                "data": confirmation["data"],
                "baseline": confirmation["baseline"],
                "candidates": [{k: r[k] for k in CANDIDATE_KEYS if k in r} for r in again],
            }
            chosen = rule.choose(again, confirmation["baseline"]["values"])  # quality: the confirmation's
            on_front = rule.front_rows(rows) if rule.confirm_front else []
            if (
                rule.confirm_front
                and "references" in confirmation
                and all(str(r["number"]) in measured for r in on_front)
            ):
                fresh = [fresh_row(r, measured) for r in on_front]
                confirmed["front"] = [{k: r[k] for k in CANDIDATE_KEYS if k in r} for r in fresh]
                confirmed["references"] = confirmation["references"]
                confirmed["equal_kl"] = equal_kl(fresh_points(confirmed), confirmed["references"])
                if chosen is not None:  # the rule's pick against each method at no more KL
                    confirmed["chosen_equal_kl"] = references_at(chosen, confirmed["references"])
        else:
            chosen = None
    result = {
        "kind": "cna_lens.SearchResult",
        "format_version": FORMAT_VERSION,
        **header,
        "objectives": {o: "maximize" if OBJECTIVES[o] else "minimize" for o in OBJECTIVES},
        "n_trials": len(rows),
        "baseline": dict(baseline),
        "references": dict(references),
        "rule": rule.to_dict(),
        "chosen": None
        if chosen is None
        else {k: chosen[k] for k in ("number", "label", "selection", "values", "validation") if k in chosen},
        "trials": rows,
    }
    if rule.confirm_top:
        result["confirmation"] = confirmed  # None: not (yet) measured
    judged = [r["agreement"] for r in rows if "agreement" in r]
    if judged:
        result["agreement"] = {
            "per_prompt": sum(judged) / len(judged),
            "text": "share of (trial, prompt) pairs where first-token log-odds > 0 matches a judged refuse/evade",
        }
    return result


def fresh_row(row: Mapping[str, Any], measured: Mapping[str, Any]) -> dict[str, Any]:
    """A trial row re-measured on fresh prompts: their numbers (``values``, and ``quality`` where the
    confirmation measured it), the trial's own as ``validation`` (and ``validation_quality``)."""
    own = {k: v for k, v in row.items() if k != "quality"}
    if "quality" in row:
        own["validation_quality"] = row["quality"]
    return {**own, **measured[str(row["number"])], "validation": row["values"]}


def fresh_points(confirmation: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The searched points a confirmation re-measured: its ``front``, then the candidates not on it."""
    seen = {r["number"] for r in confirmation["front"]}
    return [*confirmation["front"], *(c for c in confirmation["candidates"] if c["number"] not in seen)]


def paired(reference: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any] | None:
    """Exact McNemar test (:func:`cna_lens.scoring.mcnemar`) of per-prompt compliance between two
    points judged on the same prompts: ``reference_only`` prompts complied with under ``reference``
    alone, ``search_only`` under ``point`` alone, and ``p``. None where either point lacks per-prompt
    ``labels`` (measured by the first-token score, or before labels were kept)."""
    a, b = reference.get("labels"), point.get("labels")
    if a is None or b is None:
        return None
    b01, b10, p = mcnemar([x == "comply" for x in a], [x == "comply" for x in b])
    return {"reference_only": b10, "search_only": b01, "p": p}


def paired_text(test: Mapping[str, Any]) -> str:
    """One line for a :func:`paired` result (the search summary, notebook 04)."""
    return (
        f"McNemar p {test['p']:.2g} (complied with under the reference alone: {test['reference_only']}, "
        f"the search alone: {test['search_only']})"
    )


def _most_compliant(points: Sequence[Mapping[str, Any]], kl: float) -> Mapping[str, Any] | None:
    """The most compliant of ``points`` with KL ≤ ``kl`` (ties: the lower KL); None where none has so little."""
    ok = [q for q in points if q["values"]["kl"] <= kl]
    return max(ok, key=lambda q: (q["values"]["compliance"], -q["values"]["kl"]), default=None)


def equal_kl(points: Sequence[Mapping[str, Any]], references: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict]:
    """For each reference point (KL k, compliance c), the highest compliance among ``points`` (the
    searched selections, e.g. the re-measured front and candidates) with KL ≤ k (``search_compliance``,
    ``search_trial``; None where no point has so little KL): each method against the search at equal or
    lower KL, on the same prompts; ``paired``: the two points' McNemar test (:func:`paired`). The best
    of several points is a maximum of noisy shares, so the test favours the search: a reference point
    significantly ahead is ahead, one not significantly ahead may still be."""
    out = []
    for curve, pts in references.items():
        for p in pts:
            k = p["values"]["kl"]
            best = _most_compliant(points, k)
            out.append(
                {
                    "curve": curve,
                    "label": p.get("label", ""),
                    "kl": k,
                    "compliance": p["values"]["compliance"],
                    "search_compliance": None if best is None else best["values"]["compliance"],
                    "search_trial": None if best is None else best["number"],
                    "paired": None if best is None else paired(p, best),
                }
            )
    return out


def references_at(point: Mapping[str, Any], references: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict]:
    """The reverse of :func:`equal_kl`, at the searched point's KL k: for each reference curve, its most
    compliant point with KL ≤ k (``label``, ``kl``, ``compliance``; all None where no point of the curve
    has so little KL) and ``paired``, the two points' McNemar test (:func:`paired`). A curve's best of its
    points with no more KL is a maximum of noisy shares, as is a point chosen among several on the same
    prompts: here the maximum is on both sides."""
    out = []
    for curve, pts in references.items():
        best = _most_compliant(pts, point["values"]["kl"])
        out.append(
            {
                "curve": curve,
                "label": None if best is None else best.get("label", ""),
                "kl": None if best is None else best["values"]["kl"],
                "compliance": None if best is None else best["values"]["compliance"],
                "paired": None if best is None else paired(best, point),
            }
        )
    return out


def summary(result: Mapping[str, Any]) -> str:
    """A text table of a search: the compliance × KL front, the confirmation's candidates (validation →
    fresh prompts) and the chosen point."""
    trials = result["trials"]
    secs = [t["seconds"] for t in trials if t["n_neurons"]]
    lines = [
        f"{len(trials)} trials, {sum(secs) / max(len(secs), 1):.1f} s per measured trial; "
        f"baseline {result['baseline']['values']}",
        f"{'trial':>5} {'compliance':>10} {'KL':>8} {'over-ref':>8} {'neurons':>7}  selection (compliance × KL front)",
    ]
    row = "{:>5} {:>10.3f} {:>8.4f} {:>8.3f} {:>7}  {}"
    for t in sorted((t for t in trials if t["pareto_2d"]), key=lambda t: t["values"]["kl"]):
        v, text = t["values"], t["label"]
        if "quality" in t:
            text += f"; answer quality {t['quality']['diff']:+.3f} (n={t['quality']['n']})"
        lines.append(row.format(t["number"], v["compliance"], v["kl"], v["over_refusal"], t["n_neurons"], text))
    conf = result.get("confirmation")
    if conf:
        base = conf["baseline"]["values"]
        lines.append(f"re-measured on fresh prompts ({conf['data']}); baseline there {base}")
        lines.append(f"{'trial':>5} {'compliance':>10} {'KL':>8} {'over-ref':>8} {'neurons':>7}  (validation)")
        for c in conf["candidates"]:
            v, w = c["values"], c["validation"]
            text = f"({w['compliance']:.3f}, {w['kl']:.4f}, {w['over_refusal']:.3f})"
            if "quality" in c:
                q = c["quality"]
                text += (
                    f"; answer quality {q['diff']:+.3f} [{q['diff_ci'][0]:+.3f}, {q['diff_ci'][1]:+.3f}] (n={q['n']})"
                )
            lines.append(row.format(c["number"], v["compliance"], v["kl"], v["over_refusal"], c["n_neurons"], text))
        if "front" in conf:
            lines.append("the compliance × KL front (KL <= cap), re-measured on the fresh prompts:")
            for c in conf["front"]:
                v, w = c["values"], c["validation"]
                text = f"({w['compliance']:.3f}, {w['kl']:.4f}, {w['over_refusal']:.3f})"
                lines.append(row.format(c["number"], v["compliance"], v["kl"], v["over_refusal"], c["n_neurons"], text))
            lines.append("fresh prompts, each reference point against the best searched point with KL <= its KL:")
            for e in conf["equal_kl"]:
                t, c = e["search_trial"], e["search_compliance"]
                best = "none" if t is None else f"{c:.3f} (trial {t})"
                if e.get("paired"):
                    best += f"; {paired_text(e['paired'])}"
                lines.append(f"  {e['curve']} {e['label']}: {e['compliance']:.3f} at KL {e['kl']:.4f}; search {best}")
            if conf.get("chosen_equal_kl"):
                lines.append(
                    "fresh prompts, the chosen point against each curve's best point with KL <= the chosen KL:"
                )
                for e in conf["chosen_equal_kl"]:
                    ref = "none" if e["label"] is None else f"{e['label']}: {e['compliance']:.3f} at KL {e['kl']:.4f}"
                    lines.append(f"  {e['curve']} {ref}" + (f"; {paired_text(e['paired'])}" if e["paired"] else ""))
    chosen = result["chosen"]
    lines.append(f"rule: {result['rule']['text']}")
    lines.append(
        "chosen: none" if chosen is None else f"chosen: trial {chosen['number']}: {chosen['label']} {chosen['values']}"
    )
    return "\n".join(lines)


def load_result(out: str | Path) -> dict[str, Any]:
    """``pareto.json`` of a search directory (kind and format checked)."""
    return read_json(Path(out) / "pareto.json", "cna_lens.SearchResult", FORMAT_VERSION)
