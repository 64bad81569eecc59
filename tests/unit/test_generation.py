"""Batched greedy generation: equal to one-at-a-time and to plain HF ``generate``; works under ablate."""

import pytest
import torch

import cna_lens
from cna_lens.generation import greedy_tokens
from cna_lens.prompts import encode

from ..conftest import hf_reference
from .test_activations import _some_neurons


def test_batched_equals_one_at_a_time(tiny_model, prompts):
    batched = cna_lens.generate(tiny_model, prompts, max_new_tokens=12, batch_size=4, progress=False)
    single = [cna_lens.generate(tiny_model, [p], max_new_tokens=12, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_tokens_equal_plain_hf_generate(tiny_dir, tiny_model, prompts):
    hf = hf_reference(tiny_dir)
    tok = tiny_model.tokenizer
    seqs = encode(tok, prompts)
    ours = greedy_tokens(tiny_model, seqs, max_new_tokens=10)
    for s, got in zip(seqs, ours):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([s]),
                max_new_tokens=10,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        ref = out[0, len(s) :].tolist()
        ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert got == ref


def test_early_exit_equals_fixed_length(tiny_model, prompts):
    """A sequence that hits EOS leaves the batch; the others are unaffected."""
    seqs = encode(tiny_model.tokenizer, prompts)
    free = greedy_tokens(tiny_model, seqs, max_new_tokens=8, eos=set())
    # pretend the 3rd token of row 0 and the 1st of row 2 are EOS: those rows stop, others go on
    eos = {free[0][2], free[2][0]}
    stopped = greedy_tokens(tiny_model, seqs, max_new_tokens=8, eos=eos)
    for f, s in zip(free, stopped):
        cut = next((i for i, t in enumerate(f) if t in eos), len(f))
        assert s == f[:cut]


def test_generate_under_ablation_matches_hf_zeroed(tiny_dir, tiny_model, prompts):
    hf = hf_reference(tiny_dir)
    tok = tiny_model.tokenizer
    neurons = _some_neurons(tiny_model, k=60, seed=3)
    for layer, idx in neurons.by_layer().items():
        hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, idx=idx: (args[0].index_fill(-1, idx, 0.0),)
        )
    seqs = encode(tok, prompts[:3])
    with cna_lens.ablate(tiny_model, neurons):
        ours = greedy_tokens(tiny_model, seqs, max_new_tokens=8)
    base = greedy_tokens(tiny_model, seqs, max_new_tokens=8)
    assert ours != base  # the intervention is active during generation
    for s, got in zip(seqs, ours):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([s]),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        ref = out[0, len(s) :].tolist()
        assert got == (ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref)


def test_bad_input(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        cna_lens.generate(tiny_model, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        cna_lens.generate(tiny_model, ["hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        cna_lens.generate(tiny_model, ["hi"], batch_size=0)
