"""Circuit maps on a tiny model with a planted refusal neuron; comparisons; figures."""

import pytest
import torch

import cna_lens
from cna_lens import plot
from cna_lens.circuits import LayerMap, NeuronEffects, layer_map, neuron_effects
from cna_lens.compare import Comparison, compare, cross_apply, layer_profile, spearman

from ..conftest import PLANT_LAYER, PROMPTS


def test_layer_map_finds_the_planted_layer(planted):
    model, n, _ = planted
    d = model.cfg.d_mlp
    others = [(layer, (n + 7 * layer + 3) % d) for layer in range(model.cfg.n_layers) if layer != PLANT_LAYER]
    pairs = [(PLANT_LAYER, n)] + others
    ns = cna_lens.NeuronSet(
        tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), (1.0,) * len(pairs), model.cfg.n_layers, d
    )
    lm = layer_map(model, ns, PROMPTS, progress=False)
    assert lm.baseline > 0  # the planted neuron makes the model "refuse"
    assert int(torch.nan_to_num(lm.delta, nan=0.0).argmin()) == PLANT_LAYER
    assert lm.delta[PLANT_LAYER] < -1.0
    others_max = max(abs(float(lm.delta[la])) for la, _ in others)
    assert abs(float(lm.delta[PLANT_LAYER])) > 5 * others_max
    # cumulative: ablating layers >= PLANT_LAYER includes it; layers > PLANT_LAYER do not
    assert lm.top_down[PLANT_LAYER] < -1.0 and abs(float(lm.top_down[PLANT_LAYER + 1])) < 0.5 * abs(
        float(lm.delta[PLANT_LAYER])
    )
    effects = neuron_effects(model, ns, PROMPTS, top_n=3, progress=False)
    assert effects.table()[0]["layer"] == PLANT_LAYER and effects.table()[0]["neuron"] == n


def test_maps_save_load(tmp_path, planted):
    model, n, _ = planted
    ns = cna_lens.NeuronSet((PLANT_LAYER, 3), (n, 0), (2.0, 1.0), model.cfg.n_layers, model.cfg.d_mlp)
    lm = layer_map(model, ns, PROMPTS[:2], cumulative=False, progress=False)
    lm.save(tmp_path / "lm")
    back = LayerMap.load(tmp_path / "lm")
    assert torch.equal(torch.nan_to_num(back.delta), torch.nan_to_num(lm.delta)) and back.counts == lm.counts
    ef = neuron_effects(model, ns, PROMPTS[:2], top_n=2, progress=False)
    ef.save(tmp_path / "ef.json")
    assert NeuronEffects.load(tmp_path / "ef.json") == ef


def _attr(seed, n_layers=4, d=30, name="m"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n_layers, d, generator=g, dtype=torch.float64)
    z = torch.zeros_like(s)
    return cna_lens.Attribution(name, "mlp.hook_post", 1, 1, s, z, s.square(), z)


def test_compare_identical_and_mismatched(tmp_path):
    a = _attr(0)
    c = compare(a, a, ks=(5, 20))
    # Spearman ρ of identical rankings is 1 up to float64 rounding of the ρ formula (~1e-16)
    assert all(r == pytest.approx(1.0) for r in c.rank_corr) and c.jaccard == {5: 1.0, 20: 1.0}
    assert all(row["rank_a"] == row["rank_b"] for row in c.table)
    c.save(tmp_path / "c.json")
    assert Comparison.load(tmp_path / "c.json") == c
    other = compare(a, _attr(1), ks=(5,))
    assert abs(sum(other.rank_corr) / 4) < 0.5 and other.jaccard[5] < 1
    with pytest.raises(ValueError, match="same architecture.*layer_profile"):
        compare(a, _attr(0, n_layers=5))
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 40])) == pytest.approx(1.0)


def test_cross_apply_and_profiles(planted, llama_model):
    model, n, _ = planted
    ns = cna_lens.NeuronSet((PLANT_LAYER,), (n,), (1.0,), model.cfg.n_layers, model.cfg.d_mlp)
    res = cross_apply(model, ns, PROMPTS[:3], max_new_tokens=2)
    assert res["delta"] < -1.0 and len(res["completions"]) == 3
    wrong = cna_lens.NeuronSet((0,), (0,), (1.0,), model.cfg.n_layers + 2, model.cfg.d_mlp)
    with pytest.raises(ValueError, match="same shape"):
        cross_apply(llama_model, wrong, PROMPTS[:1])
    prof = layer_profile(cna_lens.NeuronSet((3, 3, 1), (0, 1, 2), (1.0,) * 3, 4, 10))
    assert prof["share"] == [0, pytest.approx(1 / 3), 0, pytest.approx(2 / 3)] and prof["depth"][0] == 0.125


def test_figures_have_expected_traces(planted):
    a, b = _attr(0), _attr(1)
    ta, tb = a.top_neurons(k=5), b.top_neurons(k=5)
    assert len(plot.layer_histogram(ta).data) == 1 and list(plot.layer_histogram(ta).data[0].y) == ta.per_layer_counts()
    assert len(plot.attribution_heatmap(a, top_n=8).data[0].z) == 4
    assert [t.name for t in plot.neuron_scatter(a, b, ta, tb).data][1:] == ["top in m", "top in m"]
    lm = LayerMap(
        "m", 1.0, torch.tensor([float("nan"), -1.0, -0.5, 0.0]), torch.zeros(4), torch.zeros(4), (0, 1, 1, 1), 3
    )
    assert len(plot.circuit_map(lm).data) == 3
    assert len(plot.layer_profiles({"x": layer_profile(ta), "y": layer_profile(tb)}).data) == 2
