"""Export: atomic writes, GGUF files read back by transformers' GGUF loader, plain HF models. Reloading in a
fresh interpreter (transformers only) is in tests/integration/test_export.py."""

import json

import numpy as np
import pytest
import torch

from cna_lens.export import EDIT_FILE, export_model
from cna_lens.neurons import NeuronSet

from ..helpers import batch, logit_tol, random_neurons, real


def test_atomic_and_force(llama_model, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        export_model(llama_model, out)

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_model(llama_model, out, tokenizer=Broken(), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and not any(out.iterdir())  # old dir kept, no debris
    export_model(llama_model, out, force=True)
    assert (out / "model.safetensors").is_file()
    for bad in (dict(format="onnx"), dict(gguf_type="q4_k"), dict(scale=float("inf"))):
        with pytest.raises(ValueError):
            export_model(llama_model, tmp_path / "x", **bad)


def quantized_reference(hf_dir, qtype):
    """The exported HF checkpoint with every matrix rounded as the GGUF writer rounds it."""
    import gguf
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    q = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[qtype]
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                a = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, q), q).reshape(a.shape)))
    return ref


# bf16 is a GGUF storage type here, rounded by numpy (gguf.quants) and run in fp32: no bf16 kernel, any CPU
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "bf16"])
def test_gguf_export(tiny_model, prompts, tmp_path, qtype):
    import gguf
    from transformers import AutoModelForCausalLM

    neurons = random_neurons(tiny_model, per_layer=4, seed=10)
    out = export_model(tiny_model, tmp_path / "g", neurons=neurons, format="gguf", gguf_type=qtype)
    assert sorted(p.name for p in out.iterdir()) == sorted([EDIT_FILE, f"model-{qtype}.gguf"])
    reader = gguf.GGUFReader(out / f"model-{qtype}.gguf")
    tensors = {t.name: t for t in reader.tensors}
    cfg = tiny_model.cfg
    assert {
        "token_embd.weight",
        "output.weight",
        "output_norm.weight",
        f"blk.{cfg.n_layers - 1}.ffn_down.weight",
    } <= set(tensors)
    for layer, idx in neurons.by_layer().items():
        t = tensors[f"blk.{layer}.ffn_down.weight"]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(cfg.d_model, cfg.d_mlp)
        assert t.tensor_type.name == qtype.upper()
        assert np.all(w[:, idx.numpy()] == 0) and np.abs(w).max() > 0  # zero is exact in every type
    arch = tiny_model.original_model.config.model_type
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.block_count"].contents() == cfg.n_layers
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == tiny_model.original_model.config.vocab_size

    # transformers' GGUF loader (undoes Llama's RoPE row order) against the same rounding in torch: the same
    # weights through two loaders, so at most fp32 summation order differs (logit_tol, tests/helpers.py)
    hf_dir = export_model(tiny_model, tmp_path / "h", neurons=neurons)
    ref = quantized_reference(hf_dir, qtype)
    back = AutoModelForCausalLM.from_pretrained(
        out, gguf_file=f"model-{qtype}.gguf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids, mask = batch(tiny_model, prompts[:3])
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, back(ids, attention_mask=mask).logits
    torch.testing.assert_close(real(got, mask), real(want, mask), atol=logit_tol(tiny_model, want), rtol=0)


def test_gguf_refuses_what_it_cannot_translate(llama_model, tmp_path):
    vectors = torch.zeros(llama_model.cfg.n_layers, llama_model.cfg.d_model)
    from cna_lens.gguf_export import check_config

    with pytest.raises(NotImplementedError, match="RoPE scaling"):
        check_config({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}})
    with pytest.raises(NotImplementedError, match="architectures"):
        check_config({"model_type": "gemma3_text"})
    out = export_model(llama_model, tmp_path / "s", vectors=vectors, alpha=1.0, format="gguf")
    names = {t.name for t in __import__("gguf").GGUFReader(out / "model-f16.gguf").tensors}
    assert "blk.0.ffn_down.bias" in names  # the CAA bias travels as llama.cpp's optional ffn_down_b


def test_export_of_a_plain_hf_model(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cna_lens.edit import edit_weights

    from ..conftest import hf_reference

    hf = hf_reference(tiny_dir)
    neurons = NeuronSet((1, 2, 2), (3, 4, 90), (0.0,) * 3, 4, 96)
    with pytest.raises(ValueError, match="tokenizer"):
        export_model(hf, tmp_path / "p", neurons=neurons)
    out = export_model(
        hf, tmp_path / "p", neurons=neurons, scale=0.5, tokenizer=AutoTokenizer.from_pretrained(tiny_dir)
    )
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with edit_weights(hf, neurons, 0.5), torch.no_grad():
        want = hf(ids).logits
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)  # the same weights in the same engine
    assert json.loads((out / EDIT_FILE).read_text())["source_model"] == str(tiny_dir)
