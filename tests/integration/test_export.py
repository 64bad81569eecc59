"""Exported checkpoints reproduce the hooked model in a fresh interpreter that imports transformers only.
One module fixture exports every kind of edit and reloads them all in one subprocess; the tests check
one export each."""

import json
import os

import pytest
import torch

from cna_lens.export import EDIT_FILE, export_model
from cna_lens.intervene import ablate, ablate_direction, steer

from ..conftest import PROMPTS
from ..helpers import batch, digest, hooked_greedy, logit_tol, logits, random_neurons, real, reload_in_subprocess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory):
    """({name: (export dir, ids, mask, hooked logits, hooked greedy tokens, reloaded logits, reloaded
    greedy tokens, reloaded chat template)}, whether the weights were restored after all exports, root)."""
    root = tmp_path_factory.mktemp("exports")
    model = tiny_model
    llama = model.original_model.config.model_type == "llama"  # Qwen2 has no mlp_bias: no steering export
    neurons = random_neurons(model, seed=7)
    r = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(8))
    vectors = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=torch.Generator().manual_seed(9))
    kinds = {
        "edited": (lambda: ablate(model, neurons, 0.0), dict(neurons=neurons, scale=0.0, provenance={"run": "x"})),
        "dir": (lambda: ablate_direction(model, r), dict(direction=r)),
        "dir_half": (lambda: ablate_direction(model, r, strength=0.5), dict(direction=r, direction_strength=0.5)),
    }
    if llama:
        steering = dict(vectors=vectors, alpha=0.5, layers=[1, 2])
        kinds["steer"] = (lambda: steer(model, vectors, 0.5, layers=[1, 2]), steering)
    ids, mask = batch(model, PROMPTS[:4])
    done, before = {}, digest(model)
    for name, (hook, kw) in kinds.items():
        with hook():
            hooked, tokens = logits(model, ids, mask), hooked_greedy(model, ids, mask)
        done[name] = (export_model(model, root / name, **kw), hooked, tokens)
    restored = digest(model) == before  # every export's edit was undone
    reloaded = reload_in_subprocess(*[(path, ids, mask) for path, _, _ in done.values()])
    out = {name: (path, ids, mask, h, t, *again) for (name, (path, h, t)), again in zip(done.items(), reloaded)}
    return out, restored, root


def check_logits(model, export):
    _, ids, mask, hooked, tokens, got, got_tokens, info = export
    # the same weights in plain HF eager attention against the bridge: fp32 summation order at most
    # (measured bit-identical here); logit_tol, tests/helpers.py
    torch.testing.assert_close(real(got, mask), real(hooked, mask), atol=logit_tol(model, hooked), rtol=0)
    assert torch.equal(got_tokens, tokens)  # HF generate (KV cache) picks the hooked model's greedy tokens
    assert info["template"].endswith("<|im_start|>assistant\n")  # the chat template travelled


def test_hf_export_reloads_without_cna_lens(tiny_model, exports):
    (exported, restored, root), neurons = exports, random_neurons(tiny_model, seed=7)
    out = exported["edited"][0]
    assert restored
    check_logits(tiny_model, exported["edited"])
    mask_bits = os.umask(0)
    os.umask(mask_bits)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask_bits  # a normal directory, not mkdtemp's 0700
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask_bits for p in out.iterdir() if p.is_file())
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
    # no temporary directories left beside the exports (and the reload's check files)
    assert {p.name for p in root.iterdir()} == {n + s for n in exported for s in ("", ".check.safetensors")}


@pytest.mark.parametrize("name, strength", [("dir", 1.0), ("dir_half", 0.5)])
def test_direction_export(tiny_model, exports, name, strength):
    check_logits(tiny_model, exports[0][name])
    (edit,) = json.loads((exports[0][name][0] / EDIT_FILE).read_text())["edits"]
    assert (edit["kind"], edit["strength"]) == ("direction", strength)


def test_direction_export_checks_the_strength_first(tiny_model, tmp_path):
    r = torch.ones(tiny_model.cfg.d_model)
    with pytest.raises(ValueError, match="strength"):
        export_model(tiny_model, tmp_path / "bad", direction=r, direction_strength=3.0)
    assert not (tmp_path / "bad").exists()


def test_steering_export_uses_mlp_bias_where_the_architecture_has_it(tiny_model, exports, tmp_path):
    if tiny_model.original_model.config.model_type == "qwen2":  # Qwen2 has no mlp_bias option
        vectors = torch.zeros(tiny_model.cfg.n_layers, tiny_model.cfg.d_model)
        with pytest.raises(NotImplementedError, match="cna_lens.steer"):
            export_model(tiny_model, tmp_path / "steer", vectors=vectors, alpha=0.5)
        assert not (tmp_path / "steer").exists()
        return
    out = exports[0]["steer"][0]
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    check_logits(tiny_model, exports[0]["steer"])
