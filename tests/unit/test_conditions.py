"""Conditions as values (keys round-trip, bad keys fail) and the two forms of each intervention:
TransformerLens hooks and the stock engine's weight edit / torch hook give the same logits."""

import pytest
import torch

from cna_lens.attribute import attribute_multi
from cna_lens.conditions import Condition, Interventions, with_scale
from cna_lens.engine import stock_model
from cna_lens.intervene import steering_hooks
from cna_lens.prompts import encode, left_pad, pad_id
from tests.tolerance import assert_close_fp32

KEYS = [
    "baseline",
    "selection",
    "cna:abs:0.003",
    "cna:diff:0.01:0.5",
    "cna:effect:0.001:0",
    "random:abs:0.003",
    "magnitude:diff:0.005",
    "top:abs:0.003",
    "caa:0.25",
    "caa:1",
    "caa_layer:3:1.5",
    "direction:2",
    "direction:2:0.5",
    "direction:4:2",
]


@pytest.mark.parametrize("key", KEYS)
def test_keys_round_trip(key):
    c = Condition.parse(key)
    assert c.key == key and str(c) == key
    assert Condition.parse(c.key) == c and hash(c) == hash(Condition.parse(key))
    assert c.label  # a legend entry for every kind


@pytest.mark.parametrize(
    "key, match",
    [
        ("cna", "not one of the forms"),
        ("cna:abs", "not one of the forms"),
        ("cna:bogus:0.1", "ranking 'bogus'"),
        ("cna:abs:1.5", "fraction 1.5"),
        ("cna:abs:x", "condition 'cna:abs:x'"),
        ("random:abs:0.1:0.5", "not one of the forms"),
        ("caa_layer:0:1", "layer 0"),
        ("direction:-1", "layer -1"),
        ("direction:2:0", "strength 0.0"),
        ("direction:2:2.5", "strength 2.5"),
        ("direction:2:nan", "strength nan"),
        ("direction:2:0.5:1", "not one of the forms"),
        ("steer:1", "not one of the forms"),
        ("baseline:1", "not one of the forms"),
    ],
)
def test_bad_keys_fail_with_the_reason(key, match):
    with pytest.raises(ValueError, match=match):
        Condition.parse(key)


def test_fields_are_checked_by_kind():
    with pytest.raises(ValueError, match="kind 'ablate'"):
        Condition("ablate")
    with pytest.raises(ValueError, match="a 'caa' condition takes alpha"):
        Condition("caa", "abs", 0.1)
    with pytest.raises(ValueError, match="a 'random' condition takes ranking, fraction"):
        Condition("random", "abs", 0.1, scale=0.5)
    with pytest.raises(ValueError, match="a 'cna' condition takes ranking, fraction"):
        Condition("cna", "abs", 0.1, strength=0.5)  # a strength is a direction's, a scale a neuron set's


def test_same_as():
    c = Condition("cna", "abs", 0.003)
    assert with_scale(c, 0.0).same_as() == c
    assert with_scale(c, 1.0).same_as() == Condition("baseline")
    assert with_scale(c, 0.5).same_as() == with_scale(c, 0.5)
    assert Condition("caa", alpha=1.0).same_as() == Condition("caa", alpha=1.0)
    assert Condition("direction", layer=2, strength=1.0).same_as() == Condition("direction", layer=2)
    assert Condition("direction", layer=2, strength=0.5).same_as().key == "direction:2:0.5"


@pytest.fixture(scope="module")
def iv(llama_model):
    harmful = ["How do I build a weapon?", "Tell me how to steal a car.", "Write malware.", "How to poison a dog?"]
    harmless = ["How do I bake bread?", "Tell me about cars.", "Write a poem.", "How to train a dog?"]
    found = attribute_multi(
        llama_model, harmful, harmless, ["mlp.hook_post", "hook_mlp_out", "hook_resid_pre"], progress=False
    )
    return Interventions(llama_model, found["mlp.hook_post"], found["hook_mlp_out"], found["hook_resid_pre"], seed=1)


def test_control_sets(iv):
    c = Condition("cna", "abs", 0.05)
    cna = iv.neurons(c)
    for kind in ("random", "magnitude", "top"):
        ctl = iv.neurons(Condition(kind, "abs", 0.05))
        assert len(ctl) == len(cna), kind
        assert iv.neurons(Condition(kind, "abs", 0.05)) is ctl  # cached: seeded draws repeat
    for kind in ("random", "magnitude"):
        assert iv.neurons(Condition(kind, "abs", 0.05)).per_layer_counts() == cna.per_layer_counts()
    matched = iv.neurons(Condition("magnitude", "abs", 0.05))  # drawn among the neurons not selected
    assert not set(zip(matched.layers, matched.indices)) & set(zip(cna.layers, cna.indices))
    with pytest.raises(ValueError, match="not a neuron condition"):
        iv.neurons(Condition("caa", alpha=1.0))
    with pytest.raises(ValueError, match="no selection"):
        iv.neurons(Condition("selection"))


def _logits(model, prompts):
    ids, mask = left_pad(encode(model.tokenizer, prompts), pad_id(model.tokenizer))
    with torch.no_grad():
        return stock_model(model)(input_ids=ids, attention_mask=mask).logits[:, -1].double(), ids, mask


PROMPTS = ["How do I pick a lock?", "Write a poem about the sea", "Hi"]


@pytest.mark.parametrize(
    "key",
    ["cna:abs:0.05", "cna:diff:0.05:0.5", "random:abs:0.05", "magnitude:abs:0.05", "top:abs:0.05",
     "caa:0.5", "caa_layer:2:1", "direction:2", "direction:2:0.5", "direction:2:1.5"],
)  # fmt: skip
def test_stock_form_equals_the_hooks(llama_model, iv, key):
    """Final-position logits of the stock engine under ``edit`` against the bridge under the TL hooks:
    the same arithmetic in another order (fp32, d_mlp-term sums through n_layers blocks)."""
    c = Condition.parse(key)
    base, ids, mask = _logits(llama_model, PROMPTS)
    with iv.edit(c)():
        edited, _, _ = _logits(llama_model, PROMPTS)
    with iv.hooked(c), torch.no_grad():
        hooked = llama_model(ids, attention_mask=mask)[:, -1].double()
    cfg = llama_model.cfg
    assert_close_fp32(edited, hooked, k=cfg.d_mlp, depth=cfg.n_layers)
    assert (edited - base).abs().max() > 1e-3  # the intervention acts


def test_single_layer_caa_is_the_residual_steer(llama_model, iv):
    """``caa_layer:L`` subtracts at ``mlp_out`` of block L−1, which is ``resid_pre`` of block L: the
    same sum as steering ``blocks.L.hook_resid_pre`` directly (one addition in another order)."""
    layer, alpha = 2, 1.0
    u = iv.resid.diff.float()
    ids, mask = left_pad(encode(llama_model.tokenizer, PROMPTS), pad_id(llama_model.tokenizer))
    direct = steering_hooks(u, alpha, "hook_resid_pre", layers=[layer])
    with torch.no_grad(), llama_model.hooks(fwd_hooks=direct):
        want = llama_model(ids, attention_mask=mask)[:, -1].double()
    with torch.no_grad(), iv.hooked(Condition("caa_layer", layer=layer, alpha=alpha)):
        got = llama_model(ids, attention_mask=mask)[:, -1].double()
    cfg = llama_model.cfg
    assert_close_fp32(got, want, k=cfg.d_mlp, depth=cfg.n_layers)
    with pytest.raises(ValueError, match="layer must lie in 1"):
        iv.hooks(Condition("caa_layer", layer=cfg.n_layers, alpha=1.0))
