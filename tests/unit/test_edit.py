"""Weight edits equal the hook interventions, and restore every parameter bit for bit."""

import pytest
import torch

import cna_lens
from cna_lens.edit import edit_direction, edit_steering, edit_weights, hf_model
from cna_lens.intervene import ablate, ablate_direction, steer
from cna_lens.neurons import NeuronSet
from cna_lens.prompts import encode

from ..conftest import byte_tokenizer, hf_reference, tiny_config
from ..helpers import batch, digest, greedy, logit_tol, logits, random_neurons

# Tolerances: a weight edit and the hook it replaces compute the same products in another order
# (W·(s·a) against (W·diag(s))·a, or one fused matmul against a hook between two), so the logits differ
# by fp32 summation order only: logit_tol (tests/helpers.py), about 3e-4 at |logit| 10 on the tiny
# models. A wrong column, layer or sign moves logits by O(0.1-1).


@pytest.mark.parametrize("scale", [0.0, 1.5, -0.3])
def test_edit_weights_equals_ablate(tiny_model, prompts, scale):
    neurons = random_neurons(tiny_model)
    ids, mask = batch(tiny_model, prompts)
    base = logits(tiny_model, ids, mask)
    with ablate(tiny_model, neurons, scale):
        hooked = logits(tiny_model, ids, mask)
        hooked_tokens = [greedy(tiny_model, p) for p in prompts[:3]]
    with edit_weights(tiny_model, neurons, scale):
        edited = logits(tiny_model, ids, mask)
        edited_tokens = [greedy(tiny_model, p) for p in prompts[:3]]
    assert (hooked - base).abs().max() > 0.1  # the intervention does something
    if scale == 0.0:  # zero products in the same kernel: bit-identical
        assert torch.equal(edited, hooked)
    else:
        torch.testing.assert_close(edited, hooked, atol=logit_tol(tiny_model, hooked), rtol=0)
    assert edited_tokens == hooked_tokens
    assert torch.equal(logits(tiny_model, ids, mask), base)  # restored


def test_plain_hf_model_edit_equals_bridge_hook(tiny_dir, tiny_model, prompts):
    hf = hf_reference(tiny_dir)
    neurons = random_neurons(tiny_model, seed=1)
    ids = torch.tensor([encode(tiny_model.tokenizer, [prompts[1]])[0]])
    before = digest(hf)
    with ablate(tiny_model, neurons, 0.0):
        hooked = logits(tiny_model, ids, None)
    with edit_weights(hf, neurons, 0.0), torch.no_grad():
        edited = hf(ids).logits
    # two engines (bridge vs plain HF eager attention): rounding only
    torch.testing.assert_close(edited, hooked, atol=logit_tol(tiny_model, hooked), rtol=0)
    assert digest(hf) == before


@pytest.mark.parametrize("which", ["weights", "direction"])
def test_restored_bit_for_bit_on_exception(tiny_model, which):
    before = digest(tiny_model)
    r = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    edit = (
        edit_weights(tiny_model, random_neurons(tiny_model), 1.7)
        if which == "weights"
        else edit_direction(tiny_model, r)
    )
    with pytest.raises(RuntimeError, match="inside"), edit:
        assert digest(tiny_model) != before  # the weights really changed
        raise RuntimeError("inside the block")
    assert digest(tiny_model) == before


def test_only_touched_columns_are_saved(tiny_model):
    neurons = random_neurons(tiny_model, per_layer=3)
    w = hf_model(tiny_model).model.layers[2].mlp.down_proj.weight
    cols = sorted(neurons.by_layer()[2].tolist())
    other = [i for i in range(w.shape[1]) if i not in cols]
    with edit_weights(tiny_model, neurons, 0.0):
        assert w[:, cols].abs().max() == 0 and w[:, other].abs().max() > 0


@pytest.mark.parametrize("per_layer, strength", [(False, 1.0), (True, 1.0), (False, 0.5), (True, 2.0)])
def test_edit_direction_equals_projection_hooks(tiny_model, prompts, per_layer, strength):
    g = torch.Generator().manual_seed(2)
    shape = (tiny_model.cfg.n_layers, tiny_model.cfg.d_model) if per_layer else (tiny_model.cfg.d_model,)
    r = torch.randn(shape, generator=g)
    ids, mask = batch(tiny_model, prompts)
    base = logits(tiny_model, ids, mask)
    with ablate_direction(tiny_model, r, strength=strength):
        hooked = logits(tiny_model, ids, mask)
        hooked_tokens = [greedy(tiny_model, p) for p in prompts[:3]]
    with edit_direction(tiny_model, r, strength):
        edited = logits(tiny_model, ids, mask)
        edited_tokens = [greedy(tiny_model, p) for p in prompts[:3]]
    assert (hooked - base).abs().max() > 0.1
    torch.testing.assert_close(edited, hooked, atol=logit_tol(tiny_model, hooked), rtol=0)
    assert edited_tokens == hooked_tokens
    assert torch.equal(logits(tiny_model, ids, mask), base)


def save_tiny(path, **overrides):
    """A tiny Llama checkpoint with config overrides (e.g. tied embeddings, an MLP bias)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = byte_tokenizer()
    cfg = LlamaConfig(**{**tiny_config("llama", len(tok)).to_dict(), **overrides})
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF initialises norm weights to one and biases to zero: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return cna_lens.load_model(path, dtype=torch.float32)


def test_tied_embeddings_edit_also_projects_the_unembedding(tmp_path, prompts):
    model = save_tiny(tmp_path, tie_word_embeddings=True)
    r = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    ids, mask = batch(model, prompts)
    with ablate_direction(model, r, unembed=True):
        hooked = logits(model, ids, mask)
    with ablate_direction(model, r, unembed=False):
        untied = logits(model, ids, mask)
    before = digest(model)
    with edit_direction(model, r):
        edited = logits(model, ids, mask)
    assert digest(model) == before
    torch.testing.assert_close(edited, hooked, atol=logit_tol(model, hooked), rtol=0)
    assert (edited - untied).abs().max() > 100 * logit_tol(model, hooked)  # the unembedding term is real


def test_edit_steering_equals_steer_where_down_proj_has_a_bias(tmp_path, prompts):
    model = save_tiny(tmp_path, mlp_bias=True)
    vectors = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    ids, mask = batch(model, prompts)
    base, before = logits(model, ids, mask), digest(model)
    for layers in (None, [1, 3]):
        with steer(model, vectors, 0.7, layers=layers):
            hooked = logits(model, ids, mask)
        with edit_steering(model, vectors, 0.7, layers=layers):
            edited = logits(model, ids, mask)
        assert (hooked - base).abs().max() > 0.1
        torch.testing.assert_close(edited, hooked, atol=logit_tol(model, hooked), rtol=0)
    with pytest.raises(RuntimeError), edit_steering(model, vectors, 0.7):
        raise RuntimeError
    assert digest(model) == before


def test_errors(tiny_model):
    vectors = torch.zeros(tiny_model.cfg.n_layers, tiny_model.cfg.d_model)
    with pytest.raises(NotImplementedError, match="cna_lens.steer"), edit_steering(tiny_model, vectors, 1.0):
        pass
    with (
        pytest.raises(ValueError, match="hook_mlp_out"),
        edit_steering(tiny_model, vectors, 1.0, hook="hook_resid_post"),
    ):
        pass
    n = tiny_model.cfg.n_layers
    for form in (steer, edit_steering):  # one check serves both forms
        for args, kwargs, msg in (
            ((vectors[1:], 1.0), {}, "layer, d_model"),
            ((vectors, float("nan")), {}, "finite"),
            ((vectors, 1.0), {"layers": [n]}, "must lie in"),
        ):
            with pytest.raises(ValueError, match=msg), form(tiny_model, *args, **kwargs):
                pass
    wrong = NeuronSet((0,), (1,), (0.0,), tiny_model.cfg.n_layers + 1, tiny_model.cfg.d_mlp)
    with pytest.raises(ValueError, match="layers"), edit_weights(tiny_model, wrong):
        pass
    pre = NeuronSet((0,), (1,), (0.0,), tiny_model.cfg.n_layers, tiny_model.cfg.d_mlp, hook="mlp.hook_pre")
    with pytest.raises(ValueError, match="hook_post"), edit_weights(tiny_model, pre):
        pass
    ok = random_neurons(tiny_model, 1)
    with pytest.raises(ValueError, match="finite"), edit_weights(tiny_model, ok, float("nan")):
        pass
    with pytest.raises(ValueError, match="non-zero"), edit_direction(tiny_model, torch.zeros(tiny_model.cfg.d_model)):
        pass
    with pytest.raises(ValueError, match="d_model"), edit_direction(tiny_model, torch.ones(3)):
        pass
    with pytest.raises(TypeError, match="PreTrainedModel"), edit_weights(object(), ok):
        pass


def test_architecture_without_down_proj_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    neurons = NeuronSet((0,), (1,), (0.0,), 1, 64)
    with pytest.raises(ValueError, match="not supported|no decoder layers"), edit_weights(gpt2, neurons):
        pass


def test_gemma3_style_model(tmp_path):
    """Gemma3 keeps ``model.layers[l].mlp.down_proj``: neuron edits work; its post-MLP norm rules out the
    direction edit (a projection before a norm does not remove the direction from the residual)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=16,
    )
    gemma = Gemma3ForCausalLM(cfg).eval()
    neurons = NeuronSet((1,), (5,), (0.0,), 2, 48)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    captured = {}

    def zero_input(mod, args):  # the hook form: scale the down projection's input
        x = args[0].clone()
        x[..., 5] = 0
        return (x,)

    handle = gemma.model.layers[1].mlp.down_proj.register_forward_pre_hook(zero_input)
    with torch.no_grad():
        captured["hook"] = gemma(ids).logits
    handle.remove()
    before = digest(gemma)
    with edit_weights(gemma, neurons, 0.0), torch.no_grad():
        captured["edit"] = gemma(ids).logits
    assert digest(gemma) == before
    assert torch.equal(captured["edit"], captured["hook"])  # zero products: bit-identical
    with pytest.raises(NotImplementedError, match="normalises"), edit_direction(gemma, torch.ones(32)):
        pass
