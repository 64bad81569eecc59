"""Real Qwen2.5-Coder instruct models (minutes each): `pytest -m slow`. Needs the `qwen-0-5b` /
`qwen-1-5b` extras."""

import importlib.util

import pytest
import torch

import cna_lens
from cna_lens.datasets import load_prompts
from cna_lens.models import PACKAGED, packaged_model_dir
from cna_lens.prompts import encode

from ..conftest import hf_reference
from ..helpers import assert_close_model, hf_down_proj_inputs

pytestmark = pytest.mark.slow


def _installed(alias):
    return all(importlib.util.find_spec(m) is not None for m, _ in PACKAGED[alias].parts)


@pytest.mark.parametrize("alias", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_real_qwen_hooks_and_generation(alias):
    if not _installed(alias):
        pytest.skip(f"install with: {PACKAGED[alias].install}")
    model = cna_lens.load_model(alias, dtype=torch.float32)
    prompts = load_prompts("discovery_harmful", limit=3) + load_prompts("discovery_harmless", limit=3)
    seqs = encode(model.tokenizer, prompts)
    hf = hf_reference(packaged_model_dir(alias))
    expected = hf_down_proj_inputs(hf, seqs).double()
    del hf
    got = torch.zeros_like(expected)
    for batch, acts in cna_lens.final_token_activations(model, seqs, batch_size=6):
        got[batch] = acts
    # the bridge runs HF's own modules on a padded batch: fp32 summation order only (tests/helpers.py)
    assert_close_model(got, expected, model)
    attr = cna_lens.attribute(model, prompts[:3], prompts[3:], progress=False)
    neurons = attr.top_neurons(fraction=0.001)
    jbb = load_prompts("jbb_harmful", limit=3)
    with cna_lens.ablate(model, neurons):
        batched = cna_lens.generate(model, jbb, max_new_tokens=16, batch_size=3, progress=False)
        single = [cna_lens.generate(model, [p], max_new_tokens=16, progress=False)[0] for p in jbb]
    assert batched == single
