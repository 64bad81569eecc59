"""Whole search runs on the planted tiny model: resume = uninterrupted, the judge objective, the CLI end to
end, the Pareto figure."""

import contextlib
import json
import types
from functools import partial

import optuna
import pytest
import torch
from safetensors.torch import load_file

import cna_lens.judge
from cna_lens import plot
from cna_lens.attribute import Attribution, attribute_multi
from cna_lens.cli import main
from cna_lens.controls import refusal_direction
from cna_lens.edit import edit_direction
from cna_lens.neurons import NeuronSet
from cna_lens.pareto import load_result, pareto_mask
from cna_lens.prompts import encode, left_pad
from cna_lens.search import Search
from cna_lens.search_refs import CURVES, DIRECTION_DEPTHS
from cna_lens.selection import SearchSpace, Selection

from ..tolerance import fp32_atol

pytestmark = pytest.mark.integration


def make(out, search_data, **kw):
    """A small search on ``planted`` (the settings every test here shares, unless overridden)."""
    kw.setdefault("startup_trials", 3)
    kw.setdefault("caa_alphas", (0.5,))
    kw.setdefault("reference_fractions", (0.01,))
    return Search(out, model="planted", data=search_data, **kw)


def run(model, out, trials, search_data, **kw):
    return make(out, search_data, **kw).run(model, trials, progress=False)


def test_search_runs_and_resumes(planted, search_data, tmp_path):
    model, _, _ = planted
    full = run(model, tmp_path / "full", 6, search_data, seed=3)  # 3 random startup trials, then 3 TPE
    assert full["n_trials"] == 6 and len(full["trials"]) == 6
    assert full["baseline"]["values"]["compliance"] <= 0.5
    pts = [[t["values"][k] for k in ("compliance", "kl", "over_refusal")] for t in full["trials"]]
    assert [t["pareto"] for t in full["trials"]] == pareto_mask(pts, [True, False, False])
    assert set(full["references"]) == set(CURVES)
    assert load_result(tmp_path / "full") == json.loads(json.dumps(full))
    # stopped after the startup trials, a trial left RUNNING by a killed process, then resumed to 6
    run(model, tmp_path / "part", 3, search_data, seed=3)
    storage = f"sqlite:///{(tmp_path / 'part' / 'study.db').resolve()}"
    optuna.load_study(study_name="cna_lens.search", storage=storage).ask()
    resumed = run(model, tmp_path / "part", 6, search_data, seed=3)
    assert resumed["n_trials"] == 6
    key = lambda r: (r["params"], r["values"], r["n_neurons"])  # noqa: E731
    assert [key(r) for r in resumed["trials"]] == [key(r) for r in full["trials"]]
    states = [t.state for t in optuna.load_study(study_name="cna_lens.search", storage=storage).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    other = run(model, tmp_path / "other", 3, search_data, seed=4)
    assert [r["params"] for r in other["trials"]] != [r["params"] for r in full["trials"][:3]]
    # the chosen point obeys the rule and its selection file reproduces its neurons
    assert full["chosen"] is not None and full["chosen"]["values"]["kl"] <= 0.3
    assert Selection.load(tmp_path / "full" / "selection.json").to_dict() == full["chosen"]["selection"]
    chosen = next(t for t in full["trials"] if t["number"] == full["chosen"]["number"])
    assert len(NeuronSet.load(tmp_path / "full" / "neurons.json")) == chosen["n_neurons"]
    fig = plot.pareto_front(full, references={"directional ablation": [(0.2, 0.5), (0.4, 0.9)]})
    names = [t.name for t in fig.data]
    assert {"trials", "front", "CNA |diff| (share)", "CAA (α)", "directional ablation", "baseline"} <= set(names)
    modes = {t.name: t.mode for t in fig.data}
    assert modes[CURVES[2]] == "markers+text" and modes[CURVES[1]] == "lines+markers+text"  # layers: no line


def test_direction_curve_added_to_an_older_search(planted, search_data, tmp_path):
    """A references.json without the direction curve gains it on rerun, the other curves kept as stored;
    each point equals the measurement with the weight-edit form of the same ablation."""
    model, _, _ = planted
    run(model, tmp_path / "s", 3, search_data)
    path = tmp_path / "s" / "references.json"
    refs = json.loads(path.read_text())
    del refs["curves"][CURVES[2]]
    refs["curves"][CURVES[1]][0]["values"]["kl"] = 123.0  # a marker: read back, not re-measured
    path.write_text(json.dumps(refs))
    again = run(model, tmp_path / "s", 3, search_data)
    assert again["references"][CURVES[1]][0]["values"]["kl"] == 123.0
    n = model.cfg.n_layers
    layers = sorted({min(n - 1, max(1, round(d * n))) for d in DIRECTION_DEPTHS})
    points = again["references"][CURVES[2]]
    assert [p["label"] for p in points] == [f"L{layer}" for layer in layers]
    s = make(tmp_path / "s", search_data)  # the same settings, reopened: measure with another path
    resid = Attribution.load(tmp_path / "s" / "resid")  # saved by the discovery's pass: as a pass of its own
    alone = attribute_multi(model, search_data.discovery_pos, search_data.discovery_neg, ["hook_resid_pre"])
    for f in ("sum_pos", "sum_neg", "sumsq_pos", "sumsq_neg"):
        assert torch.equal(getattr(resid, f), getattr(alone["hook_resid_pre"], f)), f
    assert "resid" not in json.loads((tmp_path / "s" / "timings.json").read_text())["seconds"]  # no second pass
    base = load_file(str(tmp_path / "s" / "baseline.safetensors"))
    for layer, p in zip(layers, points):
        res, lp = s.measure(model, partial(edit_direction, model, refusal_direction(resid, layer)), base)
        assert res["values"]["compliance"] == p["values"]["compliance"]
        # two fp32 paths (projected weights vs projected activations): each log-probability is off by at
        # most ε = fp32_atol(max |log p|, d_mlp, n_layers); KL = Σ p (log p − log q) moves by at most
        # ε · (2 + max |log p − log q|) to first order
        eps = fp32_atol(float(lp["harmless"].abs().max()), model.cfg.d_mlp, n)
        gap = float((base["harmless"] - lp["harmless"]).abs().max())
        assert res["values"]["kl"] == pytest.approx(p["values"]["kl"], abs=eps * (2 + gap))


def test_judge_objective(planted, search_data, tmp_path, monkeypatch):
    model, _, _ = planted
    calls = []

    def judge_completions(prompts, completions, judge="default"):
        calls.append((len(prompts), judge))
        return [types.SimpleNamespace(label=("comply", "evade", "refuse")[i % 3]) for i in range(len(prompts))]

    with pytest.raises(ValueError, match="judge"):  # names are checked up front, before any directory
        Search(tmp_path / "c", model="planted", data=search_data, objective="judge", judge="oracle")
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(cna_lens.judge, "judge_completions", judge_completions)
    res = run(model, tmp_path / "b", 2, search_data, objective="judge", judge="regex", max_new_tokens=2)
    assert calls and calls[0] == (len(search_data.harmful), "regex")
    t = res["trials"][0]
    # ratios of counts (one float division): approx's default rel=1e-6 is ample
    assert t["values"]["compliance"] == pytest.approx(2 / 6)  # prompts 0 and 3 of 6 "comply"
    assert t["judged"] == pytest.approx({"refuse": 2 / 6, "comply": 2 / 6, "evade": 2 / 6})
    assert t["labels"] == ["comply", "evade", "refuse"] * 2  # per prompt, in the prompts' order
    assert 0 <= res["agreement"]["per_prompt"] <= 1


def test_cli_search_end_to_end(planted, tmp_path, capsys):
    _, _, path = planted
    out = tmp_path / "out"
    argv = [
        "search",
        "--model",
        str(path),
        "--out",
        str(out),
        "--trials",
        "3",
        "--dtype",
        "float32",
        "--n-harmful",
        "4",
        "--n-harmless",
        "4",
        "--n-effects",
        "4",
        "--samples",
        "1",
        "--sample-tokens",
        "2",
        "--no-png",
        "--confirm",
        "2",
        "--confirm-harmful",
        "3",
        "--confirm-harmless",
        "3",
        "--confirm-front",
        "--quality-margin",
        "0.5",
        "--quality-tokens",
        "6",
        "--confirm-quality",
        "3",
        "--trial-quality",
        "2",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "3 trials" in text and "chosen:" in text and "re-measured on fresh prompts" in text
    conf = json.loads((out / "confirm.json").read_text())
    assert conf["data"]["harmful"] == "harmful_train[4:7]" and conf["data"]["harmless"] == "alpaca_val[4:7]"
    assert conf["quality"]["tokens"] == 6 and len(conf["quality"]["baseline"]) == 3 and "answer quality" in text
    assert conf["quality"]["prompts"] == "xstest_safe_val (3 evenly spaced)"
    res = load_result(out)
    assert res["rule"]["quality_margin"] == 0.5 and all("quality" in c for c in res["confirmation"]["candidates"])
    store = json.loads((out / "quality.json").read_text())  # every trial's own answers, 2 prompts outside those 3
    assert store["prompts"] == "xstest_safe_val (2 evenly spaced, outside the confirmation's 3)"
    assert len(store["baseline"]) == 2 and set(store["trials"]) == {str(t["number"]) for t in res["trials"]}
    assert all("validation_quality" in c for c in res["confirmation"]["candidates"])
    assert res["n_trials"] == 3 and (out / "pareto.html").exists() and (out / "pareto_fresh.html").exists()
    assert (
        set(res["confirmation"]["references"]) == set(CURVES)
        and "reference point against the best searched point" in text
    )
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {r["condition"] for r in rows} >= {"baseline"}
    assert torch.isfinite(torch.tensor([t["values"]["kl"] for t in res["trials"]])).all()


def test_judge_objective_with_the_real_regex_judge(planted, search_data, tmp_path):
    pytest.importorskip("cna_lens.judge")
    model, _, _ = planted
    res = run(model, tmp_path, 2, search_data, objective="judge", judge="regex", max_new_tokens=3)
    for t in res["trials"] + [res["baseline"]]:
        assert sum(t["judged"].values()) == pytest.approx(1.0)  # one label per prompt (3 rounded ratios)
        assert t["values"]["compliance"] == t["judged"]["comply"]
        assert len(t["labels"]) == len(search_data.harmful)
        assert t["labels"].count("comply") / len(t["labels"]) == t["values"]["compliance"]


def test_judged_generation_runs_on_the_weight_edit(planted, search_data, tmp_path, monkeypatch):
    """A trial scores and generates on the stock engine under the equal weight edit (no TL hook active),
    as evaluation does: its texts equal TL's generate under the hooks (fp32, greedy),
    differ from the baseline's (the planted neuron is off), and the weights are restored afterwards."""
    from cna_lens.engine import tl_hooks_active
    from cna_lens.search_refs import neuron_forms

    from ..conftest import PLANT_LAYER

    model, n, _ = planted
    seen = []
    monkeypatch.setattr(
        cna_lens.judge,
        "judge_completions",
        lambda prompts, completions, judge="default": [types.SimpleNamespace(label="comply")] * len(prompts),
    )
    s = make(tmp_path, search_data, objective="judge", judge="regex", max_new_tokens=4, generation_batch_size=3)
    generate = s.generate
    monkeypatch.setattr(
        s, "generate", lambda m, p: seen.append((tl_hooks_active(m), (out := generate(m, p))[0])) or out
    )
    one = NeuronSet((PLANT_LAYER,), (n,), (1.0,), model.cfg.n_layers, model.cfg.d_mlp)
    hooked, stock = neuron_forms(model, one, 0.0)
    assert stock is not None  # a TransformerBridge: its weights can be edited
    before = [p.detach().clone() for p in model.parameters()]
    s.measure(model, contextlib.nullcontext, None)
    s.measure(model, hooked, None, stock)
    s.measure(model, hooked, None)  # no stock form: TL's generate under the hooks
    (base_hooks, base), (edit_hooks, edited), (tl_hooks, tl) = seen
    assert not base_hooks and not edit_hooks and tl_hooks
    assert edited == tl and edited != base
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_judged_first_token_scores_come_from_the_generation_prefill(planted, search_data, tmp_path, monkeypatch):
    """In a judged search the harmful prompts run through the model once: their first-token scores come
    from the generation's prefill under the weight edit and equal a scoring pass under the hooks (fp32
    summation order); without a stock form (TL's generate) they are scored under the hooks. KL and
    over-refusal are scored under the stock form where there is one, under the hooks otherwise: the
    same log-probabilities up to fp32 summation order."""
    import cna_lens.search as search_mod
    from cna_lens.evaluate import final_logprobs, refusal_score, refusal_token_ids
    from cna_lens.prompts import encode, left_pad
    from cna_lens.search_refs import neuron_forms

    from ..conftest import PLANT_LAYER
    from ..helpers import assert_close_model

    model, n, _ = planted
    monkeypatch.setattr(
        cna_lens.judge,
        "judge_completions",
        lambda prompts, completions, judge="default": [types.SimpleNamespace(label="comply")] * len(prompts),
    )
    scored = []
    monkeypatch.setattr(search_mod, "final_logprobs", lambda m, p, **kw: scored.append(p) or final_logprobs(m, p, **kw))
    s = make(tmp_path, search_data, objective="judge", judge="regex", max_new_tokens=3, generation_batch_size=2)
    one = NeuronSet((PLANT_LAYER,), (n,), (1.0,), model.cfg.n_layers, model.cfg.d_mlp)
    hooked, stock = neuron_forms(model, one, 0.5)
    ids = refusal_token_ids(model.tokenizer)
    with hooked(), torch.no_grad():
        want_lp = final_logprobs(model, list(search_data.harmful))
        want_harmless = final_logprobs(model, list(search_data.harmless))
        tokens, mask = left_pad(encode(model.tokenizer, list(search_data.harmful)), model.tokenizer.pad_token_id)
        logits = model(tokens, attention_mask=mask)  # the scale of the rounding bound
    want = refusal_score(want_lp, ids)
    for form in (stock, None):
        scored.clear()
        out, lp = s.measure(model, hooked, None, form)
        harmful_passes = [p for p in scored if p == list(search_data.harmful)]
        assert len(harmful_passes) == (0 if form is stock else 1)
        assert list(search_data.harmless) in scored  # KL
        tol = 2 * float(logits.abs().max())  # log-softmax: ≤ 2 δ
        assert_close_model(lp["harmful"], want_lp, model, scale=tol)
        assert_close_model(lp["harmless"], want_harmless, model, scale=tol)
        assert out["first_token_compliance"] == sum(float(x) <= 0 for x in want) / len(want)
    assert 0 < out["first_token_compliance"] < 1  # the scale of 0.5 leaves some refusals: the check is not vacuous


def test_baseline_of_another_engine_is_recomputed(planted, search_data, tmp_path):
    """The baseline's log-probabilities are kept with the engine that computed them; a stored baseline
    of the other engine (a search begun under TL hooks) is measured again, not mixed into KL."""
    from cna_lens.runs import atomic_write_json, read_json

    model, _, _ = planted
    s = make(tmp_path, search_data)
    first, lp = s.baseline(model)
    stored = read_json(tmp_path / "baseline.json", "cna_lens.SearchBaseline")
    assert stored["engine"] == "stock"
    assert s.baseline(model)[0] == first  # read back
    atomic_write_json(tmp_path / "baseline.json", {**stored, "engine": "tl", "baseline": {"values": "stale"}})
    again, lp_again = s.baseline(model)
    assert again["values"] == first["values"] and torch.equal(lp_again["harmless"], lp["harmless"])
    assert read_json(tmp_path / "baseline.json", "cna_lens.SearchBaseline")["engine"] == "stock"


def test_confirmation_chooses_on_fresh_prompts(planted, search_data, tmp_path):
    """With ``Rule(confirm_top=2)`` the rule's first two validation points are measured again on fresh
    prompts, and the pick is the rule's on those numbers; the fresh measurement equals a search whose
    own validation prompts are the fresh ones; a rerun reads them back; other prompts are refused."""
    from dataclasses import replace

    from cna_lens.confirm import ConfirmData
    from cna_lens.pareto import Rule

    model, _, _ = planted
    fresh = ConfirmData(search_data.harmless[:3], search_data.harmful[1:4], {"set": "fresh"})
    kw = dict(seed=1, rule=Rule(confirm_top=2), space=SearchSpace(prune=(False,)))  # no trial without neurons
    res = run(model, tmp_path / "s", 5, search_data, **kw, confirm_data=fresh)
    conf = json.loads((tmp_path / "s" / "confirm.json").read_text())
    plain = load_result(tmp_path / "s")["trials"]
    cands = Rule().rank(plain, res["baseline"]["values"])[:2]
    assert all(c["n_neurons"] > 0 for c in cands)
    assert [c["number"] for c in res["confirmation"]["candidates"]] == [c["number"] for c in cands]
    assert set(conf["trials"]) == {str(c["number"]) for c in cands}
    again = [{**c, "values": conf["trials"][str(c["number"])]["values"]} for c in cands]
    pick = Rule().choose(again, conf["baseline"]["values"])
    assert res["chosen"]["number"] == pick["number"] and res["chosen"]["values"] == pick["values"]
    assert res["chosen"]["validation"] == next(t for t in plain if t["number"] == pick["number"])["values"]
    assert Selection.load(tmp_path / "s" / "selection.json").to_dict() == res["chosen"]["selection"]
    fig = plot.pareto_front(res)
    star = next(t for t in fig.data if t.name.startswith("chosen"))
    assert (star.x[0], star.y[0]) == (res["chosen"]["validation"]["kl"], res["chosen"]["validation"]["compliance"])
    diamonds = next(t for t in fig.data if t.name.startswith("candidates on fresh prompts"))
    assert list(diamonds.y) == [c["values"]["compliance"] for c in res["confirmation"]["candidates"]]
    # independent path: a search whose validation prompts are the fresh ones measures the same numbers
    other = make(tmp_path / "o", replace(search_data, harmful=fresh.harmful, harmless=fresh.harmless))
    base, _ = other.measure(model, contextlib.nullcontext, None)
    assert base["values"] == conf["baseline"]["values"]
    # a rerun reads the measurements back (a marker survives) instead of re-measuring
    conf["trials"][str(pick["number"])]["mean_refusal_score"] = 123.0
    (tmp_path / "s" / "confirm.json").write_text(json.dumps(conf))
    run(model, tmp_path / "s", 5, search_data, **kw, confirm_data=fresh)
    assert (
        json.loads((tmp_path / "s" / "confirm.json").read_text())["trials"][str(pick["number"])]["mean_refusal_score"]
        == 123.0
    )
    # resumed with a candidate missing: it is measured again against the recomputed baseline pass, as before
    other_number = next(c for c in cands if c["number"] != pick["number"])["number"]
    before = conf["trials"].pop(str(other_number))
    (tmp_path / "s" / "confirm.json").write_text(json.dumps(conf))
    run(model, tmp_path / "s", 5, search_data, **kw, confirm_data=fresh)
    after = json.loads((tmp_path / "s" / "confirm.json").read_text())["trials"][str(other_number)]
    assert after["values"] == before["values"] and before["values"]["kl"] > 0  # KL: against the baseline pass
    moved = ConfirmData(search_data.harmless[1:4], search_data.harmful[1:4])
    with pytest.raises(ValueError, match="other prompts"):
        run(model, tmp_path / "s", 5, search_data, **kw, confirm_data=moved)
    with pytest.raises(ValueError, match="confirm_data"):
        make(tmp_path / "s", search_data, rule=Rule(confirm_top=2))


def test_answer_quality_of_the_candidates(planted, search_data, tmp_path):
    """``Rule(quality_margin=...)``: the baseline and each candidate answer the fresh harmless prompts at
    length. Candidates decoded together (``trial_batch=2``) give each one's answers generated alone under
    its weight edit (fp32, greedy); each quality entry equals the 4-gram quality difference recomputed by
    hand on the prompts both answer; the pick is the rule's among those within the margin; a rerun reads
    the answers back, another length regenerates them."""
    from cna_lens.confirm import ConfirmData
    from cna_lens.edit import edit_weights
    from cna_lens.evaluate import judge, quality
    from cna_lens.generation import generate
    from cna_lens.pareto import Rule

    model, _, _ = planted
    fresh = ConfirmData(search_data.harmless[:3], search_data.harmful[1:4], {"set": "fresh"})
    kw = dict(
        seed=1,
        space=SearchSpace(prune=(False,)),
        confirm_data=fresh,
        objective="judge",
        judge="regex",
        max_new_tokens=2,
        trial_batch=2,
    )
    rule = Rule(confirm_top=2, quality_margin=0.01, quality_tokens=40)
    res = run(model, tmp_path / "s", 4, search_data, rule=rule, **kw)
    conf = json.loads((tmp_path / "s" / "confirm.json").read_text())
    store, prompts = conf["quality"], list(fresh.harmless)
    assert store["tokens"] == 40 and store["baseline"] == generate(model, prompts, max_new_tokens=40)
    attr = Attribution.load(tmp_path / "s" / "attribution")
    cands = res["confirmation"]["candidates"]
    assert len(cands) == 2 and set(store["answers"]) == {str(c["number"]) for c in cands}
    selections = {t["number"]: Selection.from_dict(t["selection"]) for t in res["trials"]}
    for c in cands:
        sel = selections[c["number"]]
        with edit_weights(model, sel.neurons(attr), sel.scale):
            alone = generate(model, prompts, max_new_tokens=40)
        assert store["answers"][str(c["number"])] == alone
        both = [
            i for i, (a, b) in enumerate(zip(store["baseline"], alone)) if not (judge(a).refused or judge(b).refused)
        ]
        by_hand = sum(quality(alone[i]) - quality(store["baseline"][i]) for i in both) / len(both)
        assert c["quality"]["n"] == len(both) and c["quality"]["diff"] == pytest.approx(by_hand, abs=1e-12)
    assert any(store["answers"][str(c["number"])] != store["baseline"] for c in cands)  # the edits change answers
    ok = [c for c in cands if c["quality"]["diff"] >= -0.01]
    pick = Rule().choose(ok, res["confirmation"]["baseline"]["values"])
    assert (res["chosen"] or {}).get("number") == (pick or {}).get("number")
    # a rerun reads the answers back (a marker survives); another length regenerates them all
    number = str(cands[0]["number"])
    conf["trials"][number]["quality"]["marker"] = 1
    (tmp_path / "s" / "confirm.json").write_text(json.dumps(conf))
    run(model, tmp_path / "s", 4, search_data, rule=rule, **kw)
    assert json.loads((tmp_path / "s" / "confirm.json").read_text())["trials"][number]["quality"]["marker"] == 1
    run(model, tmp_path / "s", 4, search_data, rule=Rule(confirm_top=2, quality_margin=0.01, quality_tokens=8), **kw)
    again = json.loads((tmp_path / "s" / "confirm.json").read_text())
    assert again["quality"]["tokens"] == 8 and "marker" not in again["trials"][number]["quality"]
    assert again["quality"]["baseline"] == generate(model, prompts, max_new_tokens=8)
    other = ConfirmData(fresh.harmful, fresh.harmless, fresh.names, quality=search_data.harmful[:2])
    kw["confirm_data"] = other  # other quality prompts: regenerated; the objectives' measurements are kept
    run(model, tmp_path / "s", 4, search_data, rule=Rule(confirm_top=2, quality_margin=0.01, quality_tokens=8), **kw)
    last = json.loads((tmp_path / "s" / "confirm.json").read_text())
    assert last["quality"]["digest"] == other.quality_digest() != again["quality"]["digest"]
    assert last["quality"]["baseline"] == generate(model, list(search_data.harmful[:2]), max_new_tokens=8)
    assert all(len(t) == 2 for t in last["quality"]["answers"].values())
    assert last["trials"][number]["values"] == again["trials"][number]["values"]


def test_trial_answer_quality_constrains_the_search(planted, search_data, tmp_path):
    """``SearchData.quality`` with ``Rule(quality_margin=m)``: every trial answers the quality prompts at
    length (two trials decoded together); each trial's answers equal its selection's generated alone
    under its weight edit, its quality equals the 4-gram difference recomputed by hand, its Optuna
    constraint is −diff − m; the pick is the rule's among the trials within the margin; a resumed search
    keeps the answers it has and adds the new trials'."""
    from dataclasses import replace

    from cna_lens.edit import edit_weights
    from cna_lens.evaluate import judge, quality
    from cna_lens.generation import generate
    from cna_lens.pareto import Rule

    model, _, _ = planted
    data = replace(search_data, quality=search_data.harmless[:3], names={"quality": "tiny"})
    rule = Rule(quality_margin=0.0, quality_tokens=30)
    kw = dict(seed=1, space=SearchSpace(prune=(False,)), objective="judge", judge="regex", max_new_tokens=2)
    kw |= dict(trial_batch=2, rule=rule)
    run(model, tmp_path / "s", 2, data, **kw)
    store = json.loads((tmp_path / "s" / "quality.json").read_text())
    assert set(store["trials"]) == {"0", "1"} and store["prompts"] == "tiny" and store["tokens"] == 30
    res = run(model, tmp_path / "s", 4, data, **kw)  # resumed
    store = json.loads((tmp_path / "s" / "quality.json").read_text())
    prompts = list(data.quality)
    assert store["baseline"] == generate(model, prompts, max_new_tokens=30)
    attr = Attribution.load(tmp_path / "s" / "attribution")
    storage = f"sqlite:///{(tmp_path / 's' / 'study.db').resolve()}"
    frozen = {t.number: t for t in optuna.load_study(study_name="cna_lens.search", storage=storage).trials}
    assert [t["number"] for t in res["trials"]] == [0, 1, 2, 3] and set(store["trials"]) == {"0", "1", "2", "3"}
    for t in res["trials"]:
        sel = Selection.from_dict(t["selection"])
        with edit_weights(model, sel.neurons(attr), sel.scale):
            alone = generate(model, prompts, max_new_tokens=30)
        assert store["trials"][str(t["number"])] == alone, t["number"]
        base = store["baseline"]
        both = [i for i, (a, b) in enumerate(zip(base, alone)) if not (judge(a).refused or judge(b).refused)]
        by_hand = sum(quality(alone[i]) - quality(base[i]) for i in both) / len(both)
        assert t["quality"]["n"] == len(both) and t["quality"]["diff"] == pytest.approx(by_hand, abs=1e-12)
        assert frozen[t["number"]].constraints == {"answer_quality": pytest.approx(-by_hand)}
    assert any(
        store["trials"][str(t["number"])] != store["baseline"] for t in res["trials"]
    )  # the edits change answers
    ok = [t for t in res["trials"] if t["quality"]["diff"] >= 0]
    assert (res["chosen"] or {}).get("number") == (Rule().choose(ok, res["baseline"]["values"]) or {}).get("number")
    with pytest.raises(ValueError, match="quality_tokens"):  # pinned: answers of one length only
        make(tmp_path / "s", data, **{**kw, "rule": Rule(quality_margin=0.0, quality_tokens=8)})


def test_fresh_front_equals_a_search_on_those_prompts(planted, search_data, tmp_path):
    """``Rule(confirm_front=True)``: the front's rows and the reference curves are re-measured on the fresh
    prompts; each reference point equals the one a search whose validation prompts are the fresh ones
    draws (independent path: its own baseline pass and curves); a stopped curve is re-measured alone."""
    from dataclasses import replace

    from cna_lens.confirm import ConfirmData
    from cna_lens.pareto import Rule

    model, _, _ = planted
    fresh = ConfirmData(search_data.harmless[:3], search_data.harmful[1:4], {"set": "fresh"})
    rule = Rule(confirm_top=1, confirm_front=True)
    kw = dict(seed=1, rule=rule, space=SearchSpace(prune=(False,)), confirm_data=fresh)
    res = run(model, tmp_path / "s", 5, search_data, **kw)
    conf = json.loads((tmp_path / "s" / "confirm.json").read_text())
    on_front = rule.front_rows(load_result(tmp_path / "s")["trials"])
    assert on_front and [f["number"] for f in res["confirmation"]["front"]] == [r["number"] for r in on_front]
    assert {str(r["number"]) for r in on_front} <= set(conf["trials"]) and set(conf["references"]) == set(CURVES)
    other = run(model, tmp_path / "o", 1, replace(search_data, harmful=fresh.harmful, harmless=fresh.harmless))
    for curve, pts in other["references"].items():
        got = conf["references"][curve]
        assert [p["label"] for p in got] == [p["label"] for p in pts]
        for a, b in zip(got, pts):
            assert a["values"]["compliance"] == b["values"]["compliance"]
            assert a["values"]["over_refusal"] == b["values"]["over_refusal"]
            assert a["values"]["kl"] == pytest.approx(b["values"]["kl"], abs=1e-6)
    fig = plot.fresh_front(res)
    dots = next(t for t in fig.data if t.name == "validation front, re-measured")
    assert list(dots.y) == [f["values"]["compliance"] for f in res["confirmation"]["front"]]
    with pytest.raises(ValueError, match="confirm-front"):
        plot.fresh_front(other)
    both = plot.fresh_fronts({"a": res, "b": res})  # several searches on the same fresh prompts
    assert [t.name for t in both.data[:2]] == ["a", "b"] and both.data[0].y == both.data[1].y
    moved = json.loads(json.dumps(res))
    moved["confirmation"]["data"]["digest"] = "other"
    with pytest.raises(ValueError, match="different fresh prompts"):
        plot.fresh_fronts({"a": res, "b": moved})
    # a stopped confirmation: one curve missing, a marker in another; the rerun measures the missing one only
    conf["references"].pop(CURVES[2])
    conf["references"][CURVES[1]][0]["marker"] = 1
    (tmp_path / "s" / "confirm.json").write_text(json.dumps(conf))
    again = run(model, tmp_path / "s", 5, search_data, **kw)["confirmation"]["references"]
    assert again[CURVES[1]][0]["marker"] == 1  # read back, not re-measured
    values = lambda pts: [p["values"] for p in pts]  # noqa: E731  (KL against the recomputed baseline pass)
    assert values(again[CURVES[2]]) == values(res["confirmation"]["references"][CURVES[2]])


def test_trial_batch_measures_each_trial_as_alone_and_resumes(planted, search_data, tmp_path, monkeypatch):
    """``trial_batch=2``: TPE proposes two trials at once (constant liar) and their answers are decoded in
    one batch. Each trial's answers, objectives and labels equal measuring its selection alone (fp32: the
    same greedy answers, the same scoring pass), its first-token scores up to fp32 summation order; a
    search stopped after whole batches, with a trial left RUNNING by a killed process, resumes to what
    an uninterrupted one gives; the confirmation measures its candidates in batches too; the setting is
    pinned."""
    from dataclasses import replace

    from cna_lens.confirm import ConfirmData
    from cna_lens.evaluate import final_logprobs
    from cna_lens.pareto import Rule
    from cna_lens.search_refs import measure_neurons, measure_trials
    from cna_lens.selection import saved_effects

    from ..helpers import logit_tol

    model, _, _ = planted
    answers: list[list[str]] = []  # what the judge reads, in measurement order (the baseline's first)
    regex = cna_lens.judge.judge_completions
    monkeypatch.setattr(
        cna_lens.judge, "judge_completions", lambda p, c, judge="default": answers.append(list(c)) or regex(p, c, judge)
    )
    fresh = ConfirmData(search_data.harmless[:3], search_data.harmful[1:4], {"set": "fresh"})
    kw = dict(seed=3, objective="judge", judge="regex", max_new_tokens=3, generation_batch_size=2, trial_batch=2)
    kw |= dict(
        space=SearchSpace(prune=(False,)), rule=Rule(confirm_top=3), confirm_data=fresh
    )  # every trial has neurons
    full = run(model, tmp_path / "full", 6, search_data, **kw)
    assert full["n_trials"] == 6
    conf = json.loads((tmp_path / "full" / "confirm.json").read_text())
    batched = answers[1:7]
    assert len({tuple(a) for a in batched}) > 1  # the trials' answers differ: each must be its own
    answers.clear()
    alone = make(tmp_path / "alone", search_data, **{**kw, "trial_batch": 1})
    baseline, base = alone.baseline(model)
    attr, effects = Attribution.load(tmp_path / "full" / "attribution"), saved_effects(tmp_path / "full")
    with torch.no_grad():  # the scale of the rounding bound: a refusal score (log-odds) moves ≤ 2 max|Δlogit|
        tokens, mask = left_pad(encode(model.tokenizer, list(search_data.harmful)), model.tokenizer.pad_token_id)
        tol = 2 * logit_tol(model, 2 * model(tokens, attention_mask=mask))
    for t in full["trials"]:
        sel = Selection.from_dict(t["selection"])
        neurons = sel.neurons(attr, effects)
        assert len(neurons) > 0
        got = measure_neurons(alone, model, neurons, sel.scale, baseline, base, "trials")
        assert got["values"] == t["values"] and got["labels"] == t["labels"], t["number"]
        assert abs(got["mean_refusal_score"] - t["mean_refusal_score"]) <= tol, t["number"]
    assert answers[1:] == batched
    # a selection left without neurons (by pruning) in a batch is the unmodified model, beside the others
    empty = NeuronSet((), (), (), model.cfg.n_layers, model.cfg.d_mlp)
    mixed = [
        (Selection.from_dict(t["selection"]).neurons(attr, effects), t["selection"]["scale"]) for t in full["trials"]
    ]
    got = measure_trials(alone, model, [mixed[0], (empty, 0.0), mixed[1]], baseline, base)
    assert got[1] == {**baseline, "seconds": 0.0}
    assert [g["values"] for g in (got[0], got[2])] == [full["trials"][i]["values"] for i in (0, 1)]
    fresh_data = replace(search_data, harmful=fresh.harmful, harmless=fresh.harmless, benign=None)
    fresh_base = {"harmless": final_logprobs(model, list(fresh.harmless), batch_size=alone.batch_size, engine="auto")}
    assert len(conf["trials"]) == 3  # the candidates, measured in a batch of two and one alone
    for number, res in conf["trials"].items():
        sel = Selection.from_dict(next(t for t in full["trials"] if t["number"] == int(number))["selection"])
        got = measure_neurons(alone, model, sel.neurons(attr, effects), sel.scale, {}, fresh_base, "c", fresh_data)
        assert got["values"] == res["values"] and got["labels"] == res["labels"], number
    run(model, tmp_path / "part", 4, search_data, **kw)
    storage = f"sqlite:///{(tmp_path / 'part' / 'study.db').resolve()}"
    optuna.load_study(study_name="cna_lens.search", storage=storage).ask()
    resumed = run(model, tmp_path / "part", 6, search_data, **kw)
    key = lambda r: (r["params"], r["values"], r["n_neurons"])  # noqa: E731
    assert [key(r) for r in resumed["trials"]] == [key(r) for r in full["trials"]]
    with pytest.raises(ValueError, match="trial_batch"):
        make(tmp_path / "full", search_data, **{**kw, "trial_batch": 1})
    with pytest.raises(ValueError, match="only objective='judge'"):
        make(tmp_path / "first", search_data, trial_batch=2)
