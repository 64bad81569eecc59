"""A KV cache with spare columns (cna_lens.kvcache): in-place appends, same values and tokens as HF's cat."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from cna_lens import generation, kvcache
from cna_lens.attention import _GroupedKV, grouped_everywhere
from cna_lens.generation import greedy_many
from cna_lens.kvcache import SPARE, SpareLayer, buffer_of, with_spare_columns
from cna_lens.prompts import encode, left_pad, pad_id


def _kv(g, cols):
    return torch.randn(3, 2, cols, 4, generator=g), torch.randn(3, 2, cols, 4, generator=g)


def test_spare_layer_appends_in_place_and_equals_cat():
    g = torch.Generator().manual_seed(0)
    layer, plain = SpareLayer(), DynamicLayer()
    ptrs = []
    for cols in [5] + [1] * (SPARE + 2):  # a prefill, then steps past the first buffer's room
        k, v = _kv(g, cols)
        keys, values = layer.update(k, v)
        ref_k, ref_v = plain.update(k, v)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        buf = buffer_of(keys)
        assert buf is not None and not buf[..., keys.shape[-2] :, :].any()  # spare columns are zero
        ptrs.append(keys.data_ptr())
    assert ptrs[1 : SPARE + 1] == [ptrs[0]] * SPARE  # appended in place while the room lasts
    assert ptrs[SPARE + 1] != ptrs[0]  # then one copy into a new buffer
    assert layer.get_seq_length() == plain.get_seq_length() == 5 + SPARE + 2


def test_spare_layer_two_continuations_of_one_state_do_not_overwrite_each_other():
    g = torch.Generator().manual_seed(1)
    layer = SpareLayer()
    layer.update(*_kv(g, 4))
    state = copy.copy(layer)  # shares the views (and so the buffers)
    a, b = _kv(g, 1), _kv(g, 1)
    ka, _ = layer.update(*a)
    kb, _ = state.update(*b)  # from the same 4 columns: must not write into column 4 of `layer`'s buffer
    assert torch.equal(ka[..., 4:, :], a[0]) and torch.equal(kb[..., 4:, :], b[0])
    assert torch.equal(ka[..., :4, :], kb[..., :4, :])


def test_take_rows_copies_into_a_spare_buffer():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 7, 4, generator=g)
    rows = torch.tensor([4, 0, 2])
    y = kvcache.take_rows(x, rows, first=3)
    assert torch.equal(y, x[rows, :, 3:])
    buf = buffer_of(y)
    assert buf is not None and buf.shape[-2] == 4 + SPARE and not buf[..., 4:, :].any()
    layer = SpareLayer()
    layer.lazy_initialization(y, y)
    layer.keys = layer.values = y
    keys, _ = layer.update(*_kv(g, 1))
    assert keys.data_ptr() == buf.data_ptr()  # appended in place


def test_replaced_views_get_a_fresh_buffer():
    g = torch.Generator().manual_seed(2)
    layer = SpareLayer()
    layer.update(*_kv(g, 4))
    layer.batch_select_indices(torch.tensor([2, 0]))  # HF row selection: a plain tensor, no buffer
    assert buffer_of(layer.keys) is None
    k, v = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
    keys, _ = layer.update(k, v)
    assert buffer_of(keys) is not None and keys.shape == (2, 2, 5, 4) and torch.equal(keys[..., 4:, :], k)


def test_with_spare_columns_converts_plain_layers_only():
    cache = DynamicCache()
    cache.layers = [DynamicLayer(), DynamicLayer()]
    assert with_spare_columns(cache) and all(type(x) is SpareLayer for x in cache.layers)
    assert with_spare_columns(cache)  # idempotent
    mixed = DynamicCache()
    mixed.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=8)]
    assert not with_spare_columns(mixed) and type(mixed.layers[0]) is DynamicLayer
    assert not with_spare_columns(object())


def test_grouped_kv_multiplies_by_the_whole_buffer():
    from transformers.models.llama.modeling_llama import repeat_kv

    g = torch.Generator().manual_seed(3)
    q, w = torch.randn(3, 6, 1, 8, generator=g), torch.randn(3, 6, 1, 7, generator=g).softmax(-1)
    layer = SpareLayer()
    keys, values = layer.update(torch.randn(3, 2, 7, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g))
    assert buffer_of(keys).shape[-2] == 7 + SPARE
    scores = torch.matmul(q, _GroupedKV(keys, 3).transpose(-2, -1))
    assert scores.shape == (3, 6, 1, 7)
    torch.testing.assert_close(scores, q @ repeat_kv(keys.contiguous(), 3).transpose(-2, -1))
    torch.testing.assert_close(torch.matmul(w, _GroupedKV(values, 3)), w @ repeat_kv(values.contiguous(), 3))


def _decode(model, ids, mask, steps, spare):
    """Last-position logits of a prefill and ``steps`` greedy KV-cached steps (spare columns or HF's cat)."""
    out = []
    logits, cache = model(ids, attention_mask=mask, return_type="logits_and_cache", use_cache=True)
    for _ in range(steps):
        out.append(logits[:, -1])
        if spare:
            assert with_spare_columns(cache)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits, cache = model(nxt, attention_mask=mask, past_key_values=cache, return_type="logits_and_cache")
    assert any(type(x) is SpareLayer for x in cache.layers) == spare
    return out + [logits[:, -1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_spare_columns_same_logits_as_cat(tiny_dir, prompts, dtype):
    """bf16 (oneDNN): the same bits; fp32: float rounding (the GEMM blocks the longer sum differently)."""
    from cna_lens import load_model

    model = load_model(tiny_dir, dtype=dtype)
    assert grouped_everywhere(model)
    ids, mask = left_pad(encode(model.tokenizer, prompts), pad_id(model.tokenizer))
    ref, new = (_decode(model, ids, mask, SPARE + 4, spare) for spare in (False, True))
    for a, b in zip(ref, new, strict=True):
        if dtype == torch.bfloat16:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_pool_with_spare_columns_same_tokens(tiny_model, prompts, monkeypatch):
    """The pool (rows leave and join, refills merge caches) gives the same tokens with and without."""
    seqs = encode(tiny_model.tokenizer, prompts)
    jobs = [([], seqs), ([], seqs[::-1])]
    seen = []
    real = kvcache.with_spare_columns
    monkeypatch.setattr(generation, "with_spare_columns", lambda c: seen.append(1) or real(c))
    new = greedy_many(tiny_model, jobs, 24, batch_size=5)
    assert seen  # the pool used them
    monkeypatch.setattr(generation, "grouped_everywhere", lambda m: False)
    seen.clear()
    assert greedy_many(tiny_model, jobs, 24, batch_size=5) == new and not seen
