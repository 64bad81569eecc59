"""Search: Pareto flags, the choice rule, objectives, bad input, CLI checks. Whole search runs (resume,
judge objective, CLI end to end) are in tests/integration/test_search.py."""

import random

import optuna
import pytest

from cna_lens.cli import main
from cna_lens.evaluate import refusal_score, refusal_token_ids
from cna_lens.pareto import Rule, build_result, paired, pareto_mask, references_at, summary
from cna_lens.runs import exclusive
from cna_lens.search import Search, SearchData, SearchSpace
from cna_lens.selection import Selection

from ..conftest import PLANT_LAYER, PROMPTS


def test_pareto_mask_hand_made():
    # maximise x, minimise y: (1, 1) dominates (1, 2) and (0, 3); (2, 2) and (1, 1) trade off;
    # an exact duplicate of a front point stays on the front (neither dominates the other)
    pts = [(1, 1), (1, 2), (0, 3), (2, 2), (2, 2), (0, 0)]
    assert pareto_mask(pts, [True, False]) == [True, False, False, True, True, True]
    assert pareto_mask([(5, 5)], [True, True]) == [True]
    assert pareto_mask([], [True]) == []
    # three objectives: a point worse in two but better in one survives
    assert pareto_mask([(1, 0, 0), (0, 1, 1), (1, 1, 1)], [True, False, False]) == [True, False, False]
    with pytest.raises(ValueError, match="expected 2"):
        pareto_mask([(1, 2, 3)], [True, False])
    with pytest.raises(ValueError, match="non-finite"):
        pareto_mask([(float("nan"), 1)], [True, False])


def test_pareto_mask_matches_optuna():
    rng = random.Random(0)
    pts = [(rng.randint(0, 5) / 5, rng.random(), rng.randint(0, 3) / 3) for _ in range(60)]
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    dist = {"i": optuna.distributions.IntDistribution(0, 100)}
    for i, p in enumerate(pts):
        study.add_trial(optuna.trial.create_trial(params={"i": i}, distributions=dist, values=list(p)))
    theirs = {t.params["i"] for t in study.best_trials}
    ours = {i for i, on in enumerate(pareto_mask(pts, [True, False, False])) if on}
    assert ours == theirs and 0 < len(ours) < len(pts)


def row(number, compliance, kl, over, n=10):
    sel = Selection("abs", 0.001).to_dict()
    return {
        "number": number,
        "values": {"compliance": compliance, "kl": kl, "over_refusal": over},
        "n_neurons": n,
        "selection": sel,
        "seconds": 1.0,
    }


def test_rule_and_result():
    rows = [row(0, 0.9, 0.5, 0.0), row(1, 0.7, 0.2, 0.0), row(2, 0.7, 0.1, 0.0), row(3, 0.95, 0.25, 0.1)]
    base = {"compliance": 0.1, "kl": 0.0, "over_refusal": 0.0}
    assert Rule(0.3).choose(rows, base)["number"] == 2  # 0 breaks the cap, 3 over-refuses; 1 vs 2: lower KL
    assert Rule(0.3, over_refusal_slack=0.1).choose(rows, base)["number"] == 3
    assert Rule(0.6).choose(rows, base)["number"] == 0
    assert Rule(0.05).choose(rows, base) is None
    res = build_result({"model": "m"}, rows, {"values": base}, {}, Rule(0.3))
    # compliance × KL: 3 dominates 0 and 2 dominates 1; with over-refusal, 0 comes back (3 over-refuses)
    assert [r["pareto_2d"] for r in res["trials"]] == [False, False, True, True]
    assert [r["pareto"] for r in res["trials"]] == [True, False, True, True]
    assert res["chosen"]["number"] == 2 and "KL <= 0.3" in res["rule"]["text"]
    for bad in (-0.1, float("inf"), "0.3"):
        with pytest.raises(ValueError, match="kl_cap"):
            Rule(bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="confirm_top"):
            Rule(confirm_top=bad)


def test_rule_with_confirmation():
    """``confirm_top = 2``: the first two rows in the rule's order are the candidates; the pick is the
    rule's on their fresh numbers (here the validation runner-up), and none before both are measured."""
    rows = [row(0, 0.9, 0.5, 0.0), row(1, 0.7, 0.2, 0.0), row(2, 0.8, 0.1, 0.0), row(3, 0.95, 0.25, 0.0)]
    base = {"values": {"compliance": 0.1, "kl": 0.0, "over_refusal": 0.0}}
    rule = Rule(0.3, confirm_top=2)
    assert [r["number"] for r in rule.candidates(rows, base["values"])] == [3, 2]
    fresh = {
        "3": {"values": {"compliance": 0.5, "kl": 0.2, "over_refusal": 0.0}},
        "2": {"values": {"compliance": 0.6, "kl": 0.1, "over_refusal": 0.0}},
    }
    conf = {"data": {"harmful": "h"}, "baseline": {"values": {"compliance": 0.2, "kl": 0.0, "over_refusal": 0.0}}}
    res = build_result({"model": "m"}, [dict(r) for r in rows], base, {}, rule, {**conf, "trials": fresh})
    assert res["chosen"]["number"] == 2 and res["chosen"]["values"]["compliance"] == 0.6
    assert res["chosen"]["validation"]["compliance"] == 0.8
    assert [c["number"] for c in res["confirmation"]["candidates"]] == [3, 2]
    text = summary(res)
    assert "re-measured on fresh prompts" in text and "chosen: trial 2" in text
    part = {**conf, "trials": {"3": fresh["3"]}}
    res = build_result({"model": "m"}, [dict(r) for r in rows], base, {}, rule, part)
    assert res["chosen"] is None and res["confirmation"] is None
    # on fresh prompts candidate 2 over-refuses: the caps apply to the fresh numbers too
    fresh["2"]["values"]["over_refusal"] = 0.5
    res = build_result({"model": "m"}, [dict(r) for r in rows], base, {}, rule, {**conf, "trials": fresh})
    assert res["chosen"]["number"] == 3


def test_rule_with_answer_quality():
    """``quality_margin``: among the re-measured candidates only those whose long answers keep quality
    ≥ baseline − margin are chosen; a candidate with no answered prompt in common (NaN) fails; the pick
    waits for every candidate's quality."""
    rows = [row(1, 0.7, 0.2, 0.0), row(2, 0.8, 0.1, 0.0), row(3, 0.95, 0.25, 0.0)]
    base = {"values": {"compliance": 0.1, "kl": 0.0, "over_refusal": 0.0}}
    v = lambda c, kl: {"compliance": c, "kl": kl, "over_refusal": 0.0}  # noqa: E731
    q = lambda d: {"n": 4, "diff": d, "diff_ci": [d - 0.01, d + 0.01]}  # noqa: E731
    fresh = {"3": {"values": v(0.7, 0.2), "quality": q(-0.02)}, "2": {"values": v(0.6, 0.1), "quality": q(-0.01)}}
    conf = {"data": {}, "baseline": {"values": v(0.2, 0.0)}, "trials": fresh}
    pick = lambda rule, c=conf: build_result({"model": "m"}, [dict(r) for r in rows], base, {}, rule, c)  # noqa: E731
    assert pick(Rule(0.3, confirm_top=2))["chosen"]["number"] == 3  # no margin: the more compliant
    res = pick(Rule(0.3, confirm_top=2, quality_margin=0.01))  # 3 loses 0.02 > 0.01; 2 loses exactly 0.01
    assert res["chosen"]["number"] == 2
    assert [c["quality"]["diff"] for c in res["confirmation"]["candidates"]] == [-0.02, -0.01]
    assert "answer quality -0.020" in summary(res) and "quality >= baseline - 0.01" in res["rule"]["text"]
    assert pick(Rule(0.3, confirm_top=2, quality_margin=0.03))["chosen"]["number"] == 3
    assert pick(Rule(0.3, confirm_top=2, quality_margin=0.0))["chosen"] is None  # neither keeps its quality
    fresh["2"]["quality"] = q(float("nan"))
    assert pick(Rule(0.3, confirm_top=2, quality_margin=0.01))["chosen"] is None
    del fresh["2"]["quality"]  # not measured yet: no pick, no confirmation
    res = pick(Rule(0.3, confirm_top=2, quality_margin=0.01))
    assert res["chosen"] is None and res["confirmation"] is None
    for bad, match in (
        (dict(quality_margin=-0.01, confirm_top=1), "quality_margin"),
        (dict(quality_margin=float("nan"), confirm_top=1), "quality_margin"),
        (dict(quality_tokens=0), "quality_tokens"),
        (dict(quality_tokens=True), "quality_tokens"),
    ):
        with pytest.raises(ValueError, match=match):
            Rule(**bad)


def test_rule_with_trial_answer_quality():
    """Trials measured for answer quality (``quality`` on the row, validation prompts): the rule ranks only
    those within the margin (NaN fails, a row without a measurement passes); the candidates keep their
    validation quality apart from the confirmation's; the Optuna constraint is −diff − margin."""
    from cna_lens.quality import violation

    q = lambda d: {"n": 3, "diff": d, "diff_ci": [d - 0.01, d + 0.01]}  # noqa: E731
    rows = [row(1, 0.7, 0.2, 0.0), row(2, 0.8, 0.1, 0.0), row(3, 0.95, 0.25, 0.0), row(4, 0.9, 0.2, 0.0)]
    for r, d in zip(rows, (0.0, -0.005, -0.02, float("nan"))):
        r["quality"] = q(d)
    base = {"values": {"compliance": 0.1, "kl": 0.0, "over_refusal": 0.0}}
    res = lambda rule: build_result({"model": "m"}, [dict(r) for r in rows], base, {}, rule)  # noqa: E731
    assert res(Rule(0.3))["chosen"]["number"] == 3  # no margin: quality is reported, not used
    assert [r["number"] for r in Rule(0.3, quality_margin=0.01).rank(rows, base["values"])] == [2, 1]
    assert res(Rule(0.3, quality_margin=0.01))["chosen"]["number"] == 2
    assert res(Rule(0.3, quality_margin=0.02))["chosen"]["number"] == 3  # exactly at the margin passes
    assert Rule(quality_margin=0.01).quality_ok({"values": {}})  # not measured: not filtered
    assert "answer quality -0.020 (n=3)" in summary(res(Rule(0.3)))  # 3 is on the compliance × KL front
    v = {"compliance": 0.6, "kl": 0.1, "over_refusal": 0.0}
    fresh = {"2": {"values": v, "quality": q(-0.03)}, "1": {"values": v, "quality": q(0.0)}}
    conf = {"data": {}, "baseline": base, "trials": fresh}
    both = build_result(
        {"model": "m"}, [dict(r) for r in rows], base, {}, Rule(0.3, confirm_top=2, quality_margin=0.01), conf
    )
    cands = both["confirmation"]["candidates"]
    assert [(c["number"], c["quality"]["diff"], c["validation_quality"]["diff"]) for c in cands] == [
        (2, -0.03, -0.005),
        (1, 0.0, 0.0),
    ]
    assert both["chosen"]["number"] == 1  # 2 passes on validation, fails on the confirmation's prompts
    assert violation(0.01, q(-0.005)) == pytest.approx(-0.005) and violation(0.01, q(-0.03)) == pytest.approx(0.02)
    assert violation(0.01, q(float("nan"))) == 1.0


def test_answer_quality_against_the_baseline():
    """``quality_against``: q = unique / all 4-grams of whitespace words, compared on the prompts both
    answer (a regex refusal on either side drops the prompt), ``diff`` = mean(q_answers − q_baseline)."""
    from cna_lens.quality import quality_against

    baseline = ["one two three four five", "I cannot help with that.", "p q r s t u v"]
    answers = ["a b c d a b c d", "Sure: a b c d a b c d", "p q r s p q r s p q"]
    got = quality_against(baseline, answers)
    # prompt 1 dropped (the baseline refuses); q: 4/5 against 1, 4/7 against 1 (pqrs, qrsp, rspq, spqr of 7)
    assert got["n"] == 2 and got["diff"] == pytest.approx(((4 / 5 - 1) + (4 / 7 - 1)) / 2, abs=1e-12)
    assert got["diff_ci"][0] <= got["diff"] <= got["diff_ci"][1]


def test_rule_with_fresh_front():
    """``confirm_front``: the compliance × KL front's rows with neurons and KL ≤ cap are re-measured too;
    the result reports them and, per reference point, the best of them at equal or lower KL (by hand)."""
    rows = [row(0, 0.9, 0.5, 0.0), row(1, 0.7, 0.2, 0.0), row(2, 0.8, 0.1, 0.0), row(3, 0.95, 0.25, 0.0)]
    rows.append({**row(4, 0.2, 0.0, 0.0), "n_neurons": 0})  # no neurons (pruning left none): not re-measured
    rows.append(row(5, 0.99, 0.6, 0.0))  # on the front, over the cap: not re-measured
    base = {"values": {"compliance": 0.1, "kl": 0.0, "over_refusal": 0.0}}
    rule = Rule(0.3, confirm_top=1, confirm_front=True)
    assert [r["number"] for r in rule.front_rows(rows)] == [2, 3]  # 0: dominated by 3; 1: by 2
    v = lambda c, kl: {"values": {"compliance": c, "kl": kl, "over_refusal": 0.0}}  # noqa: E731
    fresh = {"3": v(0.6, 0.2), "2": v(0.5, 0.08)}
    refs = {
        "DA (layer)": [{"label": "L1", **v(0.55, 0.05)}, {"label": "L2", **v(0.7, 0.1)}, {"label": "L3", **v(0.7, 0.3)}]
    }
    conf = {"data": {"harmful": "h", "harmless": "a"}, "baseline": v(0.2, 0.0), "trials": fresh}
    res = build_result({"model": "m"}, [dict(r) for r in rows], base, {}, rule, {**conf, "references": refs})
    front = res["confirmation"]["front"]
    assert [(f["number"], f["values"]["compliance"], f["validation"]["compliance"]) for f in front] == [
        (2, 0.5, 0.8),
        (3, 0.6, 0.95),
    ]
    got = [(e["label"], e["search_compliance"], e["search_trial"]) for e in res["confirmation"]["equal_kl"]]
    assert got == [("L1", None, None), ("L2", 0.5, 2), ("L3", 0.6, 3)]
    assert "search 0.500 (trial 2)" in summary(res) and "search none" in summary(res)
    # a candidate off the front counts among the searched points at equal KL
    rule2 = Rule(0.3, confirm_top=3, confirm_front=True)  # candidates 3, 2, 1 (1: dominated on validation)
    fresh2 = {**fresh, "1": v(0.65, 0.09)}
    res = build_result(
        {"model": "m"}, [dict(r) for r in rows], base, {}, rule2, {**conf, "trials": fresh2, "references": refs}
    )
    got = [(e["label"], e["search_compliance"], e["search_trial"]) for e in res["confirmation"]["equal_kl"]]
    assert got == [("L1", None, None), ("L2", 0.65, 1), ("L3", 0.65, 1)]
    # not yet measured (no references, or a front row missing): no fresh front, but the choice stands
    for part in ({**conf}, {**conf, "references": refs, "trials": {"3": fresh["3"]}}):
        res = build_result({"model": "m"}, [dict(r) for r in rows], base, {}, rule, part)
        assert res["chosen"]["number"] == 3 and "front" not in res["confirmation"]
    with pytest.raises(ValueError, match="confirm_top"):
        Rule(confirm_front=True)
    with pytest.raises(ValueError, match="confirm_front"):
        Rule(confirm_top=1, confirm_front=1)


def test_paired_test_of_equal_kl_points():
    """The reference point and the best searched point at equal KL are compared prompt by prompt (exact
    McNemar, by hand); points without per-prompt labels get no test."""

    def v(c, kl, labels=None):
        point = {"values": {"compliance": c, "kl": kl, "over_refusal": 0.0}}
        return point if labels is None else {**point, "labels": labels}

    ref = ["comply"] * 8 + ["refuse"] * 2 + ["evade", "comply"]  # 9 of 12 comply
    ours = ["refuse"] * 8 + ["comply"] * 2 + ["evade", "comply"]  # 3: the same last prompt, and 2 of its own
    # discordant: 8 only under the reference, 2 only under the search; p = 2·P(X ≤ 2), X ~ Bin(10, ½)
    assert paired(v(0.75, 0.1, ref), v(0.25, 0.1, ours)) == {
        "reference_only": 8,
        "search_only": 2,
        "p": pytest.approx(2 * (1 + 10 + 45) / 2**10),
    }
    assert paired(v(0.75, 0.1, ref), v(0.25, 0.1)) is None and paired(v(0.75, 0.1), v(0.2, 0.1, ours)) is None
    with pytest.raises(ValueError, match="length"):  # other prompts: refused, not compared
        paired(v(0.75, 0.1, ref), v(0.25, 0.1, ours[:-1]))
    rows = [row(2, 0.8, 0.1, 0.0), row(3, 0.95, 0.25, 0.0)]
    base = {"values": {"compliance": 0.1, "kl": 0.0, "over_refusal": 0.0}}
    over = {"values": {"compliance": 0.5, "kl": 0.2, "over_refusal": 0.5}}  # trial 3 over-refuses there
    fresh = {"2": v(0.25, 0.08, ours), "3": over}
    refs = {"DA (layer)": [{"label": "L1", **v(0.75, 0.1, ref)}, {"label": "L2", **v(0.7, 0.3, ref)}]}
    conf = {"data": {}, "baseline": v(0.0, 0.0), "trials": fresh, "references": refs}
    res = build_result({"model": "m"}, rows, base, {}, Rule(0.3, confirm_top=2, confirm_front=True), conf)
    got = [(e["search_trial"], e["paired"]) for e in res["confirmation"]["equal_kl"]]
    assert got[0][0] == 2 and got[0][1]["reference_only"] == 8 and got[1] == (3, None)
    assert res["confirmation"]["front"][0]["labels"] == ours  # kept with the re-measured points
    assert "McNemar p 0.11 (complied with under the reference alone: 8, the search alone: 2)" in summary(res)
    # the rule's pick on fresh prompts (trial 2: trial 3 over-refuses there) against each curve at no more
    # KL: no direction costs as little as its 0.08 (trial 3's 0.2 would meet L1)
    assert res["chosen"]["number"] == 2
    assert [(e["label"], e["paired"]) for e in res["confirmation"]["chosen_equal_kl"]] == [(None, None)]
    assert "the chosen point against each curve" in summary(res)


def test_chosen_point_against_each_curve_at_no_more_kl():
    """references_at: per curve, the most compliant point with KL ≤ the searched point's, tested prompt
    by prompt (exact McNemar, by hand); a curve with no point that cheap gets None."""

    def pt(label, c, kl, labels=None):
        return {"label": label, "values": {"compliance": c, "kl": kl}} | ({"labels": labels} if labels else {})

    ours, ref = ["comply"] * 9 + ["refuse"] * 3, ["comply"] * 3 + ["refuse"] * 9  # 6 discordant, all ours
    point = {"values": {"compliance": 0.75, "kl": 0.1}, "labels": ours}
    refs = {
        "DA (layer)": [pt("L1", 0.25, 0.05, ref), pt("L2", 0.9, 0.2, ["comply"] * 12), pt("L3", 0.1, 0.08, ref)],
        "CAA (α)": [pt("0.5", 0.8, 0.5)],
    }
    da, caa = references_at(point, refs)
    # L2 complies more but costs more KL; of L1 and L3 the more compliant; p = 2 · P(X = 0), X ~ Bin(6, ½)
    assert da == {
        "curve": "DA (layer)",
        "label": "L1",
        "kl": 0.05,
        "compliance": 0.25,
        "paired": {"reference_only": 0, "search_only": 6, "p": pytest.approx(2 / 2**6)},
    }
    assert caa == {"curve": "CAA (α)", "label": None, "kl": None, "compliance": None, "paired": None}


def test_confirm_data_bundled():
    from cna_lens.confirm import ConfirmData
    from cna_lens.datasets import load_prompts

    d = ConfirmData.bundled(5, 6, skip_harmful=32, skip_harmless=10, n_quality=4)
    assert d.harmful == tuple(load_prompts("harmful_train")[32:37])
    assert d.harmless == tuple(load_prompts("alpaca_val")[10:16])
    assert d.names == {
        "harmful": "harmful_train[32:37]",
        "harmless": "alpaca_val[10:16]",
        "quality": "xstest_safe_val (4 evenly spaced)",
    }
    val = load_prompts("xstest_safe_val")  # 0, 149 and the two rows at 49.67 and 99.33 rounded
    assert d.quality == d.quality_prompts == (val[0], val[50], val[99], val[149])
    plain = ConfirmData.bundled(5, 6, quality=None)
    assert plain.quality is None and plain.quality_prompts == plain.harmless and "quality" not in plain.names
    assert plain.digest() == ConfirmData(plain.harmful, plain.harmless, quality=("x",)).digest()  # not in it
    assert plain.quality_digest() != ConfirmData(plain.harmful, plain.harmless, quality=("x",)).quality_digest()
    with pytest.raises(ValueError, match="harmful_train"):
        ConfirmData.bundled(300)
    with pytest.raises(ValueError, match="150"):
        ConfirmData.bundled(n_quality=151)
    with pytest.raises(ValueError, match="unknown dataset"):
        ConfirmData.bundled(quality="xstest")
    with pytest.raises(ValueError, match="harmless"):
        ConfirmData(("a",), ())
    with pytest.raises(ValueError, match="quality"):
        ConfirmData(("a",), ("b",), quality=())


def test_search_data_quality_prompts():
    """``SearchData.bundled(quality=...)``: evenly spaced prompts of those the confirmation's leave out, so
    the two never share one; without them the digest is what it was (searches resume)."""
    from cna_lens.confirm import ConfirmData
    from cna_lens.datasets import load_prompts, spread_rest

    plain, d = SearchData.bundled(), SearchData.bundled(quality="xstest_safe_val", n_quality=5, confirm_quality=100)
    val, confirm = load_prompts("xstest_safe_val"), ConfirmData.bundled(n_quality=100).quality_prompts
    rest = [p for p in val if p not in confirm]
    assert len(rest) == 50 and spread_rest(val, 100) == rest
    assert d.quality == (rest[0], rest[12], rest[24], rest[37], rest[49])  # 12.25 / 24.5 / 36.75 rounded
    assert not set(d.quality) & set(confirm) and d.names["quality"].startswith("xstest_safe_val (5 evenly spaced")
    assert plain.quality is None and "quality" not in plain.names and d.digest() != plain.digest()
    fields = [getattr(plain, f) for f in ("discovery_pos", "discovery_neg", "effects", "harmful", "harmless")]
    assert SearchData(*fields).digest() == plain.digest() == "8753c4325fec8e7f"  # the committed searches' digest
    with pytest.raises(ValueError, match="50 outside the confirmation's 100"):
        SearchData.bundled(quality="xstest_safe_val", n_quality=51)
    with pytest.raises(ValueError, match="SearchData.quality"):
        SearchData(*fields, quality=())


def test_search_data_smaller_discovery():
    """``n_discovery``: the first n prompts of each discovery set, named so in the config; all by default."""
    from cna_lens.datasets import load_prompts

    plain, small = SearchData.bundled(), SearchData.bundled(n_discovery=8)
    assert plain.discovery_pos == tuple(load_prompts("discovery_harmful")) and len(plain.discovery_neg) == 103
    assert small.discovery_pos == plain.discovery_pos[:8] and small.discovery_neg == plain.discovery_neg[:8]
    assert small.names["discovery"] == "discovery_harmful[:8]/discovery_harmless[:8]"
    assert plain.names["discovery"] == "discovery_harmful/discovery_harmless" and small.digest() != plain.digest()
    assert small.harmful == plain.harmful and small.effects == plain.effects
    with pytest.raises(ValueError, match="limit=100 but 'discovery_harmful' has 99 prompts"):
        SearchData.bundled(n_discovery=100)


def test_xstest_validation_split_is_disjoint_from_the_reproduction():
    """``xstest_safe_val``: the safe XSTest prompts outside the reproduction's evenly spaced 100, all
    ten categories alike (15 each)."""
    from collections import Counter

    from cna_lens.datasets import XSTEST_TEST, load_dataset
    from cna_lens.stages import prompts_of

    safe, val = load_dataset("xstest_safe"), load_dataset("xstest_safe_val")
    test = {r["id"] for r in prompts_of("xstest_safe", XSTEST_TEST, spread=True)}
    assert len(test) == XSTEST_TEST and {r["id"] for r in val} == {r["id"] for r in safe} - test
    assert len(val) == len(safe) - XSTEST_TEST and set(Counter(r["category"] for r in val).values()) == {15}


def test_measure_objectives(planted, search_data, tmp_path):
    model, n, _ = planted
    s = Search(tmp_path, model="planted", data=search_data, startup_trials=3)
    import contextlib

    import cna_lens

    base, lp = s.measure(model, contextlib.nullcontext, None)
    ids = refusal_token_ids(model.tokenizer)
    refuses = lambda lp, k: [float(x) > 0 for x in refusal_score(lp[k], ids)]  # noqa: E731
    assert base["values"]["compliance"] == refuses(lp, "harmful").count(False) / 6
    assert base["values"]["over_refusal"] == refuses(lp, "benign").count(True) / 6
    assert base["values"]["compliance"] <= 0.5 and base["values"]["kl"] == 0.0  # the planted neuron refuses
    one = cna_lens.NeuronSet((PLANT_LAYER,), (n,), (1.0,), model.cfg.n_layers, model.cfg.d_mlp)
    res, lp2 = s.measure(model, lambda: cna_lens.ablate(model, one), lp)
    assert res["values"]["compliance"] == 1.0 and res["values"]["over_refusal"] == 0.0  # gone once ablated
    kl = (lp["harmless"].exp() * (lp["harmless"] - lp2["harmless"])).sum(-1).mean()
    assert res["values"]["kl"] == float(kl) and res["values"]["kl"] > 0.1  # the same formula on the same tensors
    assert res["values"]["compliance"] == res["first_token_compliance"]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"objective": "regex"}, "choose one of"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 0}, "batch_size"),
        ({"generation_batch_size": 0}, "generation_batch_size"),
        ({"reference_fractions": (0.0,)}, "reference_fractions"),
        ({"space": SearchSpace(rankings=("abs",))}, None),  # valid
    ],
)
def test_bad_settings(kw, match, search_data, tmp_path):
    if match is None:
        Search(tmp_path, model="m", data=search_data, **kw)
        return
    with pytest.raises(ValueError, match=match):
        Search(tmp_path, model="m", data=search_data, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"rankings": ("abs", "size")}, "rankings"),
        ({"fraction": (0.1, 0.01)}, "fraction"),
        ({"scale": (-2.0, 0.0)}, "scale"),
        ({"prune": ()}, "prune"),
        ({"min_layer": -1}, "min_layer"),
        ({"utility_weight": (1.0, 0.5)}, "utility_weight"),
    ],
)
def test_bad_space(kw, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace(**kw)


def test_quality_settings_checked(search_data, tmp_path):
    """A quality margin needs answers (the search's quality prompts or a confirmation's), and the
    confirmation's quality prompts must not be the search's; the answers' length is pinned."""
    import json
    from dataclasses import replace

    from cna_lens.confirm import ConfirmData

    with pytest.raises(ValueError, match="needs answers to judge"):
        Search(tmp_path / "a", model="m", data=search_data, rule=Rule(quality_margin=0.01))
    data = replace(search_data, quality=search_data.harmless[:2])
    Search(tmp_path / "b", model="m", data=data, rule=Rule(quality_margin=0.01, quality_tokens=20))
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["quality_tokens"] == 20 and config["data"]["digest"] == data.digest() != search_data.digest()
    shared = ConfirmData(search_data.harmful[:2], search_data.harmless[:2], quality=data.quality[1:])
    with pytest.raises(ValueError, match="1 of the search's quality prompts"):
        Search(tmp_path / "c", model="m", data=data, rule=Rule(confirm_top=1, quality_margin=0.01), confirm_data=shared)


def test_bad_data_and_resume_conflict(planted, search_data, tmp_path):
    with pytest.raises(ValueError, match="SearchData.harmful"):
        SearchData(PROMPTS, PROMPTS, PROMPTS, (), PROMPTS)
    with pytest.raises(ValueError, match="SearchData.harmless"):
        SearchData(PROMPTS, PROMPTS, PROMPTS, PROMPTS, "a prompt")
    Search(tmp_path, model="planted", data=search_data, seed=1)
    with pytest.raises(ValueError, match="seed=1"):
        Search(tmp_path, model="planted", data=search_data, seed=2)
    with pytest.raises(ValueError, match="trials"):
        Search(tmp_path, model="planted", data=search_data, seed=1).run(planted[0], 0)
    with exclusive(tmp_path / ".lock"), pytest.raises(ValueError, match="in use by another search"):
        Search(tmp_path, model="planted", data=search_data, seed=1).run(planted[0], 1)  # a second process's view


def test_cli_checks_before_loading(tmp_path, capsys):
    missing = tmp_path / "no-model"
    assert main(["search", "--model", str(missing), "--out", str(tmp_path / "o")]) == 2
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")  # loading it would fail: errors must come first
    for args, match in (
        (["--trials", "0"], "--trials"),
        (["--n-harmful", "400"], "harmful_val"),
        (["--rankings", "abs,size"], "rankings"),
        (["--kl-cap", "-1"], "kl_cap"),
        (["--benign", "nope"], "unknown dataset"),
        (["--confirm", "-1"], "--confirm"),
        (["--trial-batch", "0"], "trial_batch must be an int >= 1"),
        (["--trial-batch", "2"], "only objective='judge'"),
        (["--confirm", "2", "--confirm-harmful", "300"], "harmful_train[32:332]"),
        (["--confirm", "2", "--n-harmless", "200", "--confirm-harmless", "64"], "alpaca_val[200:264]"),
        (["--quality-margin", "0.01"], "needs answers to judge"),
        (["--trial-quality", "-1"], "--trial-quality >= 0"),
        (["--trial-quality", "4", "--quality-prompts", "harmless"], "not 'harmless'"),
        (["--trial-quality", "51"], "50 outside the confirmation's 100"),
        (["--confirm", "2", "--confirm-quality", "120", "--trial-quality", "40"], "30 outside the confirmation's 120"),
        (["--confirm", "2", "--quality-margin", "-0.01"], "quality_margin must be"),
        (["--confirm", "2", "--quality-margin", "0.01", "--quality-tokens", "0"], "quality_tokens must be"),
    ):
        assert main(["search", "--model", str(model_dir), "--out", str(tmp_path / "o"), *args]) == 2
        assert match in capsys.readouterr().err
