"""Exported checkpoints reproduce the hooked model in a fresh interpreter that imports transformers only
(one subprocess per test)."""

import json
import os

import pytest
import torch

from cna_lens.export import EDIT_FILE, export_model
from cna_lens.intervene import ablate, ablate_direction, steer

from ..helpers import batch, digest, hooked_greedy, logit_tol, logits, random_neurons, real, reload_in_subprocess

pytestmark = pytest.mark.integration


def test_hf_export_reloads_without_cna_lens(tiny_model, prompts, tmp_path):
    neurons = random_neurons(tiny_model, seed=7)
    ids, mask = batch(tiny_model, prompts[:4])
    with ablate(tiny_model, neurons, 0.0):
        hooked, tokens = logits(tiny_model, ids, mask), hooked_greedy(tiny_model, ids, mask)
    before = digest(tiny_model)
    out = export_model(tiny_model, tmp_path / "edited", neurons=neurons, scale=0.0, provenance={"run": "x"})
    assert digest(tiny_model) == before  # the export's edit was undone
    mask_bits = os.umask(0)
    os.umask(mask_bits)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask_bits  # a normal directory, not mkdtemp's 0700
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask_bits for p in out.iterdir() if p.is_file())
    got, got_tokens, info = reload_in_subprocess(out, ids, mask)
    # same weights, same eager ops: measured bit-identical; the bound allows other kernels' rounding
    torch.testing.assert_close(real(got, mask), real(hooked, mask), atol=logit_tol(tiny_model, hooked), rtol=0)
    assert torch.equal(got_tokens, tokens)
    assert info["template"].endswith("<|im_start|>assistant\n")  # the chat template travelled
    record = json.loads((out / EDIT_FILE).read_text())
    assert record["kind"] == "cna_lens.Edit" and record["format_version"] == 1
    (edit,) = record["edits"]
    assert (edit["kind"], edit["scale"], edit["layers"], edit["indices"]) == (
        "neurons",
        0.0,
        list(neurons.layers),
        list(neurons.indices),
    )
    assert record["provenance"] == {"run": "x"} and record["cna_lens_version"]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(record["files"])
    assert not json.loads((out / "config.json").read_text()).get("output_attentions")
    assert [p.name for p in tmp_path.iterdir()] == ["edited", "edited.check.safetensors"]  # no temp dirs left


def test_direction_export(tiny_model, prompts, tmp_path):
    r = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(8))
    ids, mask = batch(tiny_model, prompts[:3])
    with ablate_direction(tiny_model, r):
        hooked = logits(tiny_model, ids, mask)
    out = export_model(tiny_model, tmp_path / "dir", direction=r)
    got, _, _ = reload_in_subprocess(out, ids, mask)
    torch.testing.assert_close(real(got, mask), real(hooked, mask), atol=logit_tol(tiny_model, hooked), rtol=0)


def test_steering_export_uses_mlp_bias_where_the_architecture_has_it(tiny_model, prompts, tmp_path):
    vectors = torch.randn(tiny_model.cfg.n_layers, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(9))
    if tiny_model.original_model.config.model_type == "qwen2":  # Qwen2 has no mlp_bias option
        with pytest.raises(NotImplementedError, match="cna_lens.steer"):
            export_model(tiny_model, tmp_path / "steer", vectors=vectors, alpha=0.5)
        assert not (tmp_path / "steer").exists()
        return
    ids, mask = batch(tiny_model, prompts[:3])
    with steer(tiny_model, vectors, 0.5, layers=[1, 2]):
        hooked = logits(tiny_model, ids, mask)
    out = export_model(tiny_model, tmp_path / "steer", vectors=vectors, alpha=0.5, layers=[1, 2])
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    got, _, _ = reload_in_subprocess(out, ids, mask)
    torch.testing.assert_close(real(got, mask), real(hooked, mask), atol=logit_tol(tiny_model, hooked), rtol=0)
