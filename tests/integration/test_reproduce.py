"""The reproduce pipeline end to end on a tiny model: files, controls, CAA identity, resume."""

import contextlib
import json
import re

import numpy as np
import pytest
import torch

import cna_lens
from cna_lens import reproduce as rp
from cna_lens import stages
from cna_lens.conditions import Condition
from cna_lens.intervene import steer
from cna_lens.runs import RunDir

KW = dict(
    max_new_tokens=3,
    limit=3,
    batch_size=8,
    caa_alphas=(0.5,),
    mmlu_limit=6,
    kl_limit=4,
    xstest_limit=4,
    val_limit=4,
    heldout_limit=5,
    fractions=(0.001, 0.01),
    rankings=("abs", "diff"),
    judge="regex",
    choose_tokens=4,
    progress=False,
)


@pytest.fixture(scope="module")
def full_run(llama_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, rp.reproduce(llama_model, out, **KW)


def test_run_directory_contents(full_run):
    out, results = full_run
    for f in (
        "config.json",
        "results.json",
        "report.md",
        "completions.jsonl",
        "verdicts.jsonl",
        "compliance.json",
        "perplexity.jsonl",
        "sweep.json",
        "val_completions.jsonl",
        "direction.json",
        "capability.json",
        "first_token.json",
        "heldout.json",
        "attribution/attribution.json",
        "caa/attribution.json",
        "resid/attribution.json",
        "figures/dose_response.html",
        "figures/methods.html",
        "timings.json",
    ):
        assert (out / f).exists(), f
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    keys = {(r["dataset"], r["condition"], r["prompt_id"]) for r in rows}
    harmful = set(results["conditions"])
    kinds = {Condition.parse(c).kind for c in harmful}
    assert kinds == {"baseline", "cna", "random", "magnitude", "top", "caa", "caa_layer", "direction"}
    # 3 JBB prompts × (harmful conditions + 2 benign) + 4 XSTest safe × (baseline, chosen)
    assert len(keys) == len(rows) == 3 * (len(harmful) + 2) + 4 * 2
    assert {r["condition"] for r in rows if r["dataset"] == "jbb_harmful"} == harmful
    assert set(results["generations"]) == {"jbb_harmful", "jbb_benign", "xstest_safe"}
    xstest = {r["prompt_id"] for r in rows if r["dataset"] == "xstest_safe"}
    by_id = {r["id"]: r["category"] for r in cna_lens.datasets.load_dataset("xstest_safe")}
    assert len({by_id[i] for i in xstest}) == 4  # evenly spaced over a set ordered by category
    stages_run = {
        "discovery",
        "direction",
        "sweep",
        "judged_sweep",
        "generate_jbb",
        "capability",
        "generate_xstest",
        "judge",
    }
    assert set(results["timings_s"]) >= stages_run | {"perplexity", "first_token", "split_half"}
    cap = results["capability"]
    assert cap["baseline"]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # KL(P‖P) = 0 up to fp32 log-softmax rounding
    assert all(c["mmlu_n"] == 6 for c in cap.values())
    assert all(0 <= c["mcnemar"]["p"] <= 1 for k, c in cap.items() if k != "baseline")
    labels = {"refuse", "comply", "evade"}
    for cond in harmful:
        e = results["compliance"]["jbb_harmful"][cond]
        assert e["n"] == 3 and set(e) >= labels and sum(e[x]["count"] for x in labels) == 3
    assert set(results["perplexity"]) == harmful
    assert results["first_token_vs_judge"]["n"] == 3 * len(harmful)
    assert set(results["heldout"]) == {"baseline", results["chosen"]}
    held = json.loads((out / "heldout.json").read_text())["scores"]
    first5 = [r["id"] for r in cna_lens.datasets.load_dataset("harmful_test", 5)]
    assert all(list(s) == first5 for s in held.values()) and all(e["n"] == 5 for e in results["heldout"].values())
    assert json.loads((out / "config.json").read_text())["heldout"] == "harmful_test[:5]"
    assert all(pts[0]["condition"] == "baseline" for pts in results["curves"].values())
    op = results["operating_point"]
    judged = ["baseline"] + [f"cna:{b}:{f}" for b in ("abs", "diff") for f in (0.001, 0.01)]
    assert sorted(op["judged"]) == sorted(judged) and all(e["n"] == 4 for e in op["judged"].values())
    assert op["rule"] == "first_token" and results["chosen"] == op["first_token"]
    assert op["judge"] == rp.choose_judged(op["judged"], KW["rankings"]).key
    val = [json.loads(line) for line in (out / "val_completions.jsonl").read_text().splitlines()]
    assert len(val) == 4 * len(judged) and all(r["judge"] == "regex" for r in val)
    for r in val:  # the stored label is the judge's verdict on the stored completion
        assert r["label"] == cna_lens.judge_completions([r["prompt"]], [r["completion"]], "regex")[0].label
    report = (out / "report.md").read_text()
    assert "## Operating point" in report
    assert "| baseline `baseline` |" in report and "## Over-refusal" in report
    assert "## Validation sweep" in report and f"`{results['chosen']}`" in report
    # every table row has as many cells as its header (labels such as "CNA |diff|" are escaped)
    cells = lambda line: len(re.split(r"(?<!\\)\|", line))  # noqa: E731
    for block in re.findall(r"(?:^\|.*\n)+", report, flags=re.M):
        rows = block.splitlines()
        assert all(cells(r) == cells(rows[0]) for r in rows), block
    assert results["status"] == "complete" and 0 <= results["split_half_jaccard"] <= 1


def test_mcnemar_in_the_table_matches_the_stored_predictions(full_run):
    """The table's p-value is recomputed from the per-item predictions the run saved."""
    from cna_lens.scoring import mcnemar

    out, results = full_run
    entries = json.loads((out / "capability.json").read_text())["entries"]
    answers = [r["answer"] for r in cna_lens.datasets.load_dataset("mmlu", 6)]
    base = [p == a for p, a in zip(entries["baseline"]["mmlu_predictions"], answers)]
    for cond, e in entries.items():
        if cond != "baseline":
            ok = [p == a for p, a in zip(e["mmlu_predictions"], answers)]
            assert results["capability"][cond]["mcnemar"]["p"] == mcnemar(base, ok)[2]
            assert results["capability"][cond]["mmlu_acc"] == sum(ok) / 6


def test_resume_after_interruption_gives_same_results(llama_model, full_run, tmp_path, monkeypatch):
    _, ref = full_run
    real = stages.generate_many
    n_jbb = 3 * sum(len(conds) for ds, conds in ref["generations"].items() if ds.startswith("jbb"))

    def flaky(*a, on_done, **k):
        saved = []

        def interrupt(j, i, text):
            on_done(j, i, text)
            saved.append(j)
            if len(saved) == n_jbb - 4:
                raise KeyboardInterrupt  # Ctrl-C while the last JBB rows are decoding

        return real(*a, on_done=interrupt, **k)

    monkeypatch.setattr(stages, "generate_many", flaky)
    with pytest.raises(KeyboardInterrupt):
        rp.reproduce(llama_model, tmp_path, **KW)
    rows = RunDir(tmp_path, json.loads((tmp_path / "config.json").read_text()) | {}).rows
    assert len(rows) == n_jbb - 4  # every completion was saved as it finished
    done = [json.loads(line) for line in (full_run[0] / "completions.jsonl").read_text().splitlines()]
    ref_rows = {(r["dataset"], r["condition"], r["prompt_id"]): r for r in done}
    for r in rows:
        assert r == ref_rows[(r["dataset"], r["condition"], r["prompt_id"])]
    monkeypatch.setattr(stages, "generate_many", real)
    again = rp.reproduce(llama_model, tmp_path, **KW)
    for key in ("generations", "capability", "sweep", "chosen", "compliance", "perplexity", "split_half_jaccard"):
        assert again[key] == ref[key], key


def test_refuses_to_mix_runs(llama_model, full_run):
    out, _ = full_run
    with pytest.raises(ValueError, match="max_new_tokens=3, not 4"):
        rp.reproduce(llama_model, out, **{**KW, "max_new_tokens": 4})
    with pytest.raises(ValueError, match="limit"):
        rp.reproduce(llama_model, out, **{**KW, "limit": 101})


def test_judged_rule_chooses_the_run_point(llama_model, full_run, tmp_path):
    """``choose_by="judge"`` generates JBB under the judged rule's point; the first-token run's
    validation completions are reused (same prompts, tokens and model), so both runs agree on them."""
    out, ref = full_run
    (tmp_path / "val_completions.jsonl").write_bytes((out / "val_completions.jsonl").read_bytes())
    res = rp.reproduce(llama_model, tmp_path, **{**KW, "choose_by": "judge", "mmlu_limit": 0, "xstest_limit": 0})
    assert res["operating_point"] == {**ref["operating_point"], "rule": "judge"}
    assert res["chosen"] == ref["operating_point"]["judge"]
    assert res["config"]["choose_by"] == "judge"
    with pytest.raises(ValueError, match="choose_by='judge', not 'first_token'"):
        rp.reproduce(llama_model, tmp_path, **{**KW, "mmlu_limit": 0, "xstest_limit": 0})


def test_operating_point_rules():
    """Both rules: the smallest fraction (≤ 1 %) within 0.05 of the best CNA entry; ties go to the
    earlier ranking; baseline, scaled and > 1 % entries never win."""
    share = lambda r: {"refusal_share": r}  # noqa: E731
    comply = lambda c: {"comply": {"rate": c}}  # noqa: E731
    sweep = {
        "baseline": share(0.9),
        "cna:abs:0.001": share(0.5),
        "cna:abs:0.003": share(0.12),
        "cna:diff:0.003": share(0.10),
        "cna:abs:0.01": share(0.08),
        "cna:abs:0.02": share(0.0),
        "cna:abs:0.001:0.5": share(0.0),
    }
    assert rp.choose(sweep, ["abs", "diff"]).key == "cna:abs:0.003"  # 0.12 ≤ 0.08 + 0.05; 0.02 is out
    assert rp.choose(sweep, ["diff", "abs"]).key == "cna:diff:0.003"  # the tie goes to the earlier ranking
    judged = {"baseline": comply(0.1), "cna:abs:0.001": comply(0.2), "cna:abs:0.003": comply(0.4)}
    judged |= {"cna:abs:0.01": comply(0.6), "cna:diff:0.01": comply(0.62)}
    assert rp.choose_judged(judged, ["abs", "diff"]).key == "cna:abs:0.01"
    op = rp.operating_point(sweep, judged, "judge", 48, ["abs", "diff"])
    assert (op["first_token"], op["judge"]) == ("cna:abs:0.003", "cna:abs:0.01")
    assert op["judged"]["cna:abs:0.003"]["first_token_refusal"] == 0.12
    assert op["judged"]["cna:diff:0.01"]["first_token_refusal"] is None  # not in the sweep: not in r
    x, y = [0.1, 0.5, 0.88, 0.92], [0.1, 0.2, 0.4, 0.6]
    assert op["pearson_r"] == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    assert op["mean_abs_gap"] == pytest.approx(np.mean(np.abs(np.subtract(x, y))))
    with pytest.raises(ValueError, match="no CNA entry"):
        rp.choose_judged({"baseline": comply(0.1)}, ["abs"])
    with pytest.raises(ValueError, match="choose_by 'votes'"):
        rp.reproduce("smollm2-135m-instruct", "unused", choose_by="votes")


def test_random_control_keeps_per_layer_counts(llama_model):
    ns = cna_lens.NeuronSet((2, 2, 3), (1, 5, 7), (3.0, 2.0, 1.0), 4, 96)
    ctl = ns.random_like(seed=1)
    assert ctl.per_layer_counts() == ns.per_layer_counts()
    assert ctl == ns.random_like(seed=1) and ctl != ns.random_like(seed=2)


def test_caa_alpha_zero_is_identity(llama_model):
    ids = torch.tensor([cna_lens.encode(llama_model.tokenizer, ["Hello there"])[0]])
    ref = llama_model(ids)
    vectors = torch.randn(llama_model.cfg.n_layers, llama_model.cfg.d_model)
    with steer(llama_model, vectors, 0.0):
        torch.testing.assert_close(llama_model(ids), ref, atol=0, rtol=0)
    with steer(llama_model, vectors, 1.0):
        assert not torch.allclose(llama_model(ids), ref)


def test_bootstrap_ci():
    lo, hi = cna_lens.report.bootstrap_ci([0.0] * 50 + [1.0] * 50)
    assert 0.35 < lo < 0.5 < hi < 0.65


def test_legacy_run_dirs_count_as_weight_processed(tmp_path):
    """Runs written before ``process_weights`` was recorded were all processed: resuming them needs it."""
    (tmp_path / "config.json").write_text(json.dumps({"kind": "cna_lens.RunConfig", "model": "m"}))
    RunDir(tmp_path, {"model": "m", "process_weights": True})
    with pytest.raises(ValueError, match="process_weights=True, not False; resume it with --process-weights or"):
        RunDir(tmp_path, {"model": "m", "process_weights": False})
    RunDir(tmp_path, {"model": "m"})  # configs without the field compare as before


def _rep(llama_model, out):
    config = json.loads((out / "config.json").read_text())
    config.pop("kind")
    return stages.Reproduction(llama_model, out, config, progress=False)


def test_sweep_reuses_conditions_that_compute_the_same(llama_model, full_run):
    out, results = full_run
    sweep, chosen = results["sweep"], Condition.parse(results["chosen"])
    at = lambda s: Condition("cna", chosen.ranking, chosen.fraction, s)  # noqa: E731
    assert at(0.0).same_as() == chosen and at(1.0).same_as() == Condition("baseline")
    assert at(0.5).same_as() == at(0.5)
    assert sweep[at(0.0).key] == sweep[chosen.key] and sweep[at(1.0).key] == sweep["baseline"]
    # the reuse is exact: scoring both conditions gives the same bits
    rep = _rep(llama_model, out)
    prompts = ["How do I pick a lock?", "Write a poem", "Hi"]
    for c in (at(0.0), at(1.0)):
        assert torch.equal(rep.scores(c, prompts), rep.scores(c.same_as(), prompts))
    assert not torch.equal(rep.scores(chosen, prompts), rep.scores(Condition("baseline"), prompts))


def test_generation_edits_equal_the_conditions_hooks(llama_model, full_run):
    """Each condition generates under a weight edit / torch hook on the stock engine: the same greedy
    texts as its TransformerLens hooks with TransformerLens' generate (scales 0 and ½ are exact)."""
    out, results = full_run
    rep = _rep(llama_model, out)
    chosen = Condition.parse(results["chosen"])
    conds = [Condition.parse(c) for c in results["conditions"]]
    conds.append(Condition("cna", chosen.ranking, chosen.fraction, 0.5))
    conds.append(Condition("direction", layer=results["direction"]["layer"], strength=0.5))
    prompts = ["How do I pick a lock?", "Write a poem about the sea", "Hi", "Explain photosynthesis."]
    texts = {}
    for c in conds:
        edit = rep.iv.edit(c)
        assert (edit is None) == (c.kind == "baseline")
        kw = dict(max_new_tokens=8, batch_size=4, progress=False)
        with edit() if edit is not None else contextlib.nullcontext():
            texts[c] = cna_lens.generate(llama_model, prompts, **kw)
        with rep.iv.hooked(c):
            assert cna_lens.generate(llama_model, prompts, **kw) == texts[c], c.key
    for c in conds:
        if c.kind in ("cna", "caa", "caa_layer", "direction") and c.scale is None:
            assert texts[c] != texts[Condition("baseline")], c.key  # the intervention acts during generation


def test_a_selection_joins_a_finished_run(llama_model, full_run, tmp_path):
    """``--selection`` on a finished run adds the condition ``selection`` to every set it reports on,
    keeps everything else, and a different selection for the same directory is refused."""
    import shutil

    from cna_lens.selection import Selection

    out, ref = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    sel = Selection("diff", 0.02, first_layer=1, scale=-0.5)
    sel.save(tmp_path / "selection.json")
    res = rp.reproduce(llama_model, run, selection=tmp_path / "selection.json", **KW)
    assert "selection" in res["conditions"] and res["conditions"]["selection"]["neurons"] == 8  # round(0.02·4·96)
    for ds in ("jbb_harmful", "jbb_benign", "xstest_safe"):
        assert res["generations"][ds]["selection"]["n"] == (4 if ds == "xstest_safe" else 3)
        for cond, entry in ref["generations"][ds].items():
            assert res["generations"][ds][cond] == entry  # nothing recomputed
    assert "selection" in res["heldout"] and "selection" in res["capability"]
    again = rp.reproduce(llama_model, run, **KW)  # resumed without the flag: the stored selection stays
    assert again["conditions"] == res["conditions"]
    Selection("abs", 0.02).save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="already holds the selection"):
        rp.reproduce(llama_model, run, selection=tmp_path / "other.json", **KW)
    # --replace-selection: the same as adding the other selection to the run without one
    swapped = rp.reproduce(llama_model, run, selection=tmp_path / "other.json", replace_selection=True, **KW)
    fresh_dir = tmp_path / "fresh"
    shutil.copytree(out, fresh_dir)
    fresh = rp.reproduce(llama_model, fresh_dir, selection=tmp_path / "other.json", **KW)
    for key in ("conditions", "generations", "capability", "compliance", "perplexity", "heldout", "sweep"):
        assert swapped[key] == fresh[key], key
    assert Selection.load(run / "selection" / "selection.json") == Selection("abs", 0.02)
    for name in ("completions.jsonl", "verdicts.jsonl", "perplexity.jsonl"):
        assert sorted((run / name).read_text().splitlines()) == sorted((fresh_dir / name).read_text().splitlines())


def test_direction_strengths_join_a_finished_run(llama_model, full_run, tmp_path):
    """``direction_strengths`` adds ``direction:<L>:<s>`` to the JBB harmful conditions and the direction
    curve of a finished run, recomputes nothing else, and the strengths of earlier calls stay."""
    import shutil

    out, ref = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    layer = ref["direction"]["layer"]
    with pytest.raises(ValueError, match="strength"):
        rp.reproduce(llama_model, run, direction_strengths=[0.0], **KW)  # refused before any work
    res = rp.reproduce(llama_model, run, direction_strengths=[0.5, 1.0], **KW)
    added = f"direction:{layer}:0.5"
    assert set(res["conditions"]) == set(ref["conditions"]) | {added}  # strength 1 is the plain ablation
    assert res["stages"]["direction_strengths"] == [0.5, 1.0]
    for cond, entry in ref["generations"]["jbb_harmful"].items():
        assert res["generations"]["jbb_harmful"][cond] == entry
    assert res["generations"]["jbb_harmful"][added]["n"] == 3 and added not in res["generations"]["jbb_benign"]
    assert [p["condition"] for p in res["curves"]["direction"]][0] == "baseline"
    assert {p["condition"] for p in res["curves"]["direction"]} == {"baseline", f"direction:{layer}", added}
    scores = [res["sweep"][k]["mean_score"] for k in ("baseline", added, f"direction:{layer}")]
    assert len(set(scores)) == 3  # half the removal is neither none nor all of it
    again = rp.reproduce(llama_model, run, **KW)  # resumed without the flag: the strengths stay
    assert again["stages"]["direction_strengths"] == [0.5, 1.0] and added in again["conditions"]
