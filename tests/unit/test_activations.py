"""TL hook activations and interventions against an independent plain-HF path."""

import pytest
import torch

import cna_lens
from cna_lens.attribute import final_token_activations
from cna_lens.prompts import encode, left_pad

from ..conftest import hf_reference
from ..helpers import assert_close_model, hf_down_proj_inputs

# The bridge runs HF's own modules, so a padded batch and an unpadded HF pass differ only in the order
# of fp32 sums (batch shape, padding, mask): assert_close_model (tests/helpers.py) bounds that for any
# activation or logit, ~1e-5 of the largest value on these tiny models. A wrong position, a padding leak
# or a missed hook moves values by O(1). Where no sum is reordered the results are compared for equality.


def test_hook_post_equals_hf_down_proj_input(tiny_dir, tiny_model, prompts):
    hf = hf_reference(tiny_dir)
    seqs = encode(tiny_model.tokenizer, prompts)
    expected = hf_down_proj_inputs(hf, seqs).double()
    assert expected.abs().max() > 1e-3  # not trivially zero
    got = torch.zeros_like(expected)
    for batch, acts in final_token_activations(tiny_model, seqs, batch_size=3):
        got[batch] = acts
    assert_close_model(got, expected, tiny_model)


def test_hook_post_full_sequence_matches_hf(tiny_dir, tiny_model, prompts):
    """Every position, with left padding and mask, equals the unpadded HF run."""
    hf = hf_reference(tiny_dir)
    seqs = encode(tiny_model.tokenizer, prompts[:3])
    ids, mask = left_pad(seqs, tiny_model.tokenizer.pad_token_id)
    _, cache = tiny_model.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n.endswith("mlp.hook_post"))
    for row, s in enumerate(seqs):
        captured = {}
        h = hf.model.layers[2].mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, c=captured: c.__setitem__("x", args[0][0].detach())
        )
        with torch.no_grad():
            hf(torch.tensor([s]))
        h.remove()
        real = cache["blocks.2.mlp.hook_post"][row, ids.shape[1] - len(s) :]
        assert_close_model(real, captured["x"], tiny_model)


def _some_neurons(model, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(model.cfg.n_layers * model.cfg.d_mlp, generator=g)[:k]
    d = model.cfg.d_mlp
    return cna_lens.NeuronSet(
        tuple((flat // d).tolist()), tuple((flat % d).tolist()), (1.0,) * k, model.cfg.n_layers, d
    )


def test_ablate_scale_one_is_identity(tiny_model, prompts):
    ids, mask = left_pad(encode(tiny_model.tokenizer, prompts[:4]), tiny_model.tokenizer.pad_token_id)
    ref = tiny_model(ids, attention_mask=mask)
    with cna_lens.ablate(tiny_model, _some_neurons(tiny_model), scale=1.0):
        got = tiny_model(ids, attention_mask=mask)
    assert torch.equal(got, ref)  # x · 1.0 is exact: the same forward, bit for bit


def test_ablate_zero_equals_hf_zeroed_columns(tiny_dir, tiny_model, prompts):
    """scale=0 in TL == zeroing those down_proj input columns in plain HF."""
    hf = hf_reference(tiny_dir)
    neurons = _some_neurons(tiny_model, k=40)
    ids = torch.tensor([encode(tiny_model.tokenizer, prompts[:1])[0]])
    handles = [
        hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, idx=idx: (args[0].index_fill(-1, idx, 0.0),)
        )
        for layer, idx in neurons.by_layer().items()
    ]
    with torch.no_grad():
        ref = hf(ids).logits
        for h in handles:
            h.remove()
        plain = hf(ids).logits
        with cna_lens.ablate(tiny_model, neurons, scale=0.0):
            got = tiny_model(ids)
    assert (ref - plain).abs().max() > 0.1  # the ablation does change the output
    assert_close_model(got, ref, tiny_model)


def test_hooks_removed_after_exception_and_nesting(tiny_model, prompts):
    ids = torch.tensor([encode(tiny_model.tokenizer, prompts[:1])[0]])
    ref = tiny_model(ids)
    a, b = _some_neurons(tiny_model, 10, 1), _some_neurons(tiny_model, 10, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with cna_lens.ablate(tiny_model, a):
            raise RuntimeError("boom")
    # hooks gone: the unhooked forward again, bit for bit
    assert torch.equal(tiny_model(ids), ref)
    with cna_lens.ablate(tiny_model, a):
        only_a = tiny_model(ids)
        with cna_lens.ablate(tiny_model, b):
            both = tiny_model(ids)
        assert torch.equal(tiny_model(ids), only_a)  # inner exit keeps outer
    assert torch.equal(tiny_model(ids), ref)
    union = cna_lens.NeuronSet(a.layers + b.layers, a.indices + b.indices, a.scores + b.scores, a.n_layers, a.d_mlp)
    with cna_lens.ablate(tiny_model, union):
        # zeroing a's then b's columns in two hooks leaves the same down_proj input as one hook: equal
        assert torch.equal(tiny_model(ids), both)


def test_neuron_hooks_equal_ablate(tiny_model, prompts):
    ids = torch.tensor([encode(tiny_model.tokenizer, prompts[:1])[0]])
    neurons = _some_neurons(tiny_model, 12)
    with cna_lens.ablate(tiny_model, neurons, scale=2.5):
        ref = tiny_model(ids)
    got = tiny_model.run_with_hooks(ids, fwd_hooks=cna_lens.neuron_hooks(neurons, 2.5))
    assert torch.equal(got, ref)  # the same hook functions on the same forward


def test_ablate_rejects_other_shapes(tiny_model):
    wrong = cna_lens.NeuronSet((0,), (0,), (1.0,), tiny_model.cfg.n_layers + 1, tiny_model.cfg.d_mlp)
    with pytest.raises(ValueError, match="layers"):
        with cna_lens.ablate(tiny_model, wrong):
            pass
    with pytest.raises(TypeError, match="NeuronSet"):
        cna_lens.neuron_hooks([(0, 1)])


@pytest.mark.parametrize("process", [False, True])
def test_hook_post_matches_hf_with_and_without_weight_processing(tiny_dir, prompts, process):
    """Folding norms into the weights (HookedTransformer coordinates) moves hook_post by rounding only."""
    model = cna_lens.load_model(tiny_dir, dtype=torch.float32, process_weights=process)
    assert cna_lens.models.weights_processed(model) is process
    seqs = encode(model.tokenizer, prompts[:3])
    expected = hf_down_proj_inputs(hf_reference(tiny_dir), seqs).double()
    pairs = list(final_token_activations(model, seqs, batch_size=2))
    got, order = torch.cat([acts for _, acts in pairs]), [i for batch, _ in pairs for i in batch]
    # folded norms reorder the same arithmetic (norm weights multiplied into the next matrices)
    assert_close_model(got, expected[order], model)
