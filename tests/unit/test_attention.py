"""Faster attention (cna_lens.attention): copy-free GQA and the once-per-pass mask keep TL's results."""

from __future__ import annotations

import copy

import pytest
import torch

from cna_lens.attention import _GroupedKV, grouped_attention, lean_mask
from cna_lens.generation import greedy_tokens
from cna_lens.prompts import encode, left_pad, pad_id

HOOKS = ("hook_attn_scores", "hook_pattern", "hook_z", "mlp.hook_post", "hook_resid_post")


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


class _Count(torch.overrides.TorchFunctionMode):
    """Counts calls of the given torch functions (and Tensor methods of the same name)."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.n = dict.fromkeys(names, 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.n:
            self.n[name] += 1
        return func(*args, **(kwargs or {}))


def _prefill_and_steps(model, ids, mask, steps=3, hooks=()):
    """Logits of a left-padded prefill and ``steps`` greedy KV-cached decoding steps, plus the values
    seen at ``hook_pattern`` and ``mlp.hook_post`` (hooks on other points than the scores)."""
    seen, out = [], []

    def keep(act, hook):
        seen.append(act.clone())

    fwd = [(lambda n: n.endswith(("hook_pattern", "mlp.hook_post")), keep), *hooks]
    with model.hooks(fwd_hooks=fwd):
        logits, cache = model(ids, attention_mask=mask, return_type="logits_and_cache", use_cache=True)
        for _ in range(steps):
            out.append(logits[:, -1])
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits, cache = model(nxt, attention_mask=mask, past_key_values=cache, return_type="logits_and_cache")
    return out + [logits[:, -1]], seen


@torch.no_grad()
def test_lean_mask_same_bits_prefill_and_decoding(tiny_model, prompts):
    ids, mask = left_pad(encode(tiny_model.tokenizer, prompts), pad_id(tiny_model.tokenizer))
    assert (mask == 0).any()  # padded rows: the prefill has query rows with no visible key
    assert lean_mask(tiny_model, False) == tiny_model.cfg.n_layers  # the default is on
    try:
        ref = _prefill_and_steps(tiny_model, ids, mask)
        ref_cached = _run(tiny_model, ids, mask)
        assert lean_mask(tiny_model, True) == tiny_model.cfg.n_layers
        assert lean_mask(tiny_model, True) == 0  # idempotent
        new = _prefill_and_steps(tiny_model, ids, mask)
        cached = _run(tiny_model, ids, mask)  # caching hook_attn_scores: that layer takes TL's path
    finally:
        lean_mask(tiny_model, True)
    for a, b in zip(ref[0] + ref[1], new[0] + new[1], strict=True):
        assert torch.equal(a, b)
    for k in ref_cached[1].keys():
        assert torch.equal(cached[1][k], ref_cached[1][k]), k
    assert not ref[0][0].isnan().any()


@torch.no_grad()
def test_lean_mask_builds_once_and_skips_the_guards_when_decoding(tiny_model, prompts):
    ids, mask = left_pad(encode(tiny_model.tokenizer, prompts[:3]), pad_id(tiny_model.tokenizer))
    _, cache = tiny_model(ids, attention_mask=mask, return_type="logits_and_cache", use_cache=True)
    step_mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
    nxt = ids[:, -1:]
    counts = {}
    for on in (False, True):
        lean_mask(tiny_model, on)
        with _Count("isneginf", "isnan") as c:
            tiny_model(nxt, attention_mask=step_mask, past_key_values=copy.deepcopy(cache))
        counts[on] = c.n
    n = tiny_model.cfg.n_layers
    assert counts[False] == {"isneginf": n, "isnan": n}  # TL: a guard and a scrub per layer
    assert counts[True] == {"isneginf": 1, "isnan": 0}  # once per pass, no scrub


@torch.no_grad()
def test_lean_mask_takes_tl_path_under_score_hooks(tiny_model, prompts):
    """A hook on the scores that hides every key of the first query row: TL zeroes that row's pattern."""
    ids, mask = left_pad(encode(tiny_model.tokenizer, prompts[:4]), pad_id(tiny_model.tokenizer))

    def hide(scores, hook):
        scores[:, :, 0] = -torch.inf
        return scores

    hooks = [(lambda n: n.endswith("hook_attn_scores"), hide)]
    runs = []
    for on in (False, True):
        lean_mask(tiny_model, on)
        runs.append(_prefill_and_steps(tiny_model, ids, mask, steps=2, hooks=hooks))
    lean_mask(tiny_model, True)
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1], strict=True):
        assert torch.equal(a, b)
    assert not any(t.isnan().any() for t in runs[1][0] + runs[1][1])


@torch.no_grad()
def test_fast_attention_same_greedy_tokens(tiny_model, prompts):
    from cna_lens.attention import fast_attention

    seqs = encode(tiny_model.tokenizer, prompts)
    fast_attention(tiny_model, False)
    try:
        plain = greedy_tokens(tiny_model, seqs, 10, eos=set())
    finally:
        assert fast_attention(tiny_model, True) == tiny_model.cfg.n_layers
    assert greedy_tokens(tiny_model, seqs, 10, eos=set()) == plain


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_cache_equals_tl_mask(tiny_model, kind):
    """The shared additive mask gives TL's masked scores, for boolean and additive 4-D masks."""
    from cna_lens.attention import _MaskCache

    attn = next(m for m in tiny_model.modules() if type(m).__name__ == "PositionEmbeddingsAttentionBridge")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 4, 5, 7, generator=g)
    keep = torch.rand(3, 1, 6, 8, generator=g) > 0.4  # one extra query row and key column: TL slices them off
    keep[0, :, -1] = False  # a query row with no visible key
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    tl = type(attn)._apply_reconstruct_attention_mask(attn, scores, mask, 7, 5)
    cache = _MaskCache().get(attn, mask, scores, 7, 5)
    assert torch.equal(scores + cache.add, tl)
    assert cache.any_empty and torch.equal(cache.empty, torch.isneginf(tl).all(-1, keepdim=True)[:, :1])
