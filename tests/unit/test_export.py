"""Exported checkpoints reproduce the hooked model with plain transformers (HF) or its GGUF loader."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cna_lens.export import EDIT_FILE, export_model
from cna_lens.intervene import ablate, ablate_direction, steer
from cna_lens.neurons import NeuronSet

from .test_edit import batch, digest, logit_tol, logits, random_neurons

#: Runs in a fresh interpreter: transformers only, never cna_lens.
RELOAD = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
out, ids, mask, n = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), torch.tensor(json.loads(sys.argv[3])), 6
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
tok = AutoTokenizer.from_pretrained(out)
with torch.no_grad():
    logits = model(ids, attention_mask=mask).logits
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
assert "cna_lens" not in sys.modules
save_file({"logits": logits, "tokens": gen[:, -n:].contiguous()}, out + ".check.safetensors")
chat = [{"role": "user", "content": "Hi"}]
print(json.dumps({"template": tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)}))
"""


def reload_in_subprocess(out, ids, mask):
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), json.dumps(ids.tolist()), json.dumps(mask.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    got = load_file(str(out) + ".check.safetensors")
    return got["logits"], got["tokens"], json.loads(proc.stdout.strip().splitlines()[-1])


def real(x, mask):
    """Logits at real (unpadded) positions: padded ones are undefined and engines fill them differently."""
    return x[mask.bool()]


def hooked_greedy(model, ids, mask, n: int = 6):
    """Greedy continuation of a left-padded batch by full forwards (no cache)."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, -n:]


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

    # transformers' GGUF loader (undoes Llama's RoPE row order) against the same rounding in torch
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
