"""Weight edits and export on the packaged SmolLM2-135M-Instruct (fp32): hook == edit == exported."""

import numpy as np
import pytest
import torch

import cna_lens
from cna_lens.datasets import load_prompts
from cna_lens.models import PACKAGED

from ..helpers import batch, digest, hooked_greedy, logit_tol, logits, random_neurons, real, reload_in_subprocess
from .conftest import ALIAS, needs_smollm2

pytestmark = [pytest.mark.integration, needs_smollm2]

# Tolerances: a weight edit, the hook it replaces and a plain-transformers reload compute the same products
# in other orders, so logits differ by fp32 summation order only: logit_tol (tests/helpers.py), ≈ 1e-2 at
# SmolLM2's |logit| ≈ 40 (measured ≤ 2e-4). A wrong column, layer or sign moves logits by O(0.1-1).
# Logits at every real position of five prompts check the whole function; greedy tokens would add only
# ties within rounding.


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("jbb_harmful", limit=3) + load_prompts("discovery_harmless", limit=2)


def test_edit_weights_equals_ablate(smol, prompts):
    neurons = random_neurons(smol, per_layer=8, seed=0)  # 240 of 46,080 neurons (0.5 %)
    ids, mask = batch(smol, prompts)
    before = digest(smol)
    base = logits(smol, ids, mask)
    for scale in (0.0, 1.5):
        with cna_lens.ablate(smol, neurons, scale):
            hooked = logits(smol, ids, mask)
        with cna_lens.edit_weights(smol, neurons, scale):
            edited = logits(smol, ids, mask)
        assert (real(hooked, mask) - real(base, mask)).abs().max() > 0.1  # the intervention does something
        if scale == 0.0:  # zero products: the same sums with exact zeros, bit for bit
            assert torch.equal(real(edited, mask), real(hooked, mask))
        else:
            torch.testing.assert_close(real(edited, mask), real(hooked, mask), atol=logit_tol(smol, hooked), rtol=0)
    assert digest(smol) == before


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_edit_direction_equals_hooks_with_tied_unembedding(smol, prompts, strength):
    assert cna_lens.edit.tied_embeddings(smol.original_model)  # SmolLM2 ties them
    r = torch.randn(smol.cfg.d_model, generator=torch.Generator().manual_seed(1))
    ids, mask = batch(smol, prompts)
    with cna_lens.ablate_direction(smol, r, unembed=True, strength=strength):
        hooked = logits(smol, ids, mask)
    with cna_lens.edit_direction(smol, r, strength):
        edited = logits(smol, ids, mask)
    torch.testing.assert_close(real(edited, mask), real(hooked, mask), atol=logit_tol(smol, hooked), rtol=0)


def test_export_reloads_in_plain_transformers(smol, prompts, tmp_path):
    neurons = random_neurons(smol, per_layer=8, seed=2)
    ids, mask = batch(smol, prompts[:3])
    with cna_lens.ablate(smol, neurons, 0.0):
        hooked = logits(smol, ids, mask)
        tokens = hooked_greedy(smol, ids, mask, 6)
    out = cna_lens.export_model(smol, tmp_path / "smol", neurons=neurons)
    ((got, got_tokens, info),) = reload_in_subprocess((out, ids, mask))
    # plain HF eager attention vs the bridge: rounding only (measured 1.6e-4 at |logit| 34 on 8 JBB prompts)
    torch.testing.assert_close(real(got, mask), real(hooked, mask), atol=logit_tol(smol, hooked), rtol=0)
    assert torch.equal(got_tokens, tokens)  # HF generate (KV cache) picks the hooked model's greedy tokens
    assert "<|im_start|>assistant" in info["template"]


def test_gguf_tokenizer_matches_llama_cpp_converter(smol, tmp_path):
    """The packaged GGUF was written by llama.cpp's converter: our tokenizer metadata must agree."""
    import gguf

    neurons = random_neurons(smol, per_layer=2, seed=3)
    out = cna_lens.export_model(smol, tmp_path / "g", neurons=neurons, format="gguf", gguf_type="q8_0")
    ours = gguf.GGUFReader(out / "model-q8_0.gguf")
    theirs = gguf.GGUFReader(PACKAGED[ALIAS].part_paths()[0])
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
        "llama.rope.freq_base",
        "llama.attention.head_count_kv",
        "llama.rope.dimension_count",
        "llama.feed_forward_length",
        "llama.context_length",
    ):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert {t.name for t in ours.tensors} == {t.name for t in theirs.tensors}
    tensors = {t.name: t for t in ours.tensors}
    for layer, idx in neurons.by_layer().items():
        t = tensors[f"blk.{layer}.ffn_down.weight"]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(smol.cfg.d_model, smol.cfg.d_mlp)
        assert np.all(w[:, idx.numpy()] == 0)
