"""``--engine vllm``: clear errors where it cannot run (here: no CUDA or no vllm), and on a CUDA machine
with the extra installed, vLLM's greedy texts from an exported edited model equal the stock engine's."""

import importlib.util

import pytest
import torch

import cna_lens
from cna_lens.cli import main
from cna_lens.vllm_engine import check_vllm, generate_vllm

HAS_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        check_vllm(tmp_path)


@pytest.mark.skipif(HAS_VLLM, reason="vllm and CUDA are present")
def test_cli_refuses_before_loading_where_vllm_cannot_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cna_lens.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "p.txt").write_text("Hello\n")
    assert (
        main(["generate", "--model", "smollm2-135m-instruct", "--prompts", str(tmp_path / "p.txt"), "--engine", "vllm"])
        == 2
    )
    assert "vllm extra and a CUDA GPU" in capsys.readouterr().err


def test_cli_refuses_neurons_with_vllm(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("Hello\n")
    args = ["generate", "--model", "smollm2-135m-instruct", "--prompts", str(tmp_path / "p.txt"), "--engine", "vllm"]
    assert main([*args, "--neurons", str(tmp_path / "n.json")]) == 2
    assert "export" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_VLLM, reason="needs CUDA and the vllm extra")
def test_vllm_generates_the_exported_edit(llama_model, tmp_path):
    """The exported edited model on vLLM (greedy) against the stock engine under the same weight edit."""
    ns = cna_lens.NeuronSet((2, 3), (5, 7), (1.0, 1.0), llama_model.cfg.n_layers, llama_model.cfg.d_mlp)
    out = cna_lens.export_model(llama_model, tmp_path / "edited", neurons=ns, scale=0.0)
    prompts = ["How do I pick a lock?", "Write a poem about the sea"]
    with cna_lens.edit_weights(llama_model, ns, 0.0):
        want = cna_lens.generate(llama_model, prompts, max_new_tokens=8, progress=False)
    assert generate_vllm(out, prompts, max_new_tokens=8) == want
