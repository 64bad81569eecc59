"""Speed-ups (cna_lens.fast): copy-free GQA changes nothing, shared prefixes only rounding."""

from __future__ import annotations

import pytest
import torch

from cna_lens import ablate
from cna_lens.attribute import final_token_activations_multi
from cna_lens.evaluate import final_logprobs
from cna_lens.fast import _GroupedKV, common_prefix, computed_tokens, grouped_attention, prefilled, shared_prefix
from cna_lens.generation import greedy_tokens
from cna_lens.neurons import NeuronSet
from cna_lens.prompts import encode, left_pad, pad_id

HOOKS = ("hook_attn_scores", "hook_pattern", "hook_z", "mlp.hook_post", "hook_resid_post")


def test_common_prefix():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # every sequence keeps its last token
    assert common_prefix([[7, 8, 9]]) == 2
    assert common_prefix([[1, 2], [3, 4]]) == 0
    assert common_prefix([]) == 0


def test_grouped_kv_matches_repeat_kv():
    from transformers.models.llama.modeling_llama import repeat_kv

    g = torch.Generator().manual_seed(0)
    q, w = torch.randn(3, 6, 5, 8, generator=g), torch.randn(3, 6, 5, 7, generator=g).softmax(-1)
    k, v = torch.randn(3, 2, 7, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g)
    gk, gv = _GroupedKV(k, 3), _GroupedKV(v, 3)
    assert gk.shape == repeat_kv(k, 3).shape and gk.transpose(-2, -1).shape == (3, 6, 8, 7)
    torch.testing.assert_close(torch.matmul(q, gk.transpose(-2, -1)), q @ repeat_kv(k, 3).transpose(-2, -1))
    torch.testing.assert_close(torch.matmul(w, gv), w @ repeat_kv(v, 3))
    with pytest.raises(NotImplementedError, match="only transposes"):
        gk.transpose(0, 1)
    with pytest.raises(NotImplementedError, match="supports only"):
        torch.add(q, gk)


def _run(model, ids, mask):
    return model.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n.endswith(HOOKS))


@torch.no_grad()
def test_grouped_attention_same_logits_and_hooks(tiny_model, prompts):
    ids, mask = left_pad(encode(tiny_model.tokenizer, prompts), pad_id(tiny_model.tokenizer))
    assert grouped_attention(tiny_model, False) == tiny_model.cfg.n_layers  # the default is on
    ref_logits, ref = _run(tiny_model, ids, mask)
    assert grouped_attention(tiny_model, True) == tiny_model.cfg.n_layers
    assert grouped_attention(tiny_model, True) == 0  # idempotent
    logits, cache = _run(tiny_model, ids, mask)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    assert set(cache.keys()) == set(ref.keys()) and any("hook_pattern" in k for k in ref.keys())
    for k in ref.keys():
        torch.testing.assert_close(cache[k], ref[k], rtol=0, atol=1e-6, msg=k)


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
