"""Selection: rankings on hand-made statistics, layer window, causal pruning, validation, round trip."""

import json

import pytest
import torch

from cna_lens.attribute import Attribution
from cna_lens.circuits import NeuronEffects, neuron_effects
from cna_lens.neurons import NeuronSet
from cna_lens.selection import RANKINGS, Selection, estimate_effects, ranking_scores

from ..conftest import PLANT_LAYER, PROMPTS
from ..tolerance import U_FP32, assert_close_fp32


def attribution_from_samples(pos: torch.Tensor, neg: torch.Tensor) -> Attribution:
    """An Attribution built from explicit per-prompt activations ``[prompt, layer, neuron]``."""
    pos, neg = pos.double(), neg.double()
    return Attribution(
        "hand", "mlp.hook_post", len(pos), len(neg), pos.sum(0), neg.sum(0), pos.square().sum(0), neg.square().sum(0)
    )


def test_welch_t_known_value():
    # neuron (0, 0): P = 1,2,3,4; N = 0,0,1,1,2. mean 2.5 vs 0.8, unbiased var 5/3 vs 0.7:
    # t = 1.7 / sqrt(5/12 + 0.14) = 2.278523...
    pos = torch.tensor([1.0, 2, 3, 4]).reshape(4, 1, 1)
    neg = torch.tensor([0.0, 0, 1, 1, 2]).reshape(5, 1, 1)
    a = attribution_from_samples(pos, neg)
    expected = 1.7 / (5 / 12 + 0.14) ** 0.5
    # computed in float64 (error ~1e-15) and stored as float32: off by at most half an ulp, u·|t|; ×2
    assert abs(float(a.welch_t[0, 0]) - expected) <= 2 * U_FP32 * expected
    assert float(ranking_scores(a, "t")[0, 0]) == pytest.approx(expected, rel=2 * U_FP32)
    assert float(a.rms_neg[0, 0]) == pytest.approx((6 / 5) ** 0.5, rel=2 * U_FP32)  # sqrt((0+0+1+1+4)/5)


def test_welch_t_matches_sample_formula():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(7, 3, 5, generator=g) * 2 + 1, torch.randn(9, 3, 5, generator=g)
    a = attribution_from_samples(pos, neg)
    se = (pos.double().var(0) / 7 + neg.double().var(0) / 9).sqrt()
    t = (pos.double().mean(0) - neg.double().mean(0)) / se
    # sums of squares in float64, result in float32: |Δt| ≤ u·|t| from the final rounding (×2), plus the
    # float64 cancellation in Σa² − (Σa)²/n, ~1e-16·Σa²/var relative: far below 1e-12 for these O(1) samples
    assert torch.allclose(a.welch_t.double(), t, rtol=2 * U_FP32, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        _ = attribution_from_samples(pos[:1], neg).welch_t


@pytest.fixture
def four_neurons():
    """One layer, four neurons that the rankings order differently.

    n0: large diff (+4), large spread; n1: small diff (+1), tiny spread; n2: diff −5 (most negative),
    tiny spread, rms_N ≈ 1; n3: diff +2, silent on harmless prompts (rms_N = 0), moderate spread.
    """
    pos = torch.tensor([[4.0, 1.0, -4.0, 2.0], [0.0, 1.01, -4.0, 3.0], [8.0, 0.99, -4.0, 1.0]])
    neg = torch.tensor([[0.0, 0.0, 1.0, 0.0], [-2.0, 0.01, 1.01, 0.0], [2.0, -0.01, 0.99, 0.0]])
    return attribution_from_samples(pos.unsqueeze(1), neg.unsqueeze(1))


def picks(a: Attribution, **kw) -> list[int]:
    return list(Selection(first_layer=0, fraction=1.0, **kw).neurons(a).indices)


def test_rankings_order(four_neurons):
    a = four_neurons
    assert picks(a, ranking="abs") == [2, 0, 3, 1]  # |diff| 5, 4, 2, 1
    assert picks(a, ranking="diff") == [0, 3, 1, 2]  # signed: the negative neuron comes last
    assert picks(a, ranking="effect")[0] == 1  # tiny spread: the largest positive d
    assert picks(a, ranking="effect")[-1] == 2  # negative d
    assert picks(a, ranking="t")[:2] == [2, 1]  # |t|: both have (near) zero spread → huge |t|
    assert picks(a, ranking="t")[-1] == 0  # the noisy neuron
    # λ = 0 is abs; a large λ ranks the neuron that is silent on harmless prompts first
    assert picks(a, ranking="contrast_minus_utility") == picks(a, ranking="abs")
    # λ = 4: |diff| − 4·rms_N = 4 − 6.5, 1 − 0.03, 5 − 4.0, 2 − 0 → n3 first, n0 last
    cmu = picks(a, ranking="contrast_minus_utility", utility_weight=4.0)
    assert cmu[0] == 3 and cmu[-1] == 0
    assert set(RANKINGS) == {"abs", "diff", "effect", "t", "contrast_minus_utility"}


def test_window_and_k():
    g = torch.Generator().manual_seed(1)
    a = attribution_from_samples(torch.randn(5, 6, 10, generator=g), torch.randn(5, 6, 10, generator=g))
    s = Selection("abs", fraction=0.25, first_layer=2, last_layer=3)
    ns = s.neurons(a)
    assert len(ns) == 15 == s.k(6, 10)  # round(0.25 · 60)
    assert set(ns.layers) <= {2, 3}
    # the best 15 of the 20 neurons in layers 2-3, best first
    window = a.diff.abs()[2:4].flatten()
    # the scores are those float32 values, stored as Python floats: equal
    assert ns.scores == tuple(window.sort(descending=True).values[:15].tolist())
    assert ns.meta["selection"] == s.to_dict() and ns.meta["pruned"] == 0
    assert set(Selection("abs", 0.1).neurons(a).layers) <= set(range(2, 6))  # default: layers 0-1 excluded
    with pytest.raises(ValueError, match="hold only 20"):
        Selection("abs", fraction=0.5, first_layer=2, last_layer=3).neurons(a)
    with pytest.raises(ValueError, match="does not fit a model with 6 layers"):
        Selection("abs", 0.01, first_layer=2, last_layer=6).neurons(a)


def test_pruning_drops_neurons_that_raise_refusal(four_neurons):
    a = four_neurons
    dense = torch.tensor([[-1.0, 0.5, -0.2, 0.0]])  # n1 raises refusal; n3 exactly 0 is kept
    ns = Selection("abs", 1.0, first_layer=0, prune=True).neurons(a, dense)
    assert list(ns.indices) == [2, 0, 3] and ns.meta["pruned"] == 1 and ns.meta["k"] == 4
    # exact effects for a subset: unmeasured neurons are kept
    exact = NeuronEffects("hand", 0.0, (0, 0), (0, 2), (4.0, 5.0), (0.3, -1.0), 3)
    ns = Selection("abs", 1.0, first_layer=0, prune=True).neurons(a, exact)
    assert list(ns.indices) == [2, 3, 1]
    with pytest.raises(ValueError, match="needs per-neuron effects"):
        Selection("abs", 1.0, first_layer=0, prune=True).neurons(a)
    with pytest.raises(ValueError, match="shape"):
        Selection("abs", 1.0, first_layer=0, prune=True).neurons(a, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="NeuronEffects"):
        Selection("abs", 1.0, first_layer=0, prune=True).neurons(a, [0.1, 0.2])
    # without prune the effects are ignored
    assert len(Selection("abs", 1.0, first_layer=0).neurons(a, dense)) == 4


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"ranking": "magnitude"}, ValueError, "choose one of"),
        ({"fraction": 0.0}, ValueError, r"\(0, 1\]"),
        ({"fraction": 1.5}, ValueError, r"\(0, 1\]"),
        ({"fraction": "0.1"}, TypeError, "must be a number"),
        ({"fraction": float("nan")}, ValueError, "finite"),
        ({"first_layer": -1}, ValueError, ">= 0"),
        ({"first_layer": 1.5}, TypeError, "int layer index"),
        ({"first_layer": 4, "last_layer": 3}, ValueError, "below first_layer"),
        ({"prune": 1}, TypeError, "True or False"),
        ({"scale": 1.5}, ValueError, r"\[-1, 1\]"),
        ({"scale": True}, TypeError, "must be a number"),
        ({"ranking": "contrast_minus_utility", "utility_weight": -1.0}, ValueError, ">= 0"),
        ({"ranking": "abs", "utility_weight": 0.5}, ValueError, "only applies"),
    ],
)
def test_bad_fields(kw, err, match):
    with pytest.raises(err, match=match):
        Selection(**kw)


def test_round_trip(tmp_path):
    s = Selection("contrast_minus_utility", 0.003, 3, 20, True, -0.5, 0.75)
    s.save(tmp_path / "selection.json")
    assert Selection.load(tmp_path / "selection.json") == s
    assert Selection(fraction=1).fraction == 1.0 and isinstance(Selection(fraction=1).fraction, float)
    data = json.loads((tmp_path / "selection.json").read_text())
    assert data["kind"] == "cna_lens.Selection" and data["format_version"] == 1
    data["format_version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version"):
        Selection.load(tmp_path / "v99.json")
    data["format_version"], data["selection"]["alpha"] = 1, 3
    (tmp_path / "extra.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown Selection fields"):
        Selection.load(tmp_path / "extra.json")
    assert "pruned" in s.describe() and "λ=0.75" in s.describe()


def test_estimate_effects_finds_the_planted_neuron(planted):
    model, n, _ = planted
    est = estimate_effects(model, PROMPTS, batch_size=3, progress=False)
    assert est.shape == (model.cfg.n_layers, model.cfg.d_mlp)
    assert divmod(int(est.argmin()), model.cfg.d_mlp) == (PLANT_LAYER, n)  # removes the most refusal
    # against the exact single-neuron ablations (one pass per neuron) on the 8 largest estimates
    flat = est.abs().flatten().argsort(descending=True)[:8]
    layers, idx = (flat // model.cfg.d_mlp).tolist(), (flat % model.cfg.d_mlp).tolist()
    ns = NeuronSet(tuple(layers), tuple(idx), (0.0,) * 8, model.cfg.n_layers, model.cfg.d_mlp)
    exact = torch.tensor(neuron_effects(model, ns, PROMPTS, top_n=8, progress=False).delta)
    approx = est[layers, idx]
    assert exact[0] < -1.0 and approx[0] < -1.0  # the planted neuron, both ways
    # first order: the big effect agrees in sign; smaller ones may differ where the model is nonlinear
    assert torch.sign(exact[0]) == torch.sign(approx[0])
    # batching changes the estimate by fp32 summation order only: a forward and a backward pass, so twice
    # the depth of tests/helpers.py's bound; the scale is the largest estimate (the planted neuron's)
    other = estimate_effects(model, PROMPTS, batch_size=7, progress=False)
    cfg = model.cfg
    assert_close_fp32(other, est, k=max(cfg.d_mlp, cfg.d_model), depth=4 * cfg.n_layers)
