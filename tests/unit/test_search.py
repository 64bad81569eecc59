"""Search: Pareto flags, the choice rule, objectives, resume = uninterrupted, bad input, CLI, figure."""

import importlib.util
import json
import random
import sys
import types

import optuna
import pytest
import torch

from cna_lens import plot
from cna_lens.cli import main
from cna_lens.evaluate import refusal_score, refusal_token_ids
from cna_lens.neurons import NeuronSet
from cna_lens.pareto import Rule, build_result, load_result, pareto_mask
from cna_lens.runs import exclusive
from cna_lens.search import Search, SearchData, SearchSpace
from cna_lens.selection import Selection

from ..conftest import PROMPTS
from .test_selection import PLANT_LAYER, planted  # noqa: F401  (module fixture)


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


@pytest.fixture(scope="module")
def data():
    return SearchData(PROMPTS[:5], PROMPTS[2:], PROMPTS[:4], PROMPTS[:6], PROMPTS[1:], None, {"set": "tiny"})


def run(model, out, trials, data, **kw):
    kw.setdefault("startup_trials", 3)
    kw.setdefault("caa_alphas", (0.5,))
    kw.setdefault("reference_fractions", (0.01,))
    return Search(out, model="planted", data=data, **kw).run(model, trials, progress=False)


def test_measure_objectives(planted, data, tmp_path):  # noqa: F811
    model, n, _ = planted
    s = Search(tmp_path, model="planted", data=data, startup_trials=3)
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
    assert res["values"]["kl"] == pytest.approx(float(kl)) and res["values"]["kl"] > 0.1
    assert res["values"]["compliance"] == res["first_token_compliance"]


def test_search_runs_and_resumes(planted, data, tmp_path):  # noqa: F811
    model, _, _ = planted
    full = run(model, tmp_path / "full", 8, data, seed=3)
    assert full["n_trials"] == 8 and len(full["trials"]) == 8
    assert full["baseline"]["values"]["compliance"] <= 0.5
    pts = [[t["values"][k] for k in ("compliance", "kl", "over_refusal")] for t in full["trials"]]
    assert [t["pareto"] for t in full["trials"]] == pareto_mask(pts, [True, False, False])
    assert set(full["references"]) == {"CNA |diff| (share)", "CAA (α)"}
    assert load_result(tmp_path / "full") == json.loads(json.dumps(full))
    # stopped after 4, a trial left RUNNING by a killed process, then resumed to 8
    run(model, tmp_path / "part", 4, data, seed=3)
    storage = f"sqlite:///{(tmp_path / 'part' / 'study.db').resolve()}"
    optuna.load_study(study_name="cna_lens.search", storage=storage).ask()
    resumed = run(model, tmp_path / "part", 8, data, seed=3)
    assert resumed["n_trials"] == 8
    key = lambda r: (r["params"], r["values"], r["n_neurons"])  # noqa: E731
    assert [key(r) for r in resumed["trials"]] == [key(r) for r in full["trials"]]
    states = [t.state for t in optuna.load_study(study_name="cna_lens.search", storage=storage).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    other = run(model, tmp_path / "other", 4, data, seed=4)
    assert [r["params"] for r in other["trials"]] != [r["params"] for r in full["trials"][:4]]
    # the chosen point obeys the rule and its selection file reproduces its neurons
    assert full["chosen"] is not None and full["chosen"]["values"]["kl"] <= 0.3
    assert Selection.load(tmp_path / "full" / "selection.json").to_dict() == full["chosen"]["selection"]
    chosen = next(t for t in full["trials"] if t["number"] == full["chosen"]["number"])
    assert len(NeuronSet.load(tmp_path / "full" / "neurons.json")) == chosen["n_neurons"]
    fig = plot.pareto_front(full, references={"directional ablation": [(0.2, 0.5), (0.4, 0.9)]})
    names = [t.name for t in fig.data]
    assert {"trials", "front", "CNA |diff| (share)", "CAA (α)", "directional ablation", "baseline"} <= set(names)


def test_judge_objective(planted, data, tmp_path, monkeypatch):  # noqa: F811
    model, _, _ = planted
    calls = []

    def judge_completions(prompts, completions, judge="default"):
        calls.append((len(prompts), judge))
        return [types.SimpleNamespace(label=("comply", "evade", "refuse")[i % 3]) for i in range(len(prompts))]

    if importlib.util.find_spec("cna_lens.judge") is not None:  # the real module checks names up front
        monkeypatch.delitem(sys.modules, "cna_lens.judge", raising=False)
        with pytest.raises(ValueError, match="judge"):
            Search(tmp_path / "c", model="planted", data=data, objective="judge", judge="oracle")
        assert not (tmp_path / "c").exists()
    monkeypatch.setitem(sys.modules, "cna_lens.judge", types.SimpleNamespace(judge_completions=judge_completions))
    res = run(model, tmp_path / "b", 2, data, objective="judge", judge="regex", max_new_tokens=2)
    assert calls and calls[0] == (len(data.harmful), "regex")
    t = res["trials"][0]
    assert t["values"]["compliance"] == pytest.approx(2 / 6)  # prompts 0 and 3 of 6 "comply"
    assert t["judged"] == pytest.approx({"refuse": 2 / 6, "comply": 2 / 6, "evade": 2 / 6})
    assert 0 <= res["agreement"]["per_prompt"] <= 1


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"objective": "regex"}, "choose one of"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 0}, "batch_size"),
        ({"reference_fractions": (0.0,)}, "reference_fractions"),
        ({"space": SearchSpace(rankings=("abs",))}, None),  # valid
    ],
)
def test_bad_settings(kw, match, data, tmp_path):
    if match is None:
        Search(tmp_path, model="m", data=data, **kw)
        return
    with pytest.raises(ValueError, match=match):
        Search(tmp_path, model="m", data=data, **kw)


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


def test_bad_data_and_resume_conflict(planted, data, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="SearchData.harmful"):
        SearchData(PROMPTS, PROMPTS, PROMPTS, (), PROMPTS)
    with pytest.raises(ValueError, match="SearchData.harmless"):
        SearchData(PROMPTS, PROMPTS, PROMPTS, PROMPTS, "a prompt")
    Search(tmp_path, model="planted", data=data, seed=1)
    with pytest.raises(ValueError, match="seed=1"):
        Search(tmp_path, model="planted", data=data, seed=2)
    with pytest.raises(ValueError, match="trials"):
        Search(tmp_path, model="planted", data=data, seed=1).run(planted[0], 0)
    with exclusive(tmp_path / ".lock"), pytest.raises(ValueError, match="in use by another search"):
        Search(tmp_path, model="planted", data=data, seed=1).run(planted[0], 1)  # a second process's view


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
    ):
        assert main(["search", "--model", str(model_dir), "--out", str(tmp_path / "o"), *args]) == 2
        assert match in capsys.readouterr().err


def test_cli_search_end_to_end(planted, tmp_path, capsys):  # noqa: F811
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
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "3 trials" in text and "chosen:" in text
    res = load_result(out)
    assert res["n_trials"] == 3 and (out / "pareto.html").exists()
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {r["condition"] for r in rows} >= {"baseline"}
    assert torch.isfinite(torch.tensor([t["values"]["kl"] for t in res["trials"]])).all()


def test_judge_objective_with_the_real_regex_judge(planted, data, tmp_path):  # noqa: F811
    pytest.importorskip("cna_lens.judge")
    model, _, _ = planted
    res = run(model, tmp_path, 2, data, objective="judge", judge="regex", max_new_tokens=3)
    for t in res["trials"] + [res["baseline"]]:
        assert sum(t["judged"].values()) == pytest.approx(1.0)  # one label per prompt
        assert t["values"]["compliance"] == t["judged"]["comply"]
