"""Batched greedy generation: equal to one-at-a-time and to plain HF ``generate``; works under ablate."""

import pytest
import torch

import cna_lens
from cna_lens import generation
from cna_lens.generation import generate_many, greedy_many, greedy_tokens
from cna_lens.intervene import steering_hooks
from cna_lens.prompts import encode

from ..conftest import PROMPTS, hf_reference
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


def _jobs(model):
    """Three conditions on the same prompts: as is, 60 neurons ablated, residual steering."""
    seqs = encode(model.tokenizer, PROMPTS)
    vectors = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    conditions = [
        [],
        cna_lens.neuron_hooks(_some_neurons(model, k=60, seed=3)),
        steering_hooks(vectors, 2.0),
    ]
    return [(c, seqs) for c in conditions]


def _alone(model, jobs, max_new_tokens, eos=None):
    out = []
    for hooks, seqs in jobs:
        with model.hooks(fwd_hooks=hooks):
            out.append([greedy_tokens(model, [s], max_new_tokens, eos)[0] for s in seqs])
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 8, 64])
def test_pooled_conditions_equal_each_prompt_alone(tiny_model, batch_size):
    """Rows of different conditions share a refilled batch; each row gets only its own hooks."""
    jobs = _jobs(tiny_model)
    alone = _alone(tiny_model, jobs, 10)
    assert alone[0] != alone[1] and alone[0] != alone[2]  # every condition changes the tokens
    finished, prefills = [], []
    real = generation._prefill
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "_prefill", lambda m, rows, *a: prefills.append(rows) or real(m, rows, *a))
        pooled = greedy_many(tiny_model, jobs, 10, batch_size=batch_size, on_done=finished.extend)
    assert pooled == alone
    if batch_size == 64:  # all 21 prompts at once: each job's are cut by length (less padding)
        assert len(prefills) > len(jobs) and all(len({j for j, _ in rows}) == 1 for rows in prefills)
    assert sorted((j, i) for j, i, _ in finished) == [(j, i) for j in range(3) for i in range(len(PROMPTS))]
    assert all(toks == pooled[j][i] for j, i, toks in finished)


def test_pool_refills_after_early_exits(tiny_model):
    """Rows that hit EOS leave; new prompts are prefilled and left-padded into the running cache."""
    jobs = _jobs(tiny_model)
    free = _alone(tiny_model, jobs, 8, eos=set())
    eos = {free[0][0][2], free[1][2][0], free[2][4][1]}
    alone = _alone(tiny_model, jobs, 8, eos=eos)
    assert sum(len(t) < 8 for job in alone for t in job) >= 3  # some rows stop early
    calls = []
    real = generation._merge
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "_merge", lambda *a: calls.append(1) or real(*a))
        pooled = greedy_many(tiny_model, jobs, 8, batch_size=4, eos=eos)
    assert pooled == alone
    assert calls  # rows joined a running pool


def test_pool_without_kv_cache_equals_cached(tiny_model, monkeypatch):
    """Hooked models without an HF cache (TL 3) decode by recomputing: same tokens, same pooling."""
    jobs = _jobs(tiny_model)
    cached = greedy_many(tiny_model, jobs, 6, batch_size=5)
    monkeypatch.setattr(generation, "is_bridge", lambda m: False)
    assert greedy_many(tiny_model, jobs, 6, batch_size=5) == cached


def test_generate_many_texts_and_callback(tiny_model):
    jobs = [([], PROMPTS[:3]), (cna_lens.neuron_hooks(_some_neurons(tiny_model, k=60, seed=3)), PROMPTS[3:])]
    seen = {}
    texts = generate_many(
        tiny_model,
        jobs,
        max_new_tokens=6,
        batch_size=2,
        progress=False,
        on_done=lambda j, i, t: seen.update({(j, i): t}),
    )
    assert [len(t) for t in texts] == [3, len(PROMPTS) - 3]
    assert seen == {(j, i): t for j, job in enumerate(texts) for i, t in enumerate(job)}
    assert texts[0] == cna_lens.generate(tiny_model, PROMPTS[:3], max_new_tokens=6, progress=False)


def test_row_hooks_accept_in_place_hooks_that_return_none(tiny_model):
    """TL hooks may edit the activation in place and return None; only their own rows change."""
    seqs = encode(tiny_model.tokenizer, PROMPTS[:4])
    ns = _some_neurons(tiny_model, k=60, seed=3)

    def zero_in_place(idx):
        def hook(act, hook):
            act[..., idx] = 0.0

        return hook

    in_place = [(cna_lens.hook_name(layer), zero_in_place(idx)) for layer, idx in ns.by_layer().items()]
    pooled = greedy_many(tiny_model, [([], seqs), (in_place, seqs)], 8, batch_size=8)
    assert pooled == _alone(tiny_model, [([], seqs), (cna_lens.neuron_hooks(ns), seqs)], 8)


def _scale_mlp(layer: int, by: float):
    return [(f"blocks.{layer}.mlp.hook_post", lambda act, hook: act * by)]


@torch.no_grad()
def test_prefill_from_lower_blocks_same_cache_and_token(tiny_model, prompts):
    """A job's prefill that starts at block 2 from a baseline recording: the same next tokens and the
    same K/V in every layer (the skipped blocks' taken from the recording) as running every block."""
    from cna_lens.fast import LowerBlocks
    from cna_lens.generation import _prefill

    seqs, n = encode(tiny_model.tokenizer, prompts), tiny_model.cfg.n_layers
    rows = [(0, i) for i in range(len(seqs))]
    lower = LowerBlocks(tiny_model, [2])
    base = _prefill(tiny_model, rows, seqs, True, {}, (lower, n))  # no hooks: records resid_pre[2] and K/V
    assert lower.skipped == 0
    with tiny_model.hooks(fwd_hooks=_scale_mlp(2, 0.5)):  # first changed: resid_pre[3]
        plain = _prefill(tiny_model, rows, seqs, True, {})
        new = _prefill(tiny_model, rows, seqs, True, {}, (lower, 3))
    assert lower.skipped == 2 * len(seqs)
    assert torch.equal(new.nxt, plain.nxt) and torch.equal(new.mask, plain.mask)
    for a, b in zip(new.cache.layers, plain.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert not torch.equal(new.cache.layers[3].keys, base.cache.layers[3].keys)  # the hook did act


@torch.no_grad()
def test_pool_reuses_lower_blocks_across_jobs(tiny_model, prompts, monkeypatch):
    from cna_lens import fast

    seqs, n = encode(tiny_model.tokenizer, prompts), tiny_model.cfg.n_layers
    jobs = [([], seqs), (_scale_mlp(n - 1, 0.0), seqs), (_scale_mlp(1, 2.0), seqs), ([], seqs[:3])]
    starts = []
    real = fast.LowerBlocks._start_at

    def spy(self, start, resid):
        starts.append(start)
        return real(self, start, resid)

    monkeypatch.setattr(fast.LowerBlocks, "_start_at", spy)
    new = greedy_many(tiny_model, jobs, 12, batch_size=4 * len(seqs))  # one refill: the same batches per job
    assert starts and set(starts) == {n - 1, 1}
    starts.clear()
    assert greedy_many(tiny_model, jobs, 12, batch_size=4 * len(seqs), reuse_lower=False) == new and not starts
    alone = [greedy_many(tiny_model, [job], 12, batch_size=len(seqs))[0] for job in jobs]
    assert new == alone
