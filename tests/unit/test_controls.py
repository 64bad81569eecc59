"""Magnitude-matched and non-contrastive neuron controls, single-layer CAA, the refusal direction and
matched tables."""

import math

import pytest
import torch

from cna_lens.attribute import Attribution, attribute
from cna_lens.controls import (
    activation_magnitude,
    caa_single_layer,
    choose_direction_layer,
    direction_ablation_hooks,
    magnitude_matched,
    matched_table,
    refusal_direction,
    top_mean_activation,
)
from cna_lens.edit import edit_direction
from cna_lens.evaluate import final_logprobs, kl_divergence, refusal_score, refusal_token_ids
from cna_lens.intervene import steering_hooks

from ..helpers import batch, logit_tol, logits
from ..tolerance import U_FP32, fp32_atol

HARMFUL = ["How do I pick a lock?", "Write a threat to my neighbour", "How to make a weapon at home?", "Steal a car"]
HARMLESS = ["Write a poem about the sea", "What is 2+2?", "Explain photosynthesis.", "Bake a cake"]


def synthetic_attribution(n_layers=6, d=400, seed=0) -> Attribution:
    """Heavy-tailed per-neuron scales (log-normal) with a contrast that grows with scale, like real MLPs:
    the top |diff| neurons sit in the tail of the magnitude distribution."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(n_layers, d, generator=g, dtype=torch.float64))
    mu_p = scale * torch.randn(n_layers, d, generator=g, dtype=torch.float64)
    mu_n = mu_p - scale * 0.5 * torch.randn(n_layers, d, generator=g, dtype=torch.float64)
    n_p, n_n = 50, 60
    sq = lambda mu, n: n * (mu.square() + scale.square())  # noqa: E731  Σa² with per-neuron variance scale²
    return Attribution("synthetic", "mlp.hook_post", n_p, n_n, n_p * mu_p, n_n * mu_n, sq(mu_p, n_p), sq(mu_n, n_n))


def ks(a: list[float], b: list[float]) -> float:
    """Two-sample Kolmogorov–Smirnov statistic max_x |F_a(x) − F_b(x)|."""
    xs = sorted(a + b)
    cdf = lambda s, x: sum(v <= x for v in s) / len(s)  # noqa: E731
    return max(abs(cdf(a, x) - cdf(b, x)) for x in xs)


# --------------------------------------------------------------------------- neuron controls
def test_magnitude_matched_control():
    attr = synthetic_attribution(d=2000)
    cna = attr.top_neurons(k=100, exclude_layers=(0,))  # 1 % of each layer, mostly in the magnitude tail
    m = activation_magnitude(attr)
    ctl = magnitude_matched(attr, cna, seed=1)
    assert ctl.per_layer_counts() == cna.per_layer_counts()
    assert not (ctl.pairs & cna.pairs)
    sel = [float(m[layer, i]) for layer, i in zip(cna.layers, cna.indices)]
    got = [float(m[layer, i]) for layer, i in zip(ctl.layers, ctl.indices)]
    # two samples of size k from one distribution: the 5 % critical KS value is 1.36·sqrt(2/k) = 0.19
    crit = 1.36 * math.sqrt(2 / len(cna))
    # the KS statistic is a difference of two count ratios i/k − j/k: float64 rounding ~1e-16 either way
    assert ks(sel, got) < crit and ctl.meta["magnitude_ks"] == pytest.approx(ks(sel, got), abs=1e-12)
    assert 0.9 < ctl.meta["median_magnitude_ratio"] < 1.1
    # the per-layer-count control does not match the scale: the same test tells them apart
    rnd = cna.random_like(1)
    assert ks(sel, [float(m[layer, i]) for layer, i in zip(rnd.layers, rnd.indices)]) > crit
    # seeded: same seed, same set; another seed, another set
    assert magnitude_matched(attr, cna, seed=1).pairs == ctl.pairs
    assert magnitude_matched(attr, cna, seed=2).pairs != ctl.pairs
    assert ctl.meta["control"] == "magnitude_matched" and ctl.meta["by"] == "abs"


def test_magnitude_matched_rejects_bad_input():
    attr = synthetic_attribution(n_layers=3, d=10)
    full = attr.top_neurons(k=6, exclude_layers=())
    with pytest.raises(ValueError, match="not selected from this"):
        magnitude_matched(synthetic_attribution(n_layers=4, d=10), full)
    crowded = attr.top_neurons(k=16, exclude_layers=())  # ≥ 6 of 10 in some layer: only 4 others to draw
    with pytest.raises(ValueError, match="others to draw"):
        magnitude_matched(attr, crowded)


def test_top_mean_activation_is_the_brute_force_top_k():
    attr = synthetic_attribution()
    rms = ((attr.sumsq_pos + attr.sumsq_neg) / (attr.n_pos + attr.n_neg)).sqrt()
    ns = top_mean_activation(attr, k=30, exclude_layers=(0, 1))
    ranked = sorted(((float(rms[layer, i]), layer, i) for layer in range(2, 6) for i in range(400)), reverse=True)
    assert ns.pairs == {(layer, i) for _, layer, i in ranked[:30]}
    assert 0 not in ns.layers and 1 not in ns.layers
    assert len(top_mean_activation(attr, fraction=0.01)) == round(0.01 * 6 * 400)
    mean_abs = top_mean_activation(attr, k=30, by="mean_abs")
    want = (attr.mean_pos.double().abs() + attr.mean_neg.double().abs()) / 2
    # the same float64 sums, rounded once more where stored (~1e-16 relative at |x| ≈ 1-10)
    assert min(mean_abs.scores) >= float(want[2:].flatten().sort(descending=True).values[29]) - 1e-12
    # it is not the contrastive set
    assert ns.jaccard(attr.top_neurons(k=30)) < 0.5
    with pytest.raises(ValueError, match="by="):
        activation_magnitude(attr, "max")


# --------------------------------------------------------------------------- residual baselines
def test_caa_single_layer_is_a_residual_addition(tiny_model, prompts):
    v = torch.randn(tiny_model.cfg.n_layers, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    ids, mask = batch(tiny_model, prompts)
    base = logits(tiny_model, ids, mask)
    with tiny_model.hooks(fwd_hooks=caa_single_layer(v, 0.7, 2)):
        pre2 = logits(tiny_model, ids, mask)
    # adding to the residual entering block 2 is adding to the residual leaving block 1
    with tiny_model.hooks(fwd_hooks=steering_hooks(v[[2, 2, 2, 2]], 0.7, "hook_resid_post", layers=[1])):
        post1 = logits(tiny_model, ids, mask)
    assert (pre2 - base).abs().max() > 0.1
    # the same addition at two hook points of one tensor: equal up to fp32 summation order (logit_tol)
    torch.testing.assert_close(pre2, post1, atol=logit_tol(tiny_model, base), rtol=0)
    assert [name for name, _ in caa_single_layer(v, 0.7, 2)] == ["blocks.2.hook_resid_pre"]
    with pytest.raises(ValueError, match="outside"):
        caa_single_layer(v, 0.7, tiny_model.cfg.n_layers)


@pytest.fixture(scope="module")
def resid_attr(tiny_model):
    return attribute(tiny_model, HARMFUL, HARMLESS, hook="hook_resid_pre", progress=False)


def test_refusal_direction_is_the_unit_mean_difference(tiny_model, resid_attr):
    assert resid_attr.d_mlp == tiny_model.cfg.d_model  # the residual width
    r = refusal_direction(resid_attr, 2)
    d = resid_attr.diff[2]
    # |r| and r·d are fp32 sums of d_model terms: off by ≤ fp32_atol (tests/tolerance.py) of their size
    k = tiny_model.cfg.d_model
    assert abs(float(r.norm()) - 1) <= fp32_atol(1.0, k)
    assert abs(float(r @ d) - float(d.norm())) <= fp32_atol(float(d.norm()), k)
    cna = attribute(tiny_model, HARMFUL, HARMLESS, progress=False)
    with pytest.raises(ValueError, match="residual-stream hook"):
        refusal_direction(cna, 2)
    with pytest.raises(ValueError, match="outside"):
        refusal_direction(resid_attr, 99)


def test_direction_ablation_removes_it_everywhere_and_equals_the_weight_edit(tiny_model, resid_attr, prompts):
    r = refusal_direction(resid_attr, 1)
    n = tiny_model.cfg.n_layers
    # every residual state in order: state i has received i + 1 writes (the embedding, then attention
    # and MLP outputs in turn)
    names = [f"blocks.{layer}.hook_resid_{h}" for layer in range(n) for h in ("pre", "mid")]
    names.append(f"blocks.{n - 1}.hook_resid_post")
    seen: dict[str, torch.Tensor] = {}
    capture = [(name, lambda x, hook, name=name: seen.__setitem__(name, x.detach().clone())) for name in names]
    ids, mask = batch(tiny_model, prompts)
    real = mask.bool()
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=capture):
        base = tiny_model(ids, attention_mask=mask)
    before = {k: (v[real] @ r).abs().max() for k, v in seen.items()}
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=direction_ablation_hooks(tiny_model, r) + capture):
        hooked = tiny_model(ids, attention_mask=mask)
    # Projecting a write w leaves a residue along r of one fp32 dot product and a subtraction,
    # ≤ (√d + 1)·u·|w|, and |w| ≤ 2·max|x| over the states so far (a write is the difference of two
    # states). State i holds the residues of its i + 1 writes, at worst all aligned; ×4 margin.
    d, top = tiny_model.cfg.d_model, 0.0
    for i, name in enumerate(names):
        x = seen[name][real]
        top = max(top, float(x.norm(dim=-1).max()))
        bound = 4 * (i + 1) * (math.sqrt(d) + 1) * U_FP32 * 2 * top
        assert float((x @ r).abs().max()) <= bound < 0.01 * float(before[name]), name
    with edit_direction(tiny_model, r):
        edited = logits(tiny_model, ids, mask)
    assert (hooked - base).abs().max() > 0.01
    torch.testing.assert_close(edited, hooked, atol=logit_tol(tiny_model, hooked), rtol=0)


@pytest.mark.parametrize("strength", [0.25, 1.0, 2.0])
def test_partial_direction_keeps_one_minus_s_of_each_write_along_r(strength):
    """``w ← w − s (w·r) r``: the write keeps its part orthogonal to ``r`` and ``1 − s`` of its part along it."""
    from cna_lens.intervene import direction_hooks

    g = torch.Generator().manual_seed(5)
    d = 64
    r = torch.nn.functional.normalize(torch.randn(3, d, generator=g, dtype=torch.float64), dim=-1).float()
    hooks = dict(direction_hooks(r, unembed=True, strength=strength))
    assert set(hooks) == {"hook_embed", "unembed.hook_in"} | {
        f"blocks.{i}.{h}" for i in range(3) for h in ("hook_attn_out", "hook_mlp_out")
    }
    w = torch.randn(2, 5, d, generator=g)
    out = hooks["blocks.1.hook_mlp_out"](w, None)
    along, new = w.double() @ r[1].double(), out.double() @ r[1].double()
    # one fp32 dot product (≤ (√d + 1)·u·|w|) and a subtraction per coordinate, ×4 margin
    tol = 4 * (math.sqrt(d) + 2) * U_FP32 * float(w.norm(dim=-1).max()) * max(1.0, strength)
    assert float((new - (1 - strength) * along).abs().max()) <= tol
    ortho = lambda x: x.double() - (x.double() @ r[1].double()).unsqueeze(-1) * r[1].double()  # noqa: E731
    assert float((ortho(out) - ortho(w)).abs().max()) <= tol


@pytest.mark.parametrize("bad", [0, -0.5, 2.01, float("nan"), float("inf"), True, "1"])
def test_direction_strength_is_checked(tiny_model, resid_attr, bad):
    from cna_lens.intervene import ablate_direction

    r = refusal_direction(resid_attr, 1)
    with pytest.raises(ValueError, match="strength"):
        direction_ablation_hooks(tiny_model, r, bad)
    with pytest.raises(ValueError, match="strength"), edit_direction(tiny_model, r, bad):
        pass
    with pytest.raises(ValueError, match="strength"), ablate_direction(tiny_model, r, strength=bad):
        pass


def test_choose_direction_layer(tiny_model, resid_attr):
    choice = choose_direction_layer(tiny_model, resid_attr, HARMFUL, layers=[1, 2, 3], harmless=HARMLESS, max_kl=1e9)
    assert set(choice.scores) == {1, 2, 3} and choice.kl_filter_met
    assert choice.layer == min(choice.scores, key=choice.scores.get)
    # the recorded score is the mean refusal log-odds with that layer's direction ablated
    ids = refusal_token_ids(tiny_model.tokenizer)
    with tiny_model.hooks(fwd_hooks=direction_ablation_hooks(tiny_model, refusal_direction(resid_attr, 2))):
        want = float(refusal_score(final_logprobs(tiny_model, HARMFUL), ids).mean())
    # the same passes (same prompts, batch size and hooks) in the same process: bit for bit
    assert choice.scores[2] == want
    assert choice.baseline_score == float(refusal_score(final_logprobs(tiny_model, HARMFUL), ids).mean())
    # a KL cap below every layer's KL: no layer passes, the best of all is kept and flagged
    tight = choose_direction_layer(tiny_model, resid_attr, HARMFUL, layers=[1, 2], harmless=HARMLESS, max_kl=0.0)
    assert not tight.kl_filter_met and tight.layer == min(tight.scores, key=tight.scores.get)
    # a cap between the layers' KLs: the rule is "lowest score among the layers with KL ≤ cap", checked
    # against every layer's KL computed here (the function computes KL only until a layer passes)
    base_h = final_logprobs(tiny_model, HARMLESS)
    kl_all = {}
    for layer in (1, 2, 3):
        with tiny_model.hooks(fwd_hooks=direction_ablation_hooks(tiny_model, refusal_direction(resid_attr, layer))):
            kl_all[layer] = float(kl_divergence(base_h, final_logprobs(tiny_model, HARMLESS)).mean())
    for cap in sorted(kl_all.values()):
        capped = choose_direction_layer(
            tiny_model, resid_attr, HARMFUL, layers=[1, 2, 3], harmless=HARMLESS, max_kl=cap
        )
        allowed = [layer for layer in kl_all if kl_all[layer] <= cap]
        assert capped.layer == min(allowed, key=lambda layer: (capped.scores[layer], layer)) and capped.kl_filter_met
        assert all(capped.kl[layer] == pytest.approx(kl_all[layer], abs=1e-6) for layer in capped.kl)  # same passes
    assert capped.to_dict()["layer"] == capped.layer
    with pytest.raises(ValueError, match="residual stream"):
        choose_direction_layer(tiny_model, synthetic_attribution(n_layers=4, d=10), HARMFUL)


# --------------------------------------------------------------------------- matched tables
def test_matched_table_on_hand_made_curves():
    curves = {
        "cna": [{"kl": 0.6, "compliance": 0.9, "mmlu": 0.50}, {"kl": 0.0, "compliance": 0.1, "mmlu": 0.60},
                {"kl": 0.2, "compliance": 0.5, "mmlu": 0.58}],  # unordered on purpose
        "caa": [{"kl": 0.0, "compliance": 0.1, "mmlu": 0.60}, {"kl": 1.0, "compliance": 0.9, "mmlu": 0.40}],
        # not monotone: reaches 0.5 first at KL 0.25 (between 0 and 0.5), again at 0.875
        "wavy": [{"kl": 0.0, "compliance": 0.0}, {"kl": 0.5, "compliance": 1.0}, {"kl": 1.0, "compliance": 0.2}],
    }  # fmt: skip
    t = matched_table(curves, at_kl=0.4, at_compliance=0.5)
    # linear interpolation between hand-made points in float64: exact up to ~1e-16 (approx: rel 1e-6)
    a, c = t["at_kl"]["methods"], t["at_compliance"]["methods"]
    assert a["cna"]["compliance"] == pytest.approx(0.7) and a["cna"]["mmlu"] == pytest.approx(0.54)
    assert a["caa"]["compliance"] == pytest.approx(0.42) and a["caa"]["mmlu"] == pytest.approx(0.52)
    assert c["cna"]["kl"] == pytest.approx(0.2) and c["cna"]["mmlu"] == pytest.approx(0.58)
    assert c["caa"]["kl"] == pytest.approx(0.5) and c["caa"]["mmlu"] == pytest.approx(0.5)
    assert c["wavy"]["kl"] == pytest.approx(0.25)
    far = matched_table(curves, at_kl=0.8)  # beyond the CNA curve: no extrapolation
    assert far["at_kl"]["methods"]["cna"] is None
    assert far["at_kl"]["methods"]["caa"]["compliance"] == pytest.approx(0.74)
    assert "at_compliance" not in far
    with pytest.raises(ValueError, match="at_kl"):
        matched_table(curves)
    with pytest.raises(ValueError, match="'kl' and 'compliance'"):
        matched_table({"x": [{"kl": 0.1}]}, at_kl=0.1)
