"""Speed-ups (cna_lens.fast): shared prefixes change only rounding, lower blocks nothing."""

from __future__ import annotations

import pytest
import torch

from cna_lens import ablate
from cna_lens.attribute import final_token_activations_multi
from cna_lens.evaluate import final_logprobs
from cna_lens.fast import (
    LowerBlocks,
    common_prefix,
    computed_tokens,
    first_changed,
    prefilled,
    shared_prefix,
)
from cna_lens.generation import greedy_tokens
from cna_lens.neurons import NeuronSet
from cna_lens.prompts import encode, pad_id


def test_common_prefix():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # every sequence keeps its last token
    assert common_prefix([[7, 8, 9]]) == 2
    assert common_prefix([[1, 2], [3, 4]]) == 0
    assert common_prefix([]) == 0


@pytest.fixture
def big_set(tiny_model):
    """Every 3rd neuron of layers 1–3: an ablation that visibly moves the outputs."""
    d = tiny_model.cfg.d_mlp
    pairs = [(layer, i) for layer in (1, 2, 3) for i in range(0, d, 3)]
    layers, indices = zip(*pairs)
    return NeuronSet(layers, indices, (1.0,) * len(pairs), tiny_model.cfg.n_layers, d)


@torch.no_grad()
def test_shared_prefix_final_logprobs(tiny_model, prompts, big_set):
    seqs = encode(tiny_model.tokenizer, prompts)
    assert common_prefix(seqs) >= 4  # the chat template's head is shared
    _, _, kw = prefilled(tiny_model, seqs, pad_id(tiny_model.tokenizer))
    assert "past_key_values" in kw
    with shared_prefix(False):
        plain = final_logprobs(tiny_model, prompts, batch_size=4)
    shared = final_logprobs(tiny_model, prompts, batch_size=4)
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-4)
    with ablate(tiny_model, big_set):  # the prefix runs under the active hooks too
        with shared_prefix(False):
            plain_ab = final_logprobs(tiny_model, prompts, batch_size=4)
        shared_ab = final_logprobs(tiny_model, prompts, batch_size=4)
    torch.testing.assert_close(shared_ab, plain_ab, rtol=0, atol=1e-4)
    assert (plain_ab - plain).abs().max() > 100 * 1e-4  # the ablation is visible at that tolerance


def test_shared_prefix_attribution(tiny_model, prompts):
    seqs = encode(tiny_model.tokenizer, prompts)

    def acts(share: bool) -> torch.Tensor:
        rows = {}
        with shared_prefix(share):
            found = list(
                final_token_activations_multi(tiny_model, seqs, ("mlp.hook_post", "hook_mlp_out"), batch_size=3)
            )
        for batch, a in found:
            rows.update(zip(batch, torch.cat([a["mlp.hook_post"], a["hook_mlp_out"]], dim=-1)))
        return torch.stack([rows[i] for i in range(len(seqs))])

    torch.testing.assert_close(acts(True), acts(False), rtol=1e-4, atol=1e-4)  # fp32 rounding (random-init model)


@torch.no_grad()
def test_shared_prefix_generation_tokens(tiny_model, prompts, big_set):
    seqs = encode(tiny_model.tokenizer, prompts)
    for ctx in (lambda: torch.no_grad(), lambda: ablate(tiny_model, big_set)):
        with ctx():
            shared = greedy_tokens(tiny_model, seqs, 12, eos=set())
            with shared_prefix(False):
                plain = greedy_tokens(tiny_model, seqs, 12, eos=set())
        assert shared == plain


def test_computed_tokens(tiny_model, prompts):
    seqs = encode(tiny_model.tokenizer, prompts)
    total = sum(map(len, seqs))
    with shared_prefix(False):
        assert computed_tokens(tiny_model, seqs, 3) == total
    p = common_prefix(seqs)
    # 7 prompts in batches of 3, 3, 1: the prefix is saved twice in each of the first two batches
    assert computed_tokens(tiny_model, seqs, 3) <= total - 4 * p
    assert computed_tokens(tiny_model, seqs, 1) == total  # a lone prompt shares nothing


def test_first_changed():
    n = 6
    assert first_changed([], n) == n
    assert first_changed(["blocks.3.mlp.hook_post", "blocks.5.hook_mlp_out"], n) == 4
    assert first_changed(["blocks.3.hook_resid_pre"], n) == 3  # the block's own input
    assert first_changed(["ln_final.hook_normalized", "unembed.hook_out"], n) == n  # after the blocks
    assert first_changed(["blocks.4.attn.hook_z", "hook_embed"], n) == 0  # before the blocks


@pytest.mark.parametrize("share", [True, False])
@torch.no_grad()
def test_lower_blocks_skip_and_keep_the_bits(tiny_model, prompts, share):
    d = tiny_model.cfg.d_mlp
    high = NeuronSet((2, 2, 3), (0, 5, 7), (1.0,) * 3, tiny_model.cfg.n_layers, d)  # first changed: resid_pre[3]
    low = NeuronSet((1, 3), (2, 4), (1.0,) * 2, tiny_model.cfg.n_layers, d)  # first changed: resid_pre[2]
    calls = []  # a plain PyTorch hook inside block 0: it runs only when the block does
    handle = tiny_model.blocks[0].attn.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with shared_prefix(share):
            ref = {"base": final_logprobs(tiny_model, prompts, batch_size=4)}
            for name, ns in (("high", high), ("low", low)):
                with ablate(tiny_model, ns):
                    ref[name] = final_logprobs(tiny_model, prompts, batch_size=4)
            lower = LowerBlocks(tiny_model, [2, 0, 99])  # out-of-range layers are ignored
            assert lower.layers == [2]
            calls.clear()
            assert torch.equal(final_logprobs(tiny_model, prompts, batch_size=4, lower=lower), ref["base"])
            n_full = len(calls)  # the recording pass runs every block
            assert n_full > 0 and lower.skipped == 0
            with ablate(tiny_model, high):
                calls.clear()
                assert torch.equal(final_logprobs(tiny_model, prompts, batch_size=4, lower=lower), ref["high"])
            assert len(calls) == (n_full - 2 if share else 0)  # block 0 ran for the shared prefix, not the 2 batches
            assert lower.skipped == 2 * len(prompts)
            with ablate(tiny_model, low):  # hooks below the record: every block runs
                assert torch.equal(final_logprobs(tiny_model, prompts, batch_size=4, lower=lower), ref["low"])
            with tiny_model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", lambda act, hook: act * 2)]):
                final_logprobs(tiny_model, prompts, batch_size=4, lower=lower)  # hook on the recorded input
            # other batches (other keys), nothing to reuse; the records stay
            other = final_logprobs(tiny_model, prompts[:3], batch_size=4, lower=lower)
            torch.testing.assert_close(other, ref["base"][:3], rtol=0, atol=1e-4)  # another batch: rounding only
            assert lower.skipped == 2 * len(prompts)
    finally:
        handle.remove()
    assert "forward" not in tiny_model.blocks[0].__dict__  # the skipped blocks are restored
    assert (ref["high"] - ref["base"]).abs().max() > 1e-3 and (ref["low"] - ref["high"]).abs().max() > 1e-3


@torch.no_grad()
def test_prefix_kv_reused_across_batches(tiny_model, prompts, big_set):
    seqs = encode(tiny_model.tokenizer, prompts)
    pad = pad_id(tiny_model.tokenizer)
    batches = [seqs[:3], seqs[3:], seqs[1:5]]

    def run(reuse):
        out = []
        for rows in batches:
            ids, mask, kw = prefilled(tiny_model, rows, pad, reuse)
            out.append(tiny_model(ids, attention_mask=mask, **kw))
        return out

    calls = []
    handle = tiny_model.blocks[0].attn.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with ablate(tiny_model, big_set):  # the prefix's KV depends on the hooks: one dict per hook state
            fresh = run(None)
            n_fresh, reuse = len(calls), {}
            reused = run(reuse)
    finally:
        handle.remove()
    assert len(reuse) == 1 and len(calls) - n_fresh == n_fresh - 2  # two prefix passes fewer
    assert all(torch.equal(a, b) for a, b in zip(fresh, reused))
    assert next(iter(reuse.values())).get_seq_length() == common_prefix(seqs)  # the stored copy is untouched
