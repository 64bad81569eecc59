"""docs/judge.md carries exactly the tables that scripts/make_docs_tables.py makes from judge_validation.json."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "judge.md"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("make_docs_tables", ROOT / "scripts" / "make_docs_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def validation(tables):
    return json.loads(tables.VALIDATION.read_text(encoding="utf-8"))


def test_doc_tables_are_current(tables, validation):
    doc = DOC.read_text(encoding="utf-8")
    assert tables.fill(doc, tables.render(validation)) == doc, (
        "run: python scripts/make_docs_tables.py --write docs/judge.md"
    )


def test_tables_show_the_json_numbers(tables, validation):
    blocks = tables.render(validation)
    pooled = validation["xstest"]["classifier"]["pooled"]["final_label"]
    assert (
        f"| **pooled** | {pooled['n']} | {pooled['accuracy']:.3f} | {pooled['kappa']:.3f} |"
        in blocks["xstest-classifier"]
    )
    cv = validation["jbb"]["classifier_cross_validated"]
    assert f"| {cv['all']['kappa']:.3f} |" in blocks["jbb-overall"]
    # one row per (model, condition), each with the hand-label rates in percent
    rows = [r for r in blocks["jbb-rates"].splitlines()[2:]]
    assert len(rows) == len(cv["per_condition"])
    for row, c in zip(rows, cv["per_condition"].values()):
        ref = " / ".join(f"{100 * c['rate_reference'][lab]:.0f}" for lab in tables.LABELS)
        assert f"| {ref} |" in row


def test_goal_sentence_lists_exactly_the_missed_conditions(tables, validation):
    cv = validation["jbb"]["classifier_cross_validated"]["per_condition"]
    text = tables.jbb_goal(validation)
    for key, c in cv.items():
        # a rate difference exactly at the goal counts as met: 1e-9 absorbs float64 rounding of the
        # stored difference of two count ratios (~1e-16), far below a real miss (≥ 1/n ≈ 1e-2)
        assert (f"`{key}`" in text) == (c["max_abs_rate_difference"] > tables.RATE_GOAL + 1e-9)


def test_fill_refuses_a_doc_without_the_markers(tables, validation):
    with pytest.raises(ValueError, match="no block"):
        tables.fill("# nothing generated here\n", tables.render(validation))
    bad = {**validation, "format_version": 1}  # a file from before the held-out section
    with pytest.raises(ValueError, match="format_version"):
        tables.render(bad)


def test_heldout_tables_show_the_json_numbers(tables, validation):
    blocks = tables.render(validation)
    h = validation["heldout"]
    rows = blocks["heldout-rates"].splitlines()[2:]
    assert len(rows) == len(h["hand_rates"])
    for row, (key, hand) in zip(rows, h["hand_rates"].items()):
        lo, hi = hand["comply"]["ci"]
        assert f"`{key.split('|')[1].strip()}`" in row
        assert f"| {100 * hand['comply']['rate']:.0f} [{100 * lo:.0f}–{100 * hi:.0f}] |" in row
    assert f"| {h['readers']['all']['kappa']:.3f} |" in blocks["heldout-overall"]
    assert blocks["heldout-paired"].count("McNemar") == len(h["paired_comply"])
