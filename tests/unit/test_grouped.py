"""Several neuron scalings decoded in one batch (cna_lens.speed.grouped) against each one alone under its
weight edit: the same greedy answers, rows leaving as they end, first-token log-probabilities up to fp32
summation order, hooks gone afterwards."""

import pytest
import torch

import cna_lens
from cna_lens.engine import stock_model
from cna_lens.generation import generate_scored, greedy_tokens
from cna_lens.neurons import NeuronSet
from cna_lens.prompts import encode, left_pad
from cna_lens.speed import shrink_generate
from cna_lens.speed.grouped import generate_grouped, row_scales

from ..helpers import assert_close_model, random_neurons


def _scalings(model):
    """Four selections: two neuron sets, scales exact in binary (0, ½, 2), and the empty set (unmodified)."""
    a, b = random_neurons(model, per_layer=8, seed=2), random_neurons(model, per_layer=5, seed=7)
    empty = NeuronSet((), (), (), model.cfg.n_layers, model.cfg.d_mlp)
    return [(a, 0.0), (b, 0.5), (a, 2.0), (empty, 0.0)]


def test_grouped_answers_equal_each_weight_edit_alone(tiny_model, prompts):
    scalings = _scalings(tiny_model)
    texts, first = generate_grouped(tiny_model, prompts, scalings, max_new_tokens=10, batch_size=3)
    assert first.shape[:2] == (len(scalings), len(prompts)) and first.dtype == torch.float32
    ids, mask = left_pad(encode(tiny_model.tokenizer, prompts), tiny_model.tokenizer.pad_token_id)
    for g, (neurons, scale) in enumerate(scalings):
        with cna_lens.edit_weights(tiny_model, neurons, scale):
            want, want_first = generate_scored(tiny_model, prompts, max_new_tokens=10, batch_size=3, progress=False)
            with torch.no_grad():
                scale_bound = 2 * float(tiny_model(ids, attention_mask=mask).abs().max())  # log-softmax: ≤ 2 δ
        assert texts[g] == want, g
        assert_close_model(first[g], want_first, tiny_model, scale=scale_bound)
    assert len({tuple(t) for t in texts}) == len(scalings)  # each row ran under its own group's scales


def test_rows_leave_as_they_end_in_each_group(tiny_model, prompts):
    """With end-of-sequence tokens that stop rows at different steps in different groups, each group's
    answers are its weight edit's answers cut at the first such token."""
    scalings = _scalings(tiny_model)[:2]
    seqs = encode(tiny_model.tokenizer, prompts)
    free = []
    for neurons, scale in scalings:
        with cna_lens.edit_weights(tiny_model, neurons, scale):
            free.append(greedy_tokens(tiny_model, seqs, 8, eos=[], batch_size=3))
    eos = [free[0][0][1], free[1][2][0]]
    texts, _ = generate_grouped(tiny_model, prompts, scalings, max_new_tokens=8, batch_size=3, eos=eos)
    lengths = set()
    for g in range(len(scalings)):
        for f, got in zip(free[g], texts[g]):
            cut = next((i for i, t in enumerate(f) if t in eos), len(f))
            lengths.add(cut)
            assert got == tiny_model.tokenizer.decode(f[:cut], skip_special_tokens=True)
    assert len(lengths) > 2  # rows did end at different steps


def test_row_scales_are_removed_on_exit_and_on_error(tiny_model, prompts):
    plain = stock_model(tiny_model)
    ids, mask = left_pad(encode(tiny_model.tokenizer, prompts), tiny_model.tokenizer.pad_token_id)
    with torch.no_grad():
        before = plain(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(RuntimeError, match="inside"):
            with row_scales(tiny_model, _scalings(tiny_model)[:1]) as set_groups:
                set_groups(torch.zeros(len(prompts), dtype=torch.long))
                assert not torch.equal(plain(input_ids=ids, attention_mask=mask).logits, before)
                raise RuntimeError("inside")
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, before)


def test_bad_input(tiny_model, prompts):
    scalings = _scalings(tiny_model)
    with pytest.raises(ValueError, match="at least one"):
        generate_grouped(tiny_model, prompts, [])
    with pytest.raises(ValueError, match="finite"):
        generate_grouped(tiny_model, prompts, [(scalings[0][0], float("nan"))])
    wrong = NeuronSet((0,), (1,), (1.0,), tiny_model.cfg.n_layers + 1, tiny_model.cfg.d_mlp)
    with pytest.raises(ValueError, match="layers"):
        generate_grouped(tiny_model, prompts, [(wrong, 0.0)])
    with pytest.raises(ValueError, match="`prompts` is empty"):
        generate_grouped(tiny_model, [], scalings)
    with pytest.raises(TypeError, match="not a single string"):
        generate_grouped(tiny_model, prompts[0], scalings)
    with pytest.raises(ValueError, match=">= 1"):
        generate_grouped(tiny_model, prompts, scalings, batch_size=0)
    with cna_lens.ablate(tiny_model, scalings[0][0], 0.0), pytest.raises(ValueError, match="stock engine"):
        generate_grouped(tiny_model, prompts, scalings)
    ids, mask = left_pad(encode(tiny_model.tokenizer, prompts[:3]), tiny_model.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="divide the batch of 3 rows"):
        shrink_generate(stock_model(tiny_model), ids, mask, 2, [], groups=2)
