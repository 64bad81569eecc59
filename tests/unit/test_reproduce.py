"""The reproduce pipeline end to end on a tiny model: files, controls, CAA identity, resume."""

import contextlib
import json

import pytest
import torch

import cna_lens
from cna_lens import reproduce as rp
from cna_lens.intervene import steer
from cna_lens.runs import RunDir

KW = dict(
    max_new_tokens=3,
    limit=3,
    batch_size=8,
    caa_alphas=(0.5,),
    mmlu_limit=4,
    kl_limit=4,
    xstest_limit=4,
    val_limit=4,
    fractions=(0.001, 0.01),
    rankings=("abs", "diff"),
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
        "sweep.json",
        "capability.json",
        "attribution/attribution.json",
        "caa/attribution.json",
        "figures/dose_response.html",
        "timings.json",
    ):
        assert (out / f).exists(), f
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    keys = {(r["dataset"], r["condition"], r["prompt_id"]) for r in rows}
    harmful = {"baseline", results["paper_point"], results["chosen"], results["random_control"], *results["caa"]}
    # 3 JBB prompts × (harmful conditions + 2 benign) + 4 XSTest safe × (baseline, chosen)
    assert len(keys) == len(rows) == 3 * (len(harmful) + 2) + 4 * 2
    assert {r["condition"] for r in rows if r["dataset"] == "jbb_harmful"} == harmful
    assert set(results["generations"]) == {"jbb_harmful", "jbb_benign", "xstest_safe"}
    xstest = {r["prompt_id"] for r in rows if r["dataset"] == "xstest_safe"}
    by_id = {r["id"]: r["category"] for r in cna_lens.datasets.load_dataset("xstest_safe")}
    assert len({by_id[i] for i in xstest}) == 4  # evenly spaced over a set ordered by category
    assert set(results["timings_s"]) >= {"discovery", "sweep", "generate_jbb", "capability", "generate_xstest"}
    assert results["capability"]["baseline"]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # KL = 0 without intervention
    assert "| `baseline` (n=3)" in (out / "report.md").read_text()
    assert results["status"] == "complete" and 0 <= results["split_half_jaccard"] <= 1


def test_resume_after_interruption_gives_same_results(llama_model, full_run, tmp_path, monkeypatch):
    _, ref = full_run
    real = rp.generate_many
    n_jbb = 3 * sum(len(conds) for ds, conds in ref["generations"].items() if ds.startswith("jbb"))

    def flaky(*a, on_done, **k):
        saved = []

        def interrupt(j, i, text):
            on_done(j, i, text)
            saved.append(j)
            if len(saved) == n_jbb - 4:
                raise KeyboardInterrupt  # Ctrl-C while the last JBB rows are decoding

        return real(*a, on_done=interrupt, **k)

    monkeypatch.setattr(rp, "generate_many", flaky)
    with pytest.raises(KeyboardInterrupt):
        rp.reproduce(llama_model, tmp_path, **KW)
    rows = RunDir(tmp_path, json.loads((tmp_path / "config.json").read_text()) | {}).rows
    assert len(rows) == n_jbb - 4  # every completion was saved as it finished
    done = [json.loads(line) for line in (full_run[0] / "completions.jsonl").read_text().splitlines()]
    ref_rows = {(r["dataset"], r["condition"], r["prompt_id"]): r for r in done}
    for r in rows:
        assert r == ref_rows[(r["dataset"], r["condition"], r["prompt_id"])]
    monkeypatch.setattr(rp, "generate_many", real)
    again = rp.reproduce(llama_model, tmp_path, **KW)
    for key in ("generations", "capability", "sweep", "chosen", "split_half_jaccard"):
        assert again[key] == ref[key], key


def test_refuses_to_mix_runs(llama_model, full_run):
    out, _ = full_run
    with pytest.raises(ValueError, match="max_new_tokens=3, not 4"):
        rp.reproduce(llama_model, out, **{**KW, "max_new_tokens": 4})
    with pytest.raises(ValueError, match="limit"):
        rp.reproduce(llama_model, out, **{**KW, "limit": 101})


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
    lo, hi = rp.bootstrap_ci([0.0] * 50 + [1.0] * 50)
    assert 0.35 < lo < 0.5 < hi < 0.65


def test_legacy_run_dirs_count_as_weight_processed(tmp_path):
    """Runs written before ``process_weights`` was recorded were all processed: resuming them needs it."""
    (tmp_path / "config.json").write_text(json.dumps({"kind": "cna_lens.RunConfig", "model": "m"}))
    RunDir(tmp_path, {"model": "m", "process_weights": True})
    with pytest.raises(ValueError, match="process_weights=True, not False; resume it with --process-weights or"):
        RunDir(tmp_path, {"model": "m", "process_weights": False})
    RunDir(tmp_path, {"model": "m"})  # configs without the field compare as before


def test_sweep_reuses_conditions_that_compute_the_same(llama_model, full_run):
    out, results = full_run
    sweep, chosen = results["sweep"], results["chosen"]
    assert rp.same_as(f"{chosen}:0.0") == chosen and rp.same_as(f"{chosen}:1.0") == "baseline"
    assert rp.same_as(f"{chosen}:0.5") == f"{chosen}:0.5" and rp.same_as("caa:1.0") == "caa:1.0"
    assert sweep[f"{chosen}:0.0"] == sweep[chosen] and sweep[f"{chosen}:1.0"] == sweep["baseline"]
    # the reuse is exact: scoring both conditions gives the same bits
    config = json.loads((out / "config.json").read_text())
    config.pop("kind")
    rep = rp.Reproduction(llama_model, out, config, progress=False)
    prompts = ["How do I pick a lock?", "Write a poem", "Hi"]
    for cond in (f"{chosen}:0.0", f"{chosen}:1.0"):
        assert torch.equal(rep.scores(cond, prompts), rep.scores(rp.same_as(cond), prompts))
    assert not torch.equal(rep.scores(chosen, prompts), rep.scores("baseline", prompts))


def test_generation_edits_equal_the_conditions_hooks(llama_model, full_run):
    """Each condition generates under a weight edit / torch hook on the stock engine: the same greedy
    texts as its TransformerLens hooks with TransformerLens' generate (scales 0 and ½ are exact)."""
    out, results = full_run
    config = json.loads((out / "config.json").read_text())
    config.pop("kind")
    rep = rp.Reproduction(llama_model, out, config, progress=False)
    chosen = results["chosen"]
    prompts = ["How do I pick a lock?", "Write a poem about the sea", "Hi", "Explain photosynthesis."]
    texts = {}
    for cond in ("baseline", chosen, f"{chosen}:0.5", results["random_control"], "caa:0.5"):
        edit = rep.edit(cond)
        assert (edit is None) == (cond == "baseline")
        kw = dict(max_new_tokens=8, batch_size=4, progress=False)
        with edit() if edit is not None else contextlib.nullcontext():
            texts[cond] = cna_lens.generate(llama_model, prompts, **kw)
        with rep.intervention(cond)():
            assert cna_lens.generate(llama_model, prompts, **kw) == texts[cond], cond
    for cond in (chosen, results["random_control"], "caa:0.5"):  # (one neuron at ½ may change no token)
        assert texts[cond] != texts["baseline"], cond  # the intervention acts during generation
