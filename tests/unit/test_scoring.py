"""MMLU per item, exact McNemar, Wilson intervals, completion perplexity and matched-set quality."""

import math
from collections import Counter

import pytest
import torch

from cna_lens.datasets import load_dataset
from cna_lens.evaluate import MMLU_PREFIX, final_logprobs, mmlu_accuracy, mmlu_prompt, quality
from cna_lens.prompts import encode, format_prompt, left_pad
from cna_lens.scoring import (
    completion_nll,
    label_rates,
    matched_quality,
    mcnemar,
    mmlu_correct,
    mmlu_letter_ids,
    mmlu_predictions,
    perplexity,
    proportion_ci,
)

from ..conftest import hf_reference
from ..helpers import logit_tol

COMPLETIONS = [
    "Sure, here is how you do it.",
    "I'm sorry, I can't help with that.",
    "",  # an empty generation
    "Photosynthesis turns light into sugar.",
    "4",
    "First, preheat the oven to 180 degrees. Then mix the flour, the sugar and the eggs in a bowl.",
    "Because.",
]


# --------------------------------------------------------------------------- MMLU
def test_bundled_mmlu_is_57_subjects_by_10():
    rows = load_dataset("mmlu")
    per_subject = Counter(r["subject"] for r in rows)
    assert len(rows) == 570 and len(per_subject) == 57 and set(per_subject.values()) == {10}
    assert all(r["answer"] == "ABCD"[r["answer_index"]] and len(r["choices"]) == 4 for r in rows)
    assert len({r["id"] for r in rows}) == 570


def test_mmlu_predictions_match_a_direct_argmax(tiny_dir, tiny_model):
    rows = load_dataset("mmlu")[::57]  # 10 items from 10 subjects
    preds = mmlu_predictions(tiny_model, rows, batch_size=4, leading_space=False)
    assert len(preds) == len(rows) and set(preds) <= set("ABCD")
    # the same argmax from an independent plain-HF forward, one item at a time
    hf = hf_reference(tiny_dir)
    letters = mmlu_letter_ids(tiny_model.tokenizer, leading_space=False)
    checked = 0
    for r, p in zip(rows, preds):
        ids = torch.tensor([format_prompt(tiny_model.tokenizer, mmlu_prompt(r), response_prefix=MMLU_PREFIX)])
        with torch.no_grad():
            last = hf(ids).logits[0, -1]
        top2 = last[letters].topk(2).values
        # a letter can flip only where two letters' logits lie within twice the rounding bound (logit_tol,
        # tests/helpers.py: fp32 summation order between the padded batch and this unpadded pass)
        if top2[0] - top2[1] > 2 * logit_tol(tiny_model, last):
            assert p == "ABCD"[int(last[letters].argmax())]
            checked += 1
    assert checked >= 8
    # and the per-item correctness averages to the evaluate module's accuracy on the same scores
    lp = final_logprobs(tiny_model, [mmlu_prompt(r) for r in rows], batch_size=4, response_prefix=MMLU_PREFIX)
    acc = mmlu_accuracy(lp, [r["answer"] for r in rows], tiny_model.tokenizer, leading_space=False)
    assert sum(mmlu_correct(preds, rows)) / len(rows) == acc


def _forms(model):
    """Each intervention kind as (its TransformerLens-hook form, its stock-engine form)."""
    import contextlib
    from functools import partial

    import cna_lens
    from cna_lens.controls import direction_ablation_hooks
    from cna_lens.engine import steer_mlp_out

    from ..helpers import random_neurons

    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=g)
    r = torch.randn(model.cfg.d_model, generator=g)
    r = r / r.norm()
    ns = random_neurons(model, per_layer=8, seed=2)
    return {
        "none": (contextlib.nullcontext, contextlib.nullcontext),
        "neurons x0.5": (partial(cna_lens.ablate, model, ns, 0.5), partial(cna_lens.edit_weights, model, ns, 0.5)),
        "caa": (partial(cna_lens.steer, model, vectors, 1.5), partial(steer_mlp_out, model, vectors, 1.5)),
        "direction": (
            partial(model.hooks, fwd_hooks=direction_ablation_hooks(model, r)),
            partial(cna_lens.edit_direction, model, r),
        ),
    }


@pytest.mark.parametrize("form", ["none", "neurons x0.5", "caa", "direction"])
def test_final_logprobs_on_the_stock_engine_equal_the_hooked_model(tiny_model, prompts, form):
    """``engine="auto"`` under an intervention's stock form (prefill with the chat prefix computed once,
    batches by length) gives what the hooked model gives under its TL-hook form, up to fp32 summation
    order (log-softmax at most doubles a logit's error), with a response prefix too; under TL hooks
    "auto" is the hooked model's pass itself."""
    from ..helpers import assert_close_model

    hooked, stock = _forms(tiny_model)[form]
    with hooked():
        want = final_logprobs(tiny_model, prompts, batch_size=len(prompts))
        want_prefixed = final_logprobs(tiny_model, prompts, batch_size=3, response_prefix=MMLU_PREFIX)
        if form != "none":  # TL hooks are active: "auto" runs the hooked model
            assert torch.equal(final_logprobs(tiny_model, prompts, batch_size=len(prompts), engine="auto"), want)
        ids, mask = left_pad(encode(tiny_model.tokenizer, prompts), tiny_model.tokenizer.pad_token_id)
        with torch.no_grad():
            scale = 2 * float(tiny_model(ids, attention_mask=mask).abs().max())
    with stock():
        for bs in (1, 3, len(prompts)):
            got = final_logprobs(tiny_model, prompts, batch_size=bs, engine="auto")
            assert_close_model(got, want, tiny_model, scale=scale)
        got = final_logprobs(tiny_model, prompts, batch_size=3, response_prefix=MMLU_PREFIX, engine="auto")
        assert_close_model(got, want_prefixed, tiny_model, scale=scale)
    if form != "none":  # the intervention acts on the stock engine
        assert (got - final_logprobs(tiny_model, prompts, batch_size=3, response_prefix=MMLU_PREFIX)).abs().max() > 0.01


def test_final_logprobs_engine_names(tiny_model, prompts):
    with pytest.raises(ValueError, match="engine 'shrink'"):
        final_logprobs(tiny_model, prompts, engine="shrink")


def test_mmlu_letters_must_be_single_tokens(tiny_model):
    # the byte tokenizer splits " A" into " " + "A": every letter would share the first token
    with pytest.raises(ValueError, match="one token"):
        mmlu_predictions(tiny_model, load_dataset("mmlu", 2), leading_space=True)
    with pytest.raises(ValueError, match="predictions for"):
        mmlu_correct(["A"], load_dataset("mmlu", 2))


# --------------------------------------------------------------------------- McNemar
def test_mcnemar_hand_computed():
    a = [True] * 2 + [False] * 10 + [True] * 30 + [False] * 8  # b10 = 2, b01 = 10, 38 concordant
    b = [False] * 2 + [True] * 10 + [True] * 30 + [False] * 8
    b01, b10, p = mcnemar(a, b)
    # 2 · P(X ≤ 2 | n = 12, 1/2) = 2 · (1 + 12 + 66) / 4096
    assert (b01, b10) == (10, 2) and p == 158 / 4096
    assert mcnemar(b, a) == (2, 10, p)  # symmetric
    assert mcnemar([1, 0, 1], [1, 0, 1]) == (0, 0, 1.0)  # no discordant pair
    assert mcnemar([True] * 5 + [False] * 5, [False] * 5 + [True] * 5)[2] == 1.0  # balanced: capped at 1


@pytest.mark.parametrize("b01,b10", [(0, 1), (0, 6), (3, 9), (7, 8), (20, 5), (40, 61)])
def test_mcnemar_equals_the_minlike_binomial_p(b01, b10):
    """Against the general exact two-sided definition: the mass of outcomes no likelier than the one seen."""
    n = b01 + b10
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    want = min(1.0, sum(q for q in pmf if q <= pmf[b01] * (1 + 1e-12)))
    got = mcnemar([False] * b01 + [True] * b10, [True] * b01 + [False] * b10)[2]
    # both exact sums of binomial terms in float64; only the rounding of the divisions differs (~1e-16)
    assert got == pytest.approx(want, rel=1e-12)


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        mcnemar([True], [True, False])
    with pytest.raises(ValueError, match="booleans"):
        mcnemar(["A"], ["B"])


# --------------------------------------------------------------------------- intervals
def test_wilson_interval():
    # 0/100: [0, z²/(n + z²)] with z = 1.959964
    z2 = 1.959963984540054**2
    # closed forms in float64: a few roundings of O(1) values, ~1e-16 each (hence abs=1e-12 below)
    assert proportion_ci(0, 100) == pytest.approx([0.0, z2 / (100 + z2)], abs=1e-12)
    lo, hi = proportion_ci(14, 100)  # by hand: centre 0.159207 / 1.038415, half 0.0706687 / 1.038415
    assert (round(lo, 4), round(hi, 4)) == (0.0853, 0.2214)
    # the Wilson bounds are the roots of the score test's boundary (p̂ − p)² = z² p (1 − p) / n; a float64
    # root (a square root of a difference) is good to ~1e-15 relative, its square to twice that: rel=1e-9
    for bound in (lo, hi):
        assert (0.14 - bound) ** 2 == pytest.approx(z2 * bound * (1 - bound) / 100, rel=1e-9)
    lo2, hi2 = proportion_ci(86, 100)  # mirror image
    assert lo2 == pytest.approx(1 - hi, abs=1e-12) and hi2 == pytest.approx(1 - lo, abs=1e-12)
    assert proportion_ci(14, 100, 0.99)[0] < lo  # wider at a higher level
    for bad in [(3, 2), (-1, 5), (1, 0)]:
        with pytest.raises(ValueError):
            proportion_ci(*bad)


def test_label_rates():
    rates = label_rates(["comply"] * 56 + ["evade"] * 30 + ["refuse"] * 14)
    assert [rates[c]["count"] for c in ("comply", "evade", "refuse")] == [56, 30, 14]
    assert rates["refuse"]["rate"] == 0.14 and rates["refuse"]["ci"] == proportion_ci(14, 100)
    with pytest.raises(ValueError, match="unknown labels"):
        label_rates(["comply", "maybe"])


# --------------------------------------------------------------------------- perplexity
def reference_nll(hf, tokenizer, prompt: str, completion: str) -> torch.Tensor:
    """Per-token NLL from one unpadded plain-HF forward over prompt + completion."""
    x = format_prompt(tokenizer, prompt)
    y = tokenizer(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = hf(torch.tensor([x + y])).logits[0].float().log_softmax(-1)
    return -lp[len(x) - 1 : -1].gather(-1, torch.tensor(y)[:, None]).squeeze(-1)


def test_perplexity_matches_a_direct_per_token_computation(tiny_dir, tiny_model, prompts):
    hf = hf_reference(tiny_dir)
    tok = tiny_model.tokenizer
    want = [reference_nll(hf, tok, p, c) if c else torch.empty(0) for p, c in zip(prompts, COMPLETIONS)]
    # scale of the logits, for the rounding bound
    with torch.no_grad():
        scale = hf(torch.tensor([format_prompt(tok, prompts[5]) + tok(COMPLETIONS[5])["input_ids"]])).logits
    # |Δ log p_t| ≤ |Δz_y| + max|Δz| ≤ 2·max|Δlogit|, and max|Δlogit| ≤ logit_tol (fp32 accumulation order;
    # padding, the shared-prefix cache and another engine only reorder sums). The mean NLL inherits the bound.
    tol = 2 * logit_tol(tiny_model, scale)
    for batch_size in (1, 3, 8):
        got = completion_nll(tiny_model, prompts, COMPLETIONS, batch_size)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, atol=tol, rtol=0)
        ppl = perplexity(tiny_model, prompts, COMPLETIONS, batch_size)
        assert math.isnan(ppl[2])
        for p, w in zip(ppl, want):
            if w.numel():
                assert abs(math.log(p) - float(w.mean())) <= tol
    # a random model is far from certain: perplexities well above 1, and they differ across completions
    finite = [p for p in ppl if not math.isnan(p)]
    assert min(finite) > 2 and len({round(p, 3) for p in finite}) == len(finite)


def test_perplexity_rejects_mismatched_input(tiny_model, prompts):
    with pytest.raises(ValueError, match="one completion per prompt"):
        perplexity(tiny_model, prompts, COMPLETIONS[:2])
    with pytest.raises(ValueError, match="one completion per prompt"):
        perplexity(tiny_model, prompts[:1], "a single string")


# --------------------------------------------------------------------------- matched quality
def test_matched_quality_uses_only_prompts_both_answer():
    loop = "go on " * 10  # repeated 4-grams: quality well below 1
    a = [
        {"prompt_id": "p1", "completion": "I'm sorry, I can't.", "label": "refuse"},
        {"prompt_id": "p2", "completion": "Here is a clear and short answer for you.", "label": "comply"},
        {"prompt_id": "p3", "completion": "Step one: gather the tools you need first.", "label": "comply"},
    ]
    b = [
        {"prompt_id": "p3", "completion": loop, "label": "comply"},
        {"prompt_id": "p1", "completion": "Sure, here is how it is done in detail.", "label": "comply"},
        {"prompt_id": "p2", "completion": "I cannot help.", "label": "refuse"},
        {"prompt_id": "p4", "completion": "Only B has this prompt.", "label": "comply"},
    ]
    out = matched_quality(a, b, lambda r: r["label"] != "refuse")
    assert (out["n"], out["n_a"], out["n_b"]) == (1, 3, 4)  # only p3 is answered by both
    assert out["quality_a"] == quality(a[2]["completion"]) == 1.0
    assert out["quality_b"] == quality(loop) < 0.5
    assert out["diff"] == quality(loop) - 1.0
    none = matched_quality(a, b, lambda r: False)
    assert none["n"] == 0 and math.isnan(none["quality_a"])
    with pytest.raises(ValueError, match="twice"):
        matched_quality(a + a[:1], b, lambda r: True)
    with pytest.raises(ValueError, match="prompt_id"):
        matched_quality([{"completion": "x"}], b, lambda r: True)
