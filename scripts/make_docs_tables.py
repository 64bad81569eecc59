"""Markdown tables for docs/judge.md, generated from the committed ``cna_lens/data/judge_validation.json``.

    python scripts/make_docs_tables.py                      # print every table
    python scripts/make_docs_tables.py --write docs/judge.md  # replace the generated blocks in the doc
    python scripts/make_docs_tables.py --check docs/judge.md  # exit 1 if the doc's blocks are stale

A generated block sits between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``;
nothing between the markers is written by hand, so the doc's numbers always equal the JSON's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cna_lens.judge_validation import FORMAT_VERSION, LABELS, VALIDATION_FILE

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = ROOT / "cna_lens" / "data" / VALIDATION_FILE
#: The goal for the judge's per-condition label rates: within ±5 percentage points of the hand labels.
RATE_GOAL = 0.05
#: The XSTest completion sets (upstream file suffixes: two system-prompt set-ups each for Llama 2 and Mistral).
XSTEST_MODELS = {
    "gpt4": "GPT-4 (`gpt4`)",
    "llama2new": "Llama-2-70b-chat (`llama2new`)",
    "llama2orig": "Llama-2-70b-chat (`llama2orig`)",
    "mistralguard": "Mistral-7B-Instruct (`mistralguard`)",
    "mistralinstruct": "Mistral-7B-Instruct (`mistralinstruct`)",
}
JBB_JUDGES = {
    "classifier_cross_validated": "classifier, cross-validated",
    "classifier_xstest_only": "classifier, XSTest-trained only",
    "regex": "regex",
}


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}"


def rates(r: dict[str, float]) -> str:
    """Refuse / comply / evade shares in percent."""
    return " / ".join(pct(r[lab]) for lab in LABELS)


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = [header, sep, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _metric_row(name: str, a: dict[str, Any]) -> list[str]:
    return [name, str(a["n"]), f"{a['accuracy']:.3f}", f"{a['kappa']:.3f}", *(pct(a["recall"][lab]) for lab in LABELS)]


METRIC_HEADER = ["n", "accuracy", "Cohen's κ", "recall refuse %", "recall comply %", "recall evade %"]


def xstest_table(v: dict[str, Any], judge: str) -> str:
    """Held out by model: one row per held-out model, then all folds pooled (against the final label)."""
    x = v["xstest"][judge]
    rows = [_metric_row(XSTEST_MODELS.get(m, m), f["final_label"]) for m, f in x["per_held_out_model"].items()]
    rows.append(_metric_row("**pooled**", x["pooled"]["final_label"]))
    return table(["held-out model", *METRIC_HEADER], rows)


def xstest_references(v: dict[str, Any]) -> str:
    """Pooled agreement of both judges against each reference, and the two annotators with each other."""
    rows = []
    for judge in ("classifier", "regex"):
        p = v["xstest"][judge]["pooled"]
        for ref, name in (
            ("final_label", "final label"),
            ("annotator_1", "annotator 1"),
            ("annotator_2", "annotator 2"),
            ("agreed_items", "items both annotators agree on"),
        ):
            rows.append(_metric_row(f"{judge} vs {name}", p[ref]))
    rows.append(_metric_row("annotator 2 vs annotator 1", v["xstest"]["human_annotator_1_vs_2"]))
    return table(["comparison", *METRIC_HEADER], rows)


def _key_cells(key: str) -> list[str]:
    """``model | condition`` as the first two cells of a per-condition row."""
    model, condition = (s.strip() for s in key.split("|"))
    return [model.removeprefix("qwen2.5-coder-").removesuffix("-instruct"), f"`{condition}`"]


def _judge_cells(a: dict[str, Any]) -> list[str]:
    """A judge on one condition: its label rates, its worst rate error (points) and κ."""
    return [rates(a["rate_judge"]), pct(a["max_abs_rate_difference"]), f"{a['kappa']:.2f}"]


def _judge_header(*names: str) -> list[str]:
    """The header cells of :func:`_judge_cells` for each named judge, in order."""
    return [h for name in names for h in (f"{name} R / C / E %", "max abs Δ (points)", "κ")]


def jbb_rates(v: dict[str, Any]) -> str:
    """Per (model, condition): label rates of the hand labels, the cross-validated classifier and the regex."""
    j = v["jbb"]
    cv, rx = j["classifier_cross_validated"]["per_condition"], j["regex"]["per_condition"]
    rows = [
        [*_key_cells(key), str(c["n"]), rates(c["rate_reference"]), *_judge_cells(c), *_judge_cells(rx[key])]
        for key, c in cv.items()
    ]
    header = ["Qwen2.5-Coder", "condition", "n", "hand labels R / C / E %", *_judge_header("classifier", "regex")]
    return table(header, rows, "llrl" + "lrr" * 2)


def jbb_overall(v: dict[str, Any]) -> str:
    """All 275 hand labels: agreement of each judge, and its worst per-condition rate error."""
    j = v["jbb"]
    rows = []
    for name, label in JBB_JUDGES.items():
        r = j[name]
        rows.append([*_metric_row(label, r["all"]), pct(r["max_abs_rate_difference"])])
    return table(["judge", *METRIC_HEADER, "worst condition: max abs Δ rate (points)"], rows)


def jbb_goal(v: dict[str, Any]) -> str:
    """The (model, condition) cells where the default judge misses the ±5-point rate goal."""
    cv = v["jbb"]["classifier_cross_validated"]["per_condition"]
    missed = [(k, c) for k, c in cv.items() if c["max_abs_rate_difference"] > RATE_GOAL + 1e-9]
    if not missed:
        return f"The cross-validated classifier is within ±{100 * RATE_GOAL:.0f} points of the hand labels in every condition."
    items = "; ".join(
        f"`{k}` (n = {c['n']}): " + ", ".join(f"{lab} {100 * c['rate_difference'][lab]:+.0f}" for lab in LABELS)
        for k, c in missed
    )
    ok = len(cv) - len(missed)
    return (
        f"Goal ±{100 * RATE_GOAL:.0f} points per label and condition: met in {ok} of {len(cv)} conditions by the "
        f"cross-validated classifier; missed in {items} (points, judge − labels)."
    )


def heldout_overall(v: dict[str, Any]) -> str:
    """Held-out conditions: the shipped classifier, the classifier retrained in folds, the regex, and the two readers."""
    h = v["heldout"]
    judges = (
        ("classifier", "classifier (shipped head)"),
        ("classifier_retrained_cross_validated", "classifier retrained with the other held-out folds"),
        ("regex", "regex"),
    )
    rows = [_metric_row(name, h[key]["all"]) for key, name in judges]
    rows.append(_metric_row("reader 2 vs reader 1", h["readers"]["all"]))
    return table(["comparison", *METRIC_HEADER], rows)


def heldout_rates(v: dict[str, Any]) -> str:
    """Per held-out condition: hand-label rates (comply with its Wilson 95 % CI), the readers' κ, and the
    shipped and the retrained classifier."""
    h = v["heldout"]
    rows = []
    for key, hand in h["hand_rates"].items():
        c = h["classifier"]["per_condition"][key]
        lo, hi = hand["comply"]["ci"]
        rows.append(
            [
                *_key_cells(key),
                str(c["n"]),
                rates({lab: hand[lab]["rate"] for lab in LABELS}),
                f"{pct(hand['comply']['rate'])} [{pct(lo)}–{pct(hi)}]",
                f"{h['readers']['per_condition'][key]['kappa']:.2f}",
                *_judge_cells(c),
                *_judge_cells(h["classifier_retrained_cross_validated"]["per_condition"][key]),
            ]
        )
    header = ["Qwen2.5-Coder", "condition", "n", "hand labels R / C / E %", "hand comply % [95 % CI]", "readers' κ"]
    header += _judge_header("classifier", "retrained")
    return table(header, rows, "llrllr" + "lrr" * 2)


def heldout_paired(v: dict[str, Any]) -> str:
    """One sentence per pair of held-out conditions on the same prompts: McNemar on hand-labelled compliance."""
    h = v["heldout"]
    lines = [
        f"`{pair.split('|')[1].strip().replace(' vs ', '` vs `')}` ({pair.split('|')[0].strip()}, n = {t['n']}): "
        f"{t['first_only']} prompts comply only under the first, {t['second_only']} only under the second, "
        f"exact McNemar p = {t['p']:.2g}."
        for pair, t in h["paired_comply"].items()
    ]
    third = h["readers"]["decided_by_third_reading"]
    lines.append(f"The two readers differed on {third} of {h['n']} items; a third reading decided those.")
    return "\n".join(f"- {x}" for x in lines)


BLOCKS: dict[str, Callable[[dict[str, Any]], str]] = {
    "xstest-classifier": lambda v: xstest_table(v, "classifier"),
    "xstest-regex": lambda v: xstest_table(v, "regex"),
    "xstest-references": xstest_references,
    "jbb-overall": jbb_overall,
    "jbb-rates": jbb_rates,
    "jbb-goal": jbb_goal,
    "heldout-overall": heldout_overall,
    "heldout-rates": heldout_rates,
    "heldout-paired": heldout_paired,
}


def render(v: dict[str, Any]) -> dict[str, str]:
    if v.get("kind") != "cna_lens.JudgeValidation" or v.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"not a format_version {FORMAT_VERSION} cna_lens.JudgeValidation file: update scripts/make_docs_tables.py"
        )
    return {name: f(v) for name, f in BLOCKS.items()}


def fill(doc: str, blocks: dict[str, str]) -> str:
    """``doc`` with the text between each pair of markers replaced by the block of that name."""
    for name, body in blocks.items():
        pattern = re.compile(
            rf"(<!-- BEGIN generated: {re.escape(name)} -->\n).*?(<!-- END generated: {re.escape(name)} -->)", re.S
        )
        if not pattern.search(doc):
            raise ValueError(f"the doc has no block {name!r} (<!-- BEGIN generated: {name} --> ... END)")
        doc = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), doc)
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validation", default=str(VALIDATION))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="DOC", help="replace the generated blocks of DOC in place")
    mode.add_argument("--check", metavar="DOC", help="exit 1 if DOC's generated blocks differ from the JSON")
    args = ap.parse_args()
    blocks = render(json.loads(Path(args.validation).read_text(encoding="utf-8")))
    if args.write or args.check:
        path = Path(args.write or args.check)
        doc = path.read_text(encoding="utf-8")
        new = fill(doc, blocks)
        if args.check:
            if new != doc:
                print(f"{path}: generated tables are stale; run scripts/make_docs_tables.py --write {path}")
                return 1
            print(f"{path}: generated tables match {args.validation}")
        elif new != doc:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path}")
        return 0
    for name, body in blocks.items():
        print(f"### {name}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
